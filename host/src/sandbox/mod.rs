//! The wasmtime sandbox: one [`Engine`] per process (pooling allocator, epoch
//! interruption with one ticker thread), compiled components cached on disk
//! by module digest, one `InstancePre` per loaded function, and warm
//! [`FunctionInstance`]s that run one event at a time.
//!
//! WASI p2 is linked because language runtimes import it, but nothing is
//! granted: no preopened directories, no network, no environment. Its clock
//! subscriptions are replaced by ones bounded by the invocation deadline:
//! a host-side sleep is out of reach of epoch interruption.

mod bindings;
mod diagnostics;
mod host;
mod instance;
pub use diagnostics::{GuestLogLine, GuestSpan, InvocationDiagnostics, LogLevel, LogSource};
pub use instance::{Handled, InstanceSettings, Invocation, WindowFold};

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use bindings::weir::function::types::{Event, Window};
pub use host::{InvocationState, PendingOutput};
pub use instance::FunctionInstance;

use bindings::buffered::BufferedWindowHandlerPre;
use bindings::incremental::IncrementalWindowHandlerPre;
use bindings::{EventHandler, EventHandlerPre};

pub use bindings::incremental::weir::window::types::Firing as GuestFiring;

/// How often the epoch advances; invocation deadlines are counted in ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Why a component could not be loaded or instantiated.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot read component {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("artifact cache {path}: {source}")]
    ArtifactCache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("engine setup failed: {0}")]
    Engine(String),
    #[error("module {digest} is not a valid Weir component: {reason}")]
    Invalid { digest: String, reason: String },
    #[error("module {digest} cannot be linked: {reason}")]
    UnknownImport { digest: String, reason: String },
    #[error(
        "module {digest} exports none of Weir's worlds: `weir:function/event-handler` (a `handle` function), `weir:window/incremental-window-handler` (`fold`, `merge`, `fire`) or `weir:window/buffered-window-handler` (`on-window`): {reason}"
    )]
    WrongWorld { digest: String, reason: String },
    #[error("instantiating module {digest} failed: {reason}")]
    Instantiate { digest: String, reason: String },
    #[error("no instance slot is free on this host: {0}")]
    NoSlot(String),
}

impl SandboxError {
    /// Whether the host, not the guest, is short of something.
    pub fn is_host_side(&self) -> bool {
        matches!(self, SandboxError::NoSlot(_))
    }
}

/// What an upload that imports what the host does not link should be
/// told, from the linker's error `linker`: the import by name, and what
/// to do about it (the commonest cause first: componentize-js builds in
/// `wasi:http` unless told not to).
fn import_problem(linker: &str) -> String {
    let name = linker
        .split('`')
        .nth(1)
        .filter(|name| !name.is_empty())
        .unwrap_or("an interface");
    let advice = if name.starts_with("wasi:http/") {
        "Weir functions make no HTTP requests and serve none. componentize-js builds HTTP in unless it is disabled: pass `disableFeatures: ['http', 'fetch-event']` (CLI: `-d http fetch-event`); in other languages, drop the HTTP client library"
    } else if name.starts_with("wasi:") {
        "Weir links the WASI 0.2 (wasip2) interfaces of `wasi:cli/command` (cli, io, clocks, random, filesystem, sockets) at versions 0.2.x: build against WASI 0.2 (for Rust, the `wasm32-wasip2` target), not 0.1 or 0.3"
    } else if name.starts_with("weir:") {
        "Weir links `weir:function@0.1.0` (types, state, emit, log, trace) and `weir:window@0.1.0`: build against the `wit/` of this Weir"
    } else {
        "Weir links WASI 0.2 and its own `weir:function` and `weir:window` interfaces, nothing else: remove the import, or the library that brings it in"
    };
    format!(
        "it imports `{name}`, which Weir does not provide. {advice}. (The linker said: {linker})"
    )
}

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub artifact_dir: PathBuf,
    /// Instances alive at once across all functions.
    pub max_instances: u32,
    /// Largest memory any function may be given.
    pub max_memory_bytes: usize,
    /// Deepest wasm stack of any guest.
    pub max_wasm_stack_bytes: usize,
    /// Deadlines by epoch interruption. Only benchmarks turn it off, to
    /// measure what it costs: without it an endless guest is never stopped.
    pub epoch_interruption: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            artifact_dir: std::env::temp_dir().join("weir-artifacts"),
            max_instances: 128,
            max_memory_bytes: 1 << 30,
            max_wasm_stack_bytes: 512 * 1024,
            epoch_interruption: true,
        }
    }
}

