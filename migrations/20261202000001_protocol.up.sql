-- The batch protocol's durable side: one owner per (function, partition),
-- the identity of the stream a function's progress belongs to, and outbox
-- rows kept per batch until that batch's publish is acknowledged.

-- Who may commit for a function. A host claims the row (a new epoch) when
-- the lease has lapsed; every commit updates it only if the epoch is still
-- the one claimed, so an owner that was paused or cut off cannot commit
-- after another took over. One partition (0) for now.
CREATE TABLE weir_owners (
    function_name TEXT        NOT NULL,
    partition     INTEGER     NOT NULL DEFAULT 0,
    epoch         BIGINT      NOT NULL,
    owner         TEXT        NOT NULL,
    lease_until   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (function_name, partition)
);

-- Which stream (and which incarnation of it, by creation time) the applied
-- sequences count in; a random incarnation id of the function's progress
-- that scopes its output message ids (a replay or a re-created function
-- gets a new one); and the consumer's ack floor as last read, where a lost
-- consumer is recreated.
ALTER TABLE weir_progress
    ADD COLUMN stream             TEXT,
    ADD COLUMN stream_created_ns  BIGINT,
    ADD COLUMN incarnation        TEXT   NOT NULL DEFAULT '',
    ADD COLUMN resume_seq         BIGINT NOT NULL DEFAULT 0;

-- Outbox rows by batch: a batch's rows go only once its own publish is
-- acknowledged. `through_seq` is the highest input sequence of the batch:
-- once the consumer's ack floor has passed it, the batch's inputs were
-- acked, which happens only after its outputs were published. (Rows from
-- before this column are published again to be safe.)
ALTER TABLE weir_outbox ADD COLUMN batch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE weir_outbox ADD COLUMN through_seq BIGINT NOT NULL DEFAULT 9223372036854775807;
ALTER TABLE weir_outbox DROP CONSTRAINT weir_outbox_pkey;
ALTER TABLE weir_outbox ADD PRIMARY KEY (function_name, batch, position);
