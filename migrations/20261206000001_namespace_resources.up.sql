-- What each namespace may read and write through Weir: the streams its
-- functions may be bound to and the subject patterns their inputs and
-- outputs must stay within. A namespace without a row has the defaults
-- (see control/namespaces.rs).
CREATE TABLE weir_namespace_resources (
    namespace TEXT PRIMARY KEY,
    streams TEXT[] NOT NULL,
    subjects TEXT[] NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
