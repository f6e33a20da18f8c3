DROP TABLE IF EXISTS weir_tokens;
DROP TABLE IF EXISTS weir_modules;
