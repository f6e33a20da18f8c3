ALTER TABLE weir_outbox DROP CONSTRAINT weir_outbox_pkey;
ALTER TABLE weir_outbox DROP COLUMN batch;
ALTER TABLE weir_outbox DROP COLUMN through_seq;
ALTER TABLE weir_outbox ADD PRIMARY KEY (function_name, position);
ALTER TABLE weir_progress
    DROP COLUMN stream,
    DROP COLUMN stream_created_ns,
    DROP COLUMN incarnation,
    DROP COLUMN resume_seq;
DROP TABLE weir_owners;
