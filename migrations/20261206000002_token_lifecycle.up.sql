-- Tokens get a name, may expire, and can be revoked (kept, for the record).
ALTER TABLE weir_tokens ADD COLUMN name TEXT NOT NULL DEFAULT '';
ALTER TABLE weir_tokens ADD COLUMN expires_at TIMESTAMPTZ;
ALTER TABLE weir_tokens ADD COLUMN revoked_at TIMESTAMPTZ;
CREATE INDEX weir_tokens_namespace ON weir_tokens (namespace);
