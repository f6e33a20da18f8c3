//! Liveness, readiness and metrics over HTTP, for orchestrators and
//! operators.
//!
//! `GET /healthz` answers 200 while the process runs. `GET /readyz` answers
//! 200 once NATS and Postgres are connected and every function has started,
//! and 503 with the list of what the host still waits for otherwise; either
//! way it says how many functions run and which are still loading (a large
//! interpreted component takes seconds to compile), and for how long.
//! `GET /metrics` is the Prometheus text format. `GET /status` is JSON with
//! each function's version, circuit breaker and backlog.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// What the host has brought up so far; shared by `serve` and the endpoint.
#[derive(Debug, Default)]
pub struct Readiness {
    nats: AtomicBool,
    postgres: AtomicBool,
    functions_total: AtomicUsize,
    functions_started: AtomicUsize,
    client: std::sync::OnceLock<async_nats::Client>,
    functions: std::sync::Mutex<std::collections::BTreeMap<String, FunctionStatus>>,
    loading: std::sync::Mutex<std::collections::BTreeMap<String, Loading>>,
}

/// A function whose module is being compiled and instantiated.
#[derive(Debug, Clone, Copy)]
struct Loading {
    module_bytes: u64,
    since: std::time::Instant,
}

/// A loading function as `/readyz` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadingFunction {
    pub function: String,
    pub module_bytes: u64,
    /// Seconds since its load started.
    pub seconds: f64,
}

/// One function as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionStatus {
    pub name: String,
    pub version: String,
    pub breaker: crate::breaker::BreakerSnapshot,
    /// Events the consumer had yet to deliver at the last batch.
    pub pending: u64,
    /// Events in flight with deliveries that were not attempts (handed back
    /// by the breaker or with their whole batch).
    pub deferred: usize,
}

impl Readiness {
    pub fn nats_connected(&self, client: &async_nats::Client) {
        let _ = self.client.set(client.clone());
        self.nats.store(true, Ordering::Relaxed);
    }

    pub fn postgres_connected(&self) {
        self.postgres.store(true, Ordering::Relaxed);
    }

    pub fn functions_expected(&self, count: usize) {
        self.functions_total.store(count, Ordering::Relaxed);
    }

    /// `function` is loading a module of `module_bytes`.
    pub fn function_loading(&self, function: &str, module_bytes: u64) {
        let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        let since = std::time::Instant::now();
        loading.insert(
            function.to_string(),
            Loading {
                module_bytes,
                since,
            },
        );
    }

    /// `function`'s load ended (it runs, or it failed and says so in the
    /// log); the seconds it took, if it was marked loading.
    pub fn function_loaded(&self, function: &str) -> Option<f64> {
        let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        loading
            .remove(function)
            .map(|l| l.since.elapsed().as_secs_f64())
    }

    /// One of the expected functions started.
    pub fn function_started(&self) {
        self.functions_started.fetch_add(1, Ordering::Relaxed);
    }

    /// The functions loading now, by name.
    pub fn loading(&self) -> Vec<LoadingFunction> {
        let loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        loading
            .iter()
            .map(|(function, l)| LoadingFunction {
                function: function.clone(),
                module_bytes: l.module_bytes,
                seconds: (l.since.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            })
            .collect()
    }

    /// Records the latest status of a function.
    pub fn report(&self, status: FunctionStatus) {
        let mut functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        functions.insert(status.name.clone(), status);
    }

    /// Every function's latest status, by name.
    pub fn statuses(&self) -> Vec<FunctionStatus> {
        let functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        functions.values().cloned().collect()
    }

    /// What is not ready yet; empty when ready.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        let mut waiting = Vec::new();
        let nats_up = self.nats.load(Ordering::Relaxed)
            && self
                .client
                .get()
                .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected);
        if !nats_up {
            waiting.push("nats");
        }
        if !self.postgres.load(Ordering::Relaxed) {
            waiting.push("postgres");
        }
        let total = self.functions_total.load(Ordering::Relaxed);
        if !self.postgres.load(Ordering::Relaxed)
            || self.functions_started.load(Ordering::Relaxed) < total
        {
            waiting.push("functions");
        }
        waiting
    }
}

#[derive(Serialize)]
struct ReadyBody {
    ready: bool,
    waiting_for: Vec<&'static str>,
    /// Functions of the config file started, of how many.
    functions_started: usize,
    functions_expected: usize,
    /// Functions whose modules are loading (configured or deployed).
    loading: Vec<LoadingFunction>,
}

/// The health routes.
pub fn router(readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(readiness)
}

async fn ready(State(readiness): State<Arc<Readiness>>) -> (StatusCode, Json<ReadyBody>) {
    let waiting_for = readiness.waiting_for();
    let status = if waiting_for.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = ReadyBody {
        ready: waiting_for.is_empty(),
        waiting_for,
        functions_started: readiness.functions_started.load(Ordering::Relaxed),
        functions_expected: readiness.functions_total.load(Ordering::Relaxed),
        loading: readiness.loading(),
    };
    (status, Json(body))
}

#[derive(Serialize)]
struct StatusBody {
    functions: Vec<FunctionStatus>,
}

async fn status(State(readiness): State<Arc<Readiness>>) -> Json<StatusBody> {
    Json(StatusBody {
        functions: readiness.statuses(),
    })
}

async fn metrics() -> (StatusCode, String) {
    match crate::telemetry::metrics() {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics are off: another metrics recorder is installed\n".into(),
        ),
    }
}

/// Binds `address` now (so a taken port fails start-up) and serves until
/// `shutdown`.
pub async fn start(
    address: SocketAddr,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(%address, "serving /healthz, /readyz, /metrics and /status");
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, router(readiness))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "health endpoint failed");
        }
    }))
}
