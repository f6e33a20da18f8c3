//! Starting the config file's functions: all their modules load at once
//! (compiles run in parallel as the cores allow, each on a blocking thread
//! of its own), and each function starts serving as soon as its own module
//! is ready. A small function does not wait behind a 15 MB interpreted one,
//! and `/readyz` and the log say which functions are still loading.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::setup::{self, retry_outages};
use super::{ModuleSource, ServeError, load_version};
use crate::config::FunctionSpec;
use crate::dispatch::{FunctionWorker, VersionCode, WorkerEnv};
use crate::sandbox::Sandbox;

/// Loads `functions` together and runs each on `tracker` once loaded.
/// `Ok(false)` when `shutdown` came first; an error when a function cannot
/// load (the host does not start half-configured).
pub(super) async fn start_configured(
    functions: Vec<FunctionSpec>,
    sandbox: &Arc<Sandbox>,
    env: &WorkerEnv,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<bool, ServeError> {
    let mut loading: FuturesUnordered<_> = functions
        .into_iter()
        .map(|spec| load_configured(spec, sandbox, env, shutdown))
        .collect();
    while let Some(loaded) = loading.next().await {
        let Some((spec, stable)) = loaded? else {
            return Ok(false);
        };
        let worker = FunctionWorker::new(spec, stable, None, None, env);
        tracker.spawn(worker.run(shutdown.clone()));
        env.readiness.function_started();
    }
    Ok(true)
}

/// Checks one function's streams and loads its module; `None` on shutdown.
async fn load_configured(
    spec: FunctionSpec,
    sandbox: &Arc<Sandbox>,
    env: &WorkerEnv,
    shutdown: &CancellationToken,
) -> Result<Option<(FunctionSpec, VersionCode)>, ServeError> {
    let checked = retry_outages("check the function's streams", shutdown, || {
        setup::check_bindings(&env.js, &spec)
    });
    if checked.await?.is_none() {
        return Ok(None);
    }
    let module_bytes = std::fs::metadata(&spec.module).map_or(0, |m| m.len());
    env.readiness.function_loading(&spec.name, module_bytes);
    tracing::info!(function = %spec.name, module_bytes, "loading the function's module");
    let module = ModuleSource::File(spec.module.clone());
    let loaded = load_version(&spec, module, None, sandbox, env).await;
    let seconds = env
        .readiness
        .function_loaded(&spec.name)
        .unwrap_or_default();
    let stable = loaded?;
    tracing::info!(function = %spec.name, module_bytes, seconds, "function loaded; it starts now");
    Ok(Some((spec, stable)))
}
