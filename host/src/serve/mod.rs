//! `weir serve`: connects to NATS and Postgres (waiting for them while they
//! are down), makes sure the configured streams exist, loads every function
//! and runs one [`FunctionWorker`] per function until shutdown.

mod loader;
mod setup;
mod startup;

pub use setup::{StepFailure, check_bindings};

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{FunctionSpec, HostConfig, StreamSpec};
use crate::control::FunctionSource;
use crate::control::store::{CONTROL_CHANNEL, ControlStore, Deployment, ReplayFrom};
use crate::dispatch::{DeploymentLink, FunctionWorker, VersionCode, WorkerEnv, instance_settings};
use crate::health::Readiness;
use crate::ingest::Ingest;
use crate::sandbox::{FunctionInstance, Sandbox, SandboxConfig};
use crate::state::StateStore;
use crate::traces::Tracing;
use setup::retry_outages;

/// The `application_name` of the API's Postgres connections (the data
/// path's are `weir`), as `pg_stat_activity` shows them.
pub const API_APPLICATION_NAME: &str = "weir-api";

/// The stream that keeps every function's dead letters.
pub const DEAD_LETTER_STREAM: &str = "WEIR_DEAD_LETTERS";

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error(transparent)]
    Ingest(#[from] crate::ingest::IngestError),
    #[error("stream `{stream}`: {reason}")]
    Stream { stream: String, reason: String },
    #[error(
        "function `{function}` declares output `{subject}`, but no JetStream stream captures it: its outputs could never be stored"
    )]
    OutputNotCaptured { function: String, subject: String },
    #[error("NATS cannot answer now: {reason}")]
    Unavailable { reason: String },
    #[error("cannot serve health endpoints on {address}: {reason}")]
    Health {
        address: std::net::SocketAddr,
        reason: String,
    },
    #[error("cannot serve the API on {address}: {reason}")]
    Api {
        address: std::net::SocketAddr,
        reason: String,
    },
    #[error("loading function `{function}` failed: {reason}")]
    Load { function: String, reason: String },
    #[error("cannot run compile jobs: {0}")]
    Compiler(String),
    #[error(transparent)]
    Tracing(#[from] crate::traces::TracingError),
}

/// Runs the host until `shutdown` is cancelled.
pub async fn serve<S: FunctionSource>(
    config: HostConfig,
    source: S,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let tracing = Tracing::start(&config.tracing)?;
    let readiness = Arc::new(Readiness::default());
    let health_stop = shutdown.child_token();
    if let Some(metrics) = crate::telemetry::metrics() {
        // Histogram samples accumulate until drained; drain them whether or
        // not anyone scrapes.
        let stop = health_stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            while tokio::select! {
                _ = stop.cancelled() => false,
                _ = tick.tick() => true,
            } {
                metrics.run_upkeep();
            }
        });
    }
    let health = match config.health_listen {
        Some(address) => Some(
            crate::health::start(address, readiness.clone(), health_stop.clone())
                .await
                .map_err(|e| ServeError::Health {
                    address,
                    reason: e.to_string(),
                })?,
        ),
        None => None,
    };
    let served = run(config, source, &readiness, &tracing, &shutdown).await;
    // Flushing blocks on the exporter's HTTP calls.
    let flush = tracing.clone();
    let _ = tokio::task::spawn_blocking(move || flush.shutdown()).await;
    // The health endpoint stops with the host, also when start-up failed.
    health_stop.cancel();
    if let Some(health) = health {
        let _ = health.await;
    }
    served
}

