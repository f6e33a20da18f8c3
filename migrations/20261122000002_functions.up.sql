-- Functions deployed through the API, their immutable versions, and which
-- version serves. Hosts read these and follow changes (NOTIFY weir_control).

CREATE TABLE weir_functions (
    namespace  TEXT        NOT NULL,
    name       TEXT        NOT NULL,
    -- The binding: stream, subject, key, outputs, limits, retry, breaker, ...
    spec       JSONB       NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name)
);

CREATE TABLE weir_versions (
    namespace     TEXT        NOT NULL,
    name          TEXT        NOT NULL,
    version       INTEGER     NOT NULL,
    module_digest TEXT        NOT NULL REFERENCES weir_modules (digest),
    -- The binding as it was when the version was made.
    spec          JSONB       NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name, version),
    FOREIGN KEY (namespace, name) REFERENCES weir_functions ON DELETE CASCADE
);

CREATE TABLE weir_rollouts (
    namespace  TEXT        NOT NULL,
    name       TEXT        NOT NULL,
    stable     INTEGER     NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name),
    FOREIGN KEY (namespace, name, stable) REFERENCES weir_versions (namespace, name, version),
    FOREIGN KEY (namespace, name) REFERENCES weir_functions ON DELETE CASCADE
);
