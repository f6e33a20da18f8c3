-- Keyed state, applied-event bookkeeping and the output outbox of the data path.

-- One row per (function, key, entry name). Versions of a function share it.
CREATE TABLE weir_state (
    function_name TEXT   NOT NULL,
    key           TEXT   NOT NULL,
    name          TEXT   NOT NULL,
    value         BYTEA  NOT NULL,
    -- Stream sequence of the batch that wrote the value last.
    updated_seq   BIGINT NOT NULL,
    PRIMARY KEY (function_name, key, name)
);

-- Stream sequences whose state changes are committed. A redelivered event
-- found here is acknowledged without running again. Rows at or below the
-- consumer's ack floor can never be redelivered and are pruned.
CREATE TABLE weir_applied (
    function_name TEXT   NOT NULL,
    seq           BIGINT NOT NULL,
    PRIMARY KEY (function_name, seq)
);

-- Highest applied stream sequence per function, for progress and lag.
CREATE TABLE weir_progress (
    function_name TEXT        PRIMARY KEY,
    applied_seq   BIGINT      NOT NULL,
    batches       BIGINT      NOT NULL DEFAULT 0,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Outputs of the last committed batch, written in the same transaction as
-- its state so that a crash between commit and publish loses none. Cleared
-- once published.
CREATE TABLE weir_outbox (
    function_name TEXT    NOT NULL,
    position      INTEGER NOT NULL,
    subject       TEXT    NOT NULL,
    payload       BYTEA   NOT NULL,
    -- JSON array of [name, value] pairs.
    headers       TEXT    NOT NULL,
    msg_id        TEXT    NOT NULL,
    PRIMARY KEY (function_name, position)
);
