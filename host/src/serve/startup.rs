//! Starting the config file's functions: their modules load in parallel,
//! at most `api.concurrent_compiles` at once (a compile's memory peak is
//! large, and Cranelift already uses every core for one module), and each
//! function starts serving as soon as its own module is ready. A small
//! function does not wait behind a 15 MB interpreted one, and `/readyz` and
//! the log say which functions are still loading. Functions that share a
//! module file load one after another, so it is compiled once and the
//! others find it in the artifact cache.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::Semaphore;
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
    concurrent_loads: usize,
    sandbox: &Arc<Sandbox>,
    env: &WorkerEnv,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<bool, ServeError> {
    let slots = Semaphore::new(concurrent_loads.max(1));
    let mut by_module: BTreeMap<PathBuf, Vec<FunctionSpec>> = BTreeMap::new();
    for spec in functions {
        by_module.entry(spec.module.clone()).or_default().push(spec);
    }
    // One stream per module file: its functions load in turn, each
    // reported as soon as it is loaded.
    let mut loading = futures::stream::select_all(by_module.into_values().map(|specs| {
        let slots = &slots;
        futures::stream::iter(specs)
            .then(move |spec| load_configured(spec, slots, sandbox, env, shutdown))
            .boxed()
    }));
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
    slots: &Semaphore,
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
    let Ok(_slot) = slots.acquire().await else {
        return Ok(None);
    };
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