/// The process-wide engine and linker.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<InvocationState>,
    artifact_dir: PathBuf,
    engine_tag: String,
    ticker: Option<Arc<EpochTicker>>,
    config: SandboxConfig,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("artifact_dir", &self.artifact_dir)
            .finish_non_exhaustive()
    }
}

/// Which of Weir's worlds a component implements: how it is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    /// `handle`, once per event.
    Event,
    /// `fold` per event, `merge` and `fire` per window.
    IncrementalWindow,
    /// `on-window` per window, with its events.
    BufferedWindow,
}

impl World {
    /// The WIT world, as the module records name it.
    pub fn wit_name(self) -> &'static str {
        match self {
            World::Event => "weir:function/event-handler@0.1.0",
            World::IncrementalWindow => "weir:window/incremental-window-handler@0.1.0",
            World::BufferedWindow => "weir:window/buffered-window-handler@0.1.0",
        }
    }

    /// Whether the component is called per window.
    pub fn is_windowed(self) -> bool {
        self != World::Event
    }
}

/// A component linked against one of the worlds.
#[derive(Clone)]
enum HandlerPre {
    Event(EventHandlerPre<InvocationState>),
    Incremental(IncrementalWindowHandlerPre<InvocationState>),
    Buffered(BufferedWindowHandlerPre<InvocationState>),
}

/// A loaded component, ready to instantiate.
#[derive(Clone)]
pub struct FunctionCode {
    digest: String,
    pre: HandlerPre,
    engine: Engine,
    /// Keeps the epoch ticking for as long as code of this engine can run:
    /// without it a looping guest would never be interrupted.
    _ticker: Option<Arc<EpochTicker>>,
}

impl std::fmt::Debug for FunctionCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionCode")
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl FunctionCode {
    /// The sha256 of the component bytes, hex-encoded.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The world the component implements.
    pub fn world(&self) -> World {
        match self.pre {
            HandlerPre::Event(_) => World::Event,
            HandlerPre::Incremental(_) => World::IncrementalWindow,
            HandlerPre::Buffered(_) => World::BufferedWindow,
        }
    }
}

impl Sandbox {
    pub fn new(config: &SandboxConfig) -> Result<Self, SandboxError> {
        let engine_error = |e: wasmtime::Error| SandboxError::Engine(format!("{e:#}"));
        let engine = Engine::new(&pooled(config)).map_err(engine_error)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(engine_error)?;
        EventHandler::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(engine_error)?;
        link_bounded_clock(&mut linker).map_err(engine_error)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_tag = format!("{:016x}", hasher.finish());
        std::fs::create_dir_all(&config.artifact_dir).map_err(|source| {
            SandboxError::ArtifactCache {
                path: config.artifact_dir.clone(),
                source,
            }
        })?;
        let ticker = match config.epoch_interruption {
            true => Some(EpochTicker::start(engine.clone()).map_err(|e| {
                SandboxError::Engine(format!("cannot start the epoch ticker: {e}"))
            })?),
            false => None,
        };
        Ok(Self {
            engine,
            linker,
            artifact_dir: config.artifact_dir.clone(),
            engine_tag,
            ticker: ticker.map(Arc::new),
            config: config.clone(),
        })
    }