async fn run<S: FunctionSource>(
    config: HostConfig,
    source: S,
    readiness: &Arc<Readiness>,
    tracing: &Tracing,
    shutdown: &CancellationToken,
) -> Result<(), ServeError> {
    let shutdown = shutdown.clone();
    let Some(client) = setup::wait_for("NATS", &config.nats_url, &shutdown, || {
        async_nats::connect(config.nats_url.as_str())
    })
    .await
    else {
        return Ok(());
    };
    readiness.nats_connected(&client);
    // A transaction left open by a paused or cut-off host (its commit holds
    // the function's owner row) is ended by the server after one lease, so
    // a standby's claim is not blocked by it for longer than that.
    let idle_limit = format!("{}ms", config.owner_lease_ms.max(1_000));
    let connect = || async {
        let options: sqlx::postgres::PgConnectOptions = config.database_url.parse()?;
        let options = options
            .application_name("weir")
            .options([("idle_in_transaction_session_timeout", &idle_limit)]);
        PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
    };
    let Some(pool) = setup::wait_for("Postgres", &config.database_url, &shutdown, || async {
        match connect().await {
            // A database that does not exist is a misconfiguration, not an
            // outage: make it (as `createdb` would) instead of waiting.
            Err(error) if setup::is_missing_database(&error) => {
                setup::create_database(&config.database_url).await?;
                connect().await
            }
            other => other,
        }
    })
    .await
    else {
        return Ok(());
    };
    let state = StateStore::open(pool.clone(), config.state_cache_bytes).await?;
    readiness.postgres_connected();
    let js = jetstream::new(client);

    let dead_letters = StreamSpec {
        name: DEAD_LETTER_STREAM.into(),
        subjects: vec![format!("{}.>", config.dead_letter_prefix)],
        duplicate_window_secs: 120,
    };
    // The broker may restart while the host starts: each step waits that
    // out, and stops the start only on a misconfiguration.
    for spec in config.streams.iter().chain(std::iter::once(&dead_letters)) {
        let made = retry_outages("make the streams", &shutdown, || {
            setup::ensure_stream(&js, spec)
        });
        if made.await?.is_none() {
            return Ok(());
        }
    }
    let made = retry_outages("make the log stream", &shutdown, || {
        setup::ensure_log_stream(&js, &config.guest_logs)
    });
    if made.await?.is_none() {
        return Ok(());
    }

    let functions = source.functions().await?;
    readiness.functions_expected(functions.len());
    let max_memory = functions
        .iter()
        .map(|f| f.limits.memory_bytes)
        .max()
        .unwrap_or(0)
        // Functions deployed later through the API get up to this much.
        .max(256 << 20);
    // Each function holds one warm instance, and briefly a second while a
    // trapped one is replaced: two pool slots each, so no function can
    // take another's.
    let slots = u32::try_from(functions.len() * 2 + 8).unwrap_or(u32::MAX);
    let sandbox = Arc::new(Sandbox::new(&SandboxConfig {
        artifact_dir: config.artifact_dir.clone(),
        max_instances: slots.max(config.max_instances),
        max_memory_bytes: max_memory,
        max_wasm_stack_bytes: config.max_wasm_stack_bytes,
        ..SandboxConfig::default()
    })?);

    // Every module uploaded through the API is compiled by a compile job,
    // on this host or another: a host that finds no artifact for a
    // deployed module does not compile it in its own process either.
    let compiler = crate::control::compile_job::Compiler::new(
        compiler_program(&config.api).map_err(ServeError::Compiler)?,
        config.api.concurrent_compiles,
        Duration::from_secs(config.api.compile_timeout_secs),
        config.api.compile_memory_bytes,
    );
    let api = match config.api.listen {
        Some(address) => {
            // Its own few connections: a flood of API calls queues for
            // these, never for the data path's.
            let options: sqlx::postgres::PgConnectOptions = config
                .database_url
                .parse()
                .map_err(crate::state::StateError::from)?;
            let api_pool = PgPoolOptions::new()
                .max_connections(config.api.database_connections.max(1))
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(options.application_name(API_APPLICATION_NAME));
            Some(
                start_api(
                    address, &config, &api_pool, &js, &sandbox, &compiler, &shutdown,
                )
                .await?,
            )
        }
        None => None,
    };
    // Held until the host stops: see `WorkerEnv::owner_identity`.
    let (owner_id, _owner_lock) = WorkerEnv::owner_identity(&config.artifact_dir);
    let env = WorkerEnv {
        state,
        js,
        dead_letter_prefix: config.dead_letter_prefix.clone(),
        tracing: tracing.clone(),
        guest_logs: config.guest_logs.clone(),
        readiness: readiness.clone(),
        owner_id,
        owner_lease: Duration::from_millis(config.owner_lease_ms.max(1_000)),
    };
    let tracker = TaskTracker::new();
    let static_names: HashSet<String> = functions.iter().map(|f| f.name.clone()).collect();
    if !startup::start_configured(
        functions,
        config.api.concurrent_compiles,
        &sandbox,
        &env,
        &tracker,
        &shutdown,
    )
    .await?
    {
        return Ok(());
    }
    tracker.close();
    tracing::info!("weir is running");
    let deployed = Deployed {
        loader: loader::Loader {
            control: ControlStore::new(pool.clone()),
            sandbox,
            compiler,
            env,
        },
        static_names,
        running: HashMap::new(),
    };
    if config.api.run_deployed {
        deployed.follow(&pool, &shutdown).await;
    } else {
        shutdown.cancelled().await;
    }
    tracker.wait().await;
    if let Some(api) = api {
        let _ = api.await;
    }
    Ok(())
}

