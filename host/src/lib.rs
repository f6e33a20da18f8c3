//! Weir's host: runs WebAssembly component functions over NATS JetStream with
//! keyed state in Postgres.
//!
//! One event's path through the modules: [`ingest`] pulls it from the
//! function's durable consumer and extracts its key and time → [`dispatch`]
//! batches it and drops it if a redelivery was already applied → [`state`]
//! loads its key's entries (moka, then Postgres) → [`sandbox`] runs the
//! component on a warm instance under limits → [`state`] commits the batch's
//! changes with their sequences and outputs in one transaction → [`output`]
//! publishes outputs and dead letters with deterministic message ids →
//! [`ack`] decides ack, nak or dead letter. Beside the path: [`config`],
//! [`control`] (where function bindings come from), [`serve`] (wiring and
//! start-up), [`health`] (liveness and readiness), [`shutdown`],
//! [`telemetry`] (logs and metrics), [`traces`] (OTLP spans of the path),
//! [`guest_logs`] (guest log lines to the log and to NATS), [`breaker`]
//! (the circuit breaker around each function) and [`crash`]
//! (named crash points for fault-injection tests).

pub mod ack;
pub mod breaker;
pub mod config;
pub mod control;
pub mod crash;
pub mod dispatch;
pub mod guest_logs;
pub mod health;
pub mod ingest;
pub mod outcome;
pub mod output;
pub mod ratelimit;
pub mod sandbox;
pub mod serve;
pub mod shutdown;
pub mod state;
pub mod telemetry;
pub mod traces;
/// Event-time window bookkeeping (the `weir-window-core` crate).
pub use weir_window_core as windows;
