//! End-to-end tests of Weir: real nats-server (started per test), real
//! Postgres (a fresh database per test through `#[sqlx::test]`), the example
//! components built from source. One binary, one module per area.

mod api;
mod breaker;
mod canary;
mod cli;
mod conformance;
mod deploy;
mod enrich;
mod failures;
mod faults;
mod fraud;
mod hostile;
mod languages;
mod logs;
mod metrics;
mod poison;
mod protocol;
mod recovery;
mod restart;
mod startup;
mod state;
mod templates;
mod tenancy;
mod tracing;
mod uploads;
mod window_deploys;
mod window_faults;
mod windows;