/// Where a function's component comes from.
enum ModuleSource {
    /// A file named in the config.
    File(std::path::PathBuf),
    /// Uploaded through the API, stored in Postgres.
    Stored(Vec<u8>),
}

/// One worker of a deployed function.
struct DeployedWorker {
    /// What it runs; a deployment with another one replaces it.
    fingerprint: String,
    /// Its binding: a deleted function's consumer is removed with it.
    spec: FunctionSpec,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The functions deployed through the API, kept running as the control
/// tables say: started, replaced (after the in-flight batch) and stopped
/// within moments of a change, announced on [`CONTROL_CHANNEL`].
struct Deployed {
    /// The control store, sandbox, compiler and worker environment, which
    /// the loads of a reconcile each get a clone of.
    loader: loader::Loader,
    /// Functions of the config file; a deployment may not take their names.
    static_names: HashSet<String>,
    running: HashMap<String, DeployedWorker>,
}

/// Stops workers together: each finishes its batch in hand.
async fn stop_all(workers: Vec<DeployedWorker>) {
    for worker in &workers {
        worker.stop.cancel();
    }
    for worker in workers {
        let _ = worker.task.await;
    }
}

/// How often the host re-reads deployments even without a notification
/// (one missed while its listener reconnected, say).
const RESYNC_EVERY: Duration = Duration::from_secs(10);

impl Deployed {
    /// Follows the control tables until `shutdown`, then stops every worker
    /// after its in-flight batch.
    async fn follow(mut self, pool: &sqlx::PgPool, shutdown: &CancellationToken) {
        let mut listener = match PgListener::connect_with(pool).await {
            Ok(mut listener) => match listener.listen(CONTROL_CHANNEL).await {
                Ok(()) => Some(listener),
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for deployments; re-reading every {} s", RESYNC_EVERY.as_secs());
                    None
                }
            },
            Err(error) => {
                tracing::warn!(%error, "cannot listen for deployments; re-reading every {} s", RESYNC_EVERY.as_secs());
                None
            }
        };
        loop {
            self.reconcile().await;
            let notified = async {
                match listener.as_mut() {
                    Some(listener) => {
                        if let Err(error) = listener.recv().await {
                            tracing::warn!(%error, "deployment notifications interrupted");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = notified => {}
                _ = tokio::time::sleep(RESYNC_EVERY) => {}
            }
        }
        stop_all(self.running.drain().map(|(_, worker)| worker).collect()).await;
    }

    /// Brings the running workers in line with the deployments.
    async fn reconcile(&mut self) {
        let deployments = match self.loader.control.deployments().await {
            Ok(deployments) => deployments,
            Err(error) => {
                tracing::warn!(%error, "cannot read deployments; keeping what runs");
                return;
            }
        };
        let mut wanted = HashSet::new();
        let mut owned = HashMap::new();
        let mut changed = Vec::new();
        for deployment in deployments {
            let name = deployment.stable.spec.name.clone();
            if self.static_names.contains(&name) {
                tracing::warn!(function = %name, "a deployed function has the name of a configured one; not running it");
                continue;
            }
            // Every version it would run stays within what its namespace
            // owns now: a binding made before a grant was narrowed (or
            // before namespaces owned anything) is not run, and stops.
            match self.outside_namespace(&deployment, &mut owned).await {
                Ok(None) => {}
                Ok(Some(problem)) => {
                    tracing::error!(function = %name, namespace = %deployment.namespace, %problem, "a deployed function reaches outside its namespace; not running it");
                    continue;
                }
                // Unknown now: what runs keeps running, nothing new starts.
                Err(()) => {
                    if self.running.contains_key(&name) {
                        wanted.insert(name);
                    }
                    continue;
                }
            }
            wanted.insert(name.clone());
            // A replay that has started is the same deployment.
            let mut settled = deployment.clone();
            settled.stable.replay_from = None;
            let fingerprint = format!("{settled:?}");
            if self
                .running
                .get(&name)
                .is_some_and(|w| w.fingerprint == fingerprint)
            {
                continue;
            }
            changed.push((name, deployment, fingerprint));
        }
        // Load the new versions first, all at once: one that cannot load
        // leaves the running one serving, and each starts as soon as its
        // own module is ready, not after the others' compiles.
        let loader = &self.loader;
        let mut preparing: FuturesUnordered<_> = changed
            .into_iter()
            .map(|(name, deployment, fingerprint)| {
                let loader = loader.clone();
                async move {
                    let prepared = loader.prepare(&deployment).await;
                    (name, deployment, fingerprint, prepared)
                }
            })
            .collect();
        while let Some((name, deployment, fingerprint, prepared)) = preparing.next().await {
            let prepared = match prepared {
                Ok(prepared) => prepared,
                Err(error) => {
                    tracing::error!(function = %name, rollout = ?deployment.rollout, %error, "cannot load deployment; what runs keeps running");
                    continue;
                }
            };
            // The old worker finishes its batch first: the new one starts
            // where the durable consumer stopped.
            if let Some(old) = self.running.remove(&name) {
                old.stop.cancel();
                let _ = old.task.await;
            }
            match self.launch(&deployment, prepared).await {
                Ok(task) => {
                    tracing::info!(function = %name, rollout = ?deployment.rollout, "deployment running");
                    self.running.insert(
                        name,
                        DeployedWorker {
                            fingerprint,
                            ..task
                        },
                    );
                }
                Err(error) => {
                    tracing::error!(function = %name, rollout = ?deployment.rollout, %error, "cannot run deployment");
                }
            }
        }
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|name| !wanted.contains(*name))
            .cloned()
            .collect();
        let stopping: Vec<DeployedWorker> = gone
            .iter()
            .filter_map(|name| self.running.remove(name))
            .collect();
        let specs: Vec<FunctionSpec> = stopping.iter().map(|w| w.spec.clone()).collect();
        stop_all(stopping).await;
        for spec in specs {
            // Deleted: its consumer goes too, so a function made again under
            // the name starts from the stream's beginning.
            if let Err(error) = Ingest::remove_consumer(&self.loader.env.js, &spec).await {
                tracing::warn!(function = %spec.name, %error, "cannot remove the deleted function's consumer");
            }
            tracing::info!(function = %spec.name, "deployed function stopped");
        }
    }

    /// Why a version of `deployment` reaches outside its namespace, if one
    /// does; `Err` when the namespace's resources cannot be read now.
    /// `owned` caches each namespace's resources for one reconcile.
    async fn outside_namespace(
        &self,
        deployment: &Deployment,
        owned: &mut HashMap<String, crate::control::namespaces::Resources>,
    ) -> Result<Option<String>, ()> {
        let namespace = &deployment.namespace;
        if !owned.contains_key(namespace) {
            match self.loader.control.namespace_resources(namespace).await {
                Ok(resources) => {
                    owned.insert(namespace.clone(), resources);
                }
                Err(error) => {
                    tracing::warn!(%namespace, %error, "cannot read the namespace's resources; keeping what runs");
                    return Err(());
                }
            }
        }
        let Some(resources) = owned.get(namespace) else {
            return Err(());
        };
        Ok(std::iter::once(&deployment.stable)
            .chain(deployment.canary.as_ref().map(|(version, _)| version))
            .find_map(|version| {
                let spec = &version.spec;
                resources.binding_problem(namespace, &spec.stream, &spec.subject, &spec.publishes())
            }))
    }

    /// Clears the function's state, progress and consumer, then binds a
    /// consumer that reads the stream from `from`.
    async fn start_replay(
        &self,
        deployment: &Deployment,
        spec: &FunctionSpec,
        from: ReplayFrom,
    ) -> Result<(), ServeError> {
        use async_nats::jetstream::consumer::DeliverPolicy;
        let failed = |reason: String| ServeError::Load {
            function: spec.name.clone(),
            reason: format!("starting the replay: {reason}"),
        };
        let start = match from {
            ReplayFrom::Sequence(start_sequence) => DeliverPolicy::ByStartSequence {
                start_sequence: start_sequence.max(1),
            },
            ReplayFrom::TimeMs(ms) => DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(ms) * 1_000_000,
                )
                .map_err(|e| failed(e.to_string()))?,
            },
        };
        // Consumer first, then state: a crash in between repeats the
        // replay from the start (the version is not marked yet) instead of
        // resuming the old position on cleared state.
        Ingest::remove_consumer(&self.loader.env.js, spec).await?;
        Ingest::bind_at(&self.loader.env.js, spec, start).await?;
        self.loader
            .control
            .reset_for_replay(
                &deployment.namespace,
                &deployment.name,
                deployment.stable.version,
            )
            .await
            .map_err(|e| failed(e.to_string()))?;
        self.loader.env.state.forget_cached();
        tracing::info!(function = %spec.name, ?from, version = deployment.stable.version, "replaying: state cleared, reading the stream again");
        Ok(())
    }

