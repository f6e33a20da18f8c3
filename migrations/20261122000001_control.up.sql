-- The control plane's registry: uploaded modules and API tokens.

-- Component bytes, content-addressed. Re-uploading the same bytes finds the
-- same row.
CREATE TABLE weir_modules (
    digest     TEXT        PRIMARY KEY,  -- sha256 of the bytes, hex
    bytes      BYTEA       NOT NULL,
    size       BIGINT      NOT NULL,
    world      TEXT        NOT NULL,     -- the Weir world it exports
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Bearer tokens, stored as sha256 of the token; the token itself is shown
-- once, when created.
CREATE TABLE weir_tokens (
    id         TEXT        PRIMARY KEY,
    hash       TEXT        NOT NULL UNIQUE,
    namespace  TEXT        NOT NULL,     -- '*' for every namespace
    role       TEXT        NOT NULL CHECK (role IN ('read', 'deploy', 'admin')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
