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
    -- Reprocess from this stream sequence or time (ms since the epoch) when
    -- the version first becomes stable: the function's state is cleared
    -- and its consumer starts there. `replayed` once done.
    replay_from_sequence BIGINT,
    replay_from_ms       BIGINT,
    replayed             BOOLEAN NOT NULL DEFAULT false,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name, version),
    FOREIGN KEY (namespace, name) REFERENCES weir_functions ON DELETE CASCADE
);

-- Which versions serve: `stable` takes every event, except that with a
-- `canary`, the keys whose hash falls below `weight` % go to the canary.
-- The canary is rolled back automatically when its failure rate exceeds the
-- stable version's by `rollback_margin` points over `rollback_min_calls`.
CREATE TABLE weir_rollouts (
    namespace          TEXT             NOT NULL,
    name               TEXT             NOT NULL,
    stable             INTEGER          NOT NULL,
    canary             INTEGER,
    weight             INTEGER          NOT NULL DEFAULT 0 CHECK (weight BETWEEN 0 AND 100),
    rollback_margin    DOUBLE PRECISION NOT NULL DEFAULT 20,
    rollback_min_calls INTEGER          NOT NULL DEFAULT 50,
    -- Why the canary was last rolled back automatically, if it was.
    rolled_back        TEXT,
    updated_at         TIMESTAMPTZ      NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name),
    FOREIGN KEY (namespace, name, stable) REFERENCES weir_versions (namespace, name, version),
    FOREIGN KEY (namespace, name, canary) REFERENCES weir_versions (namespace, name, version),
    FOREIGN KEY (namespace, name) REFERENCES weir_functions ON DELETE CASCADE
);

-- Calls per version, summed over hosts, for rollout status.
CREATE TABLE weir_version_stats (
    namespace  TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    calls      BIGINT  NOT NULL DEFAULT 0,
    failures   BIGINT  NOT NULL DEFAULT 0,
    -- Sum of call durations, for the mean.
    micros     BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, name, version),
    FOREIGN KEY (namespace, name) REFERENCES weir_functions ON DELETE CASCADE
);