    /// Binds the consumer (starting a replay if one is due) and runs the
    /// prepared versions.
    async fn launch(
        &self,
        deployment: &Deployment,
        (stable, canary): (VersionCode, Option<(VersionCode, u8)>),
    ) -> Result<DeployedWorker, ServeError> {
        let spec = deployment.stable.spec.clone();
        // The worker opens the consumer once it owns the function; a replay
        // makes it here first, at the replay's start.
        if let Some(from) = deployment.stable.replay_from {
            self.start_replay(deployment, &spec, from).await?;
        }
        let link = DeploymentLink {
            store: self.loader.control.clone(),
            namespace: deployment.namespace.clone(),
            name: deployment.name.clone(),
            rollout: deployment.rollout.clone(),
        };
        let worker = FunctionWorker::new(spec, stable, canary, Some(link), &self.loader.env);
        let stop = CancellationToken::new();
        let task = tokio::spawn(worker.run(stop.clone()));
        Ok(DeployedWorker {
            fingerprint: String::new(),
            spec: deployment.stable.spec.clone(),
            stop,
            task,
        })
    }
}

/// Serves `/v1` on `address` until `shutdown`.
async fn start_api(
    address: std::net::SocketAddr,
    config: &HostConfig,
    pool: &sqlx::PgPool,
    js: &jetstream::Context,
    sandbox: &Arc<Sandbox>,
    compiler: &crate::control::compile_job::Compiler,
    shutdown: &CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    use crate::control::{api, auth, modules};
    let settings = &config.api;
    let api_state = api::ApiState {
        auth: Arc::new(auth::Authenticator::new(
            pool.clone(),
            settings.bootstrap_token.as_ref().map(|t| t.0.as_str()),
            settings.requests_per_second,
            settings.requests_per_second_per_namespace,
        )),
        modules: modules::ModuleRegistry::new(pool.clone(), sandbox.clone(), compiler.clone()),
        store: crate::control::store::ControlStore::new(pool.clone()),
        max_module_bytes: settings.max_module_bytes,
        clients: Arc::new(crate::control::admission::ClientLimiter::new(
            settings.requests_per_second_per_client,
        )),
        max_tokens_per_namespace: settings.max_tokens_per_namespace,
        module_quota: modules::Quota {
            modules: i64::from(settings.module_quota_count),
            bytes: i64::try_from(settings.module_quota_bytes).unwrap_or(i64::MAX),
        },
        header_read_timeout: Duration::from_secs(settings.header_read_timeout_secs.max(1)),
        upload_body_timeout: Duration::from_secs(settings.upload_body_timeout_secs.max(1)),
        js: js.clone(),
        log_prefix: config.guest_logs.subject_prefix.clone(),
        dead_letter_prefix: config.dead_letter_prefix.clone(),
        uploads: Arc::new(crate::control::admission::UploadSlots::new(
            settings.concurrent_uploads,
            settings.concurrent_uploads_per_client,
        )),
    };
    api::start(address, api_state, shutdown.clone())
        .await
        .map_err(|e| ServeError::Api {
            address,
            reason: e.to_string(),
        })
}