    /// The settings this sandbox was made with: a compile job in another
    /// process makes an engine from the same ones.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// Loads the component at `path`, from the artifact cache when it was
    /// compiled before.
    pub fn load_file(&self, path: &Path) -> Result<FunctionCode, SandboxError> {
        let bytes = std::fs::read(path).map_err(|source| SandboxError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.load(&bytes)
    }

    /// Loads component `bytes`, from the artifact cache when it was compiled
    /// before.
    pub fn load(&self, bytes: &[u8]) -> Result<FunctionCode, SandboxError> {
        let digest = hex::encode(Sha256::digest(bytes));
        let component = match self.cached_artifact(&digest) {
            Some(component) => component,
            None => {
                let component =
                    Component::new(&self.engine, bytes).map_err(|e| SandboxError::Invalid {
                        digest: digest.clone(),
                        reason: format!("{e:#}"),
                    })?;
                self.store_artifact(&digest, &component);
                component
            }
        };
        self.link(digest, &component)
    }

    /// Loads the component of `digest` from the artifact a compile job left
    /// in the cache ([`Self::artifact_path`]); never compiles in this
    /// process.
    pub fn load_compiled(&self, digest: &str) -> Result<FunctionCode, SandboxError> {
        let component = self.cached_artifact(digest).ok_or_else(|| {
            SandboxError::Engine(format!("no usable compiled artifact of module {digest}"))
        })?;
        self.link(digest.to_string(), &component)
    }

    /// Whether the artifact cache holds a compiled `digest`.
    pub fn has_artifact(&self, digest: &str) -> bool {
        self.artifact_path(digest).exists()
    }

    /// Checks the component's imports and exports against what the host
    /// links.
    fn link(&self, digest: String, component: &Component) -> Result<FunctionCode, SandboxError> {
        let pre =
            self.linker
                .instantiate_pre(component)
                .map_err(|e| SandboxError::UnknownImport {
                    digest: digest.clone(),
                    reason: import_problem(&format!("{e:#}")),
                })?;
        // A component exports one world's functions; the event handler's
        // error says what is missing for the commonest case.
        let pre = match EventHandlerPre::new(pre.clone()) {
            Ok(event) => HandlerPre::Event(event),
            Err(missing) => {
                if let Ok(incremental) = IncrementalWindowHandlerPre::new(pre.clone()) {
                    HandlerPre::Incremental(incremental)
                } else if let Ok(buffered) = BufferedWindowHandlerPre::new(pre) {
                    HandlerPre::Buffered(buffered)
                } else {
                    return Err(SandboxError::WrongWorld {
                        digest,
                        reason: format!("{missing:#}"),
                    });
                }
            }
        };
        Ok(FunctionCode {
            digest,
            pre,
            engine: self.engine.clone(),
            _ticker: self.ticker.clone(),
        })
    }

    /// Deletes the compiled artifact of `digest` from the cache (its module
    /// was deleted); a missing one is fine.
    pub fn forget_artifact(&self, digest: &str) {
        let path = self.artifact_path(digest);
        if let Err(error) = std::fs::remove_file(&path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), %error, "could not delete a compiled artifact");
        }
    }

    /// Where the compiled artifact of `digest` is cached for this engine
    /// build.
    pub fn artifact_path(&self, digest: &str) -> PathBuf {
        self.artifact_dir
            .join(format!("{digest}-{}.cwasm", self.engine_tag))
    }

    fn cached_artifact(&self, digest: &str) -> Option<Component> {
        let path = self.artifact_path(digest);
        if !path.exists() {
            return None;
        }
        // SAFETY: artifacts are written only by `store_artifact` below, or
        // by a compile job (`precompile`) of this same binary's engine build
        // with this sandbox's settings (the file name carries the engine's
        // compatibility hash), into the host's private cache directory.
        // wasmtime also checks the engine settings on load.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize_file(&self.engine, &path) };
        match loaded {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), error = %error, "ignoring unusable compiled artifact; recompiling");
                None
            }
        }
    }

    fn store_artifact(&self, digest: &str, component: &Component) {
        let path = self.artifact_path(digest);
        let written = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
            .and_then(|bytes| {
                let partial = path.with_extension(format!("partial-{}", std::process::id()));
                std::fs::write(&partial, bytes)?;
                std::fs::rename(&partial, &path)
            });
        if let Err(error) = written {
            // The cache only saves compile time on the next start.
            tracing::warn!(path = %path.display(), %error, "could not cache compiled artifact");
        }
    }
}

