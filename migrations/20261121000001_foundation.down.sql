DROP TABLE weir_outbox;
DROP TABLE weir_progress;
DROP TABLE weir_applied;
DROP TABLE weir_state;
