DROP INDEX weir_tokens_namespace;
ALTER TABLE weir_tokens DROP COLUMN revoked_at;
ALTER TABLE weir_tokens DROP COLUMN expires_at;
ALTER TABLE weir_tokens DROP COLUMN name;