/// The engine settings of `config` that decide compiled code. Artifacts are
/// only usable by an engine made with the same ones, so a compile job uses
/// this too. The instance allocator is not among them (wasmtime does not
/// check it on load): the host adds its pool ([`pooled`]); a compile job,
/// which instantiates nothing, does without, so its memory limit is spent
/// on compiling rather than on the pool's stacks and tables.
fn engine_config(config: &SandboxConfig) -> Config {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true)
        .epoch_interruption(config.epoch_interruption)
        // Weir calls guests synchronously; async-call bookkeeping costs
        // about half of a small call (see docs/design.md).
        .concurrency_support(false)
        .max_wasm_stack(config.max_wasm_stack_bytes);
    wasm
}

/// [`engine_config`] with the host's instance pool.
fn pooled(config: &SandboxConfig) -> Config {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(config.max_instances)
        .total_core_instances(config.max_instances * 8)
        .total_memories(config.max_instances * 2)
        .total_tables(config.max_instances * 4)
        .total_stacks(config.max_instances)
        .max_memory_size(config.max_memory_bytes);
    let mut wasm = engine_config(config);
    wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    wasm
}

/// Compiles component `bytes` to an artifact a [`Sandbox`] with the same
/// `config` loads: what a compile job runs, in a process of its own.
pub fn precompile(config: &SandboxConfig, bytes: &[u8]) -> Result<Vec<u8>, SandboxError> {
    let engine =
        Engine::new(&engine_config(config)).map_err(|e| SandboxError::Engine(format!("{e:#}")))?;
    engine
        .precompile_component(bytes)
        .map_err(|e| SandboxError::Invalid {
            digest: hex::encode(Sha256::digest(bytes)),
            reason: format!("{e:#}"),
        })
}

/// Replaces WASI's monotonic-clock subscriptions (what `sleep` and poll
/// timeouts use) with ones that cannot outlast the invocation's deadline.
fn link_bounded_clock(linker: &mut Linker<InvocationState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance("wasi:clocks/monotonic-clock@0.2.12")?;
    clock.func_wrap(
        "subscribe-duration",
        |mut store: wasmtime::StoreContextMut<'_, InvocationState>, (nanos,): (u64,)| {
            let wait = Duration::from_nanos(nanos);
            store.data_mut().bounded_sleep(wait).map(|sleep| (sleep,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut store: wasmtime::StoreContextMut<'_, InvocationState>, (when,): (u64,)| {
            store
                .data_mut()
                .bounded_sleep_until(when)
                .map(|sleep| (sleep,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on one thread, so every
/// store's deadline is checked without a timer per call.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("weir-epoch".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_import_is_named_with_what_to_do() {
        let http = import_problem(
            "component imports instance `wasi:http/outgoing-handler@0.2.0`, but a matching implementation was not found in the linker",
        );
        assert!(
            http.starts_with("it imports `wasi:http/outgoing-handler@0.2.0`"),
            "{http}"
        );
        assert!(http.contains("-d http fetch-event"), "{http}");
        let newer_wasi = import_problem("component imports instance `wasi:cli/environment@0.3.0`");
        assert!(newer_wasi.contains("wasm32-wasip2"), "{newer_wasi}");
        let other = import_problem("something without a name");
        assert!(other.starts_with("it imports `an interface`"), "{other}");
    }
}
