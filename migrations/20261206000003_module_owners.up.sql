-- Which namespaces uploaded (and so hold) each module: their quota counts
-- the modules they hold; a module no namespace holds and no version uses
-- can be deleted. Modules uploaded before this have no holder.
CREATE TABLE weir_module_owners (
    namespace  TEXT        NOT NULL,
    digest     TEXT        NOT NULL REFERENCES weir_modules (digest) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, digest)
);