/// The program compile jobs run: the configured one, or this executable —
/// through `/proc/self/exe` where there is one, which still names it after
/// the file was replaced by an upgrade.
fn compiler_program(settings: &crate::config::ApiConfig) -> Result<std::path::PathBuf, String> {
    let this = std::path::Path::new("/proc/self/exe");
    match &settings.compiler_program {
        Some(program) => Ok(program.clone()),
        None if this.exists() => Ok(this.to_path_buf()),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this executable to run compile jobs: {e}")),
    }
}

/// Loads a version's component and instantiates it
/// once (a start function that traps or never ends is refused here, at
/// deploy).
async fn load_version(
    spec: &FunctionSpec,
    module: ModuleSource,
    number: Option<i32>,
    sandbox: &Arc<Sandbox>,
    env: &WorkerEnv,
) -> Result<VersionCode, ServeError> {
    let loader = sandbox.clone();
    let settings = instance_settings(spec, env.max_payload());
    let trial = settings.clone();
    let failed = |reason: String| ServeError::Load {
        function: spec.name.clone(),
        reason,
    };
    // Compiling and instantiating are CPU-bound; keep them off the async
    // workers.
    let (code, instance) = tokio::task::spawn_blocking(move || {
        let code = match module {
            ModuleSource::File(path) => loader.load_file(&path)?,
            ModuleSource::Stored(bytes) => loader.load(&bytes)?,
        };
        let instance = FunctionInstance::new(&code, &trial);
        Ok::<_, crate::sandbox::SandboxError>((code, instance))
    })
    .await
    .map_err(|e| failed(e.to_string()))??;
    let instance = instance.map_err(|e| failed(e.to_string()))?;
    Ok(VersionCode {
        code,
        settings,
        instance: Some(instance),
        number,
    })
}
