//! Host configuration: built-in defaults, then a TOML file, then `WEIR__`
//! environment variables (`WEIR__DATABASE_URL`, `WEIR__NATS_URL`, ...).
//!
//! Owns [`HostConfig`] (where NATS and Postgres are, engine limits) and the
//! function binding types [`FunctionSpec`], [`KeySource`] and [`TimeSource`].
//! Unknown fields are errors, so a typo never becomes a silent default.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration is invalid: {0}")]
    Invalid(#[from] Box<figment::Error>),
    #[error("configuration is invalid: {0}")]
    Setting(String),
    #[error("function `{function}`: {problem}")]
    Function { function: String, problem: String },
}

/// Everything `weir serve` needs to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// NATS server URL, e.g. `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// Postgres URL, e.g. `postgres://postgres@127.0.0.1:5432/weir`.
    pub database_url: String,
    /// Where compiled component artifacts are cached, keyed by module digest
    /// and engine build, so a restart does not recompile.
    pub artifact_dir: PathBuf,
    /// Upper bound of the state cache, in bytes of cached values.
    pub state_cache_bytes: u64,
    /// Instances the engine's pool holds, across every function (two per
    /// function and per canary are plenty).
    pub max_instances: u32,
    /// Deepest wasm stack any guest may use; past it the call fails as
    /// `stack-overflow`. One value for every function: wasmtime sets it
    /// per engine.
    pub max_wasm_stack_bytes: usize,
    /// Subject prefix of dead letters: `<prefix>.<function>`.
    pub dead_letter_prefix: String,
    /// How long this host's claim on a function lasts without renewal: a
    /// host that stops renewing (killed, paused, cut off) is replaced by a
    /// standby after this, and a restarted host waits for it too.
    pub owner_lease_ms: u64,
    /// Where `/healthz` and `/readyz` are served, e.g. `0.0.0.0:8080`; off
    /// when absent.
    pub health_listen: Option<std::net::SocketAddr>,
    /// Distributed traces over OTLP; off unless an endpoint is set.
    pub tracing: TracingConfig,
    /// Where guest log lines go besides the host's own log.
    pub guest_logs: GuestLogConfig,
    /// The control-plane HTTP API; off unless `api.listen` is set.
    pub api: ApiConfig,
    /// Streams to create (or leave as they are) at start-up.
    pub streams: Vec<StreamSpec>,
    /// Function bindings to run. The control plane replaces this source later.
    pub functions: Vec<FunctionSpec>,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            database_url: "postgres://postgres@127.0.0.1:5432/weir".into(),
            artifact_dir: std::env::temp_dir().join("weir-artifacts"),
            state_cache_bytes: 256 * 1024 * 1024,
            max_wasm_stack_bytes: 512 * 1024,
            max_instances: 256,
            dead_letter_prefix: "weir.dlq".into(),
            owner_lease_ms: 10_000,
            health_listen: None,
            tracing: TracingConfig::default(),
            guest_logs: GuestLogConfig::default(),
            api: ApiConfig::default(),
            streams: Vec::new(),
            functions: Vec::new(),
        }
    }
}

/// How traces are exported. With no endpoint nothing is traced and the data
/// path does no tracing work, beyond carrying an input's `traceparent`
/// header over to its outputs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// OTLP/HTTP base URL, e.g. `http://127.0.0.1:4318` (Jaeger, an
    /// OpenTelemetry Collector); spans are posted to `<endpoint>/v1/traces`.
    /// Plain HTTP only: reach a TLS endpoint through a local collector.
    pub otlp_endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    /// Fraction of new traces recorded, 0.0 to 1.0. An input whose
    /// `traceparent` says sampled (or not) decides for its own trace.
    pub sample_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            protocol: OtlpProtocol::HttpProtobuf,
            sample_ratio: 1.0,
            service_name: "weir".into(),
        }
    }
}

/// The OTLP encoding on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum OtlpProtocol {
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "http/json")]
    HttpJson,
}

/// Guest log lines (the `log` import and stdout/stderr) are written to the
/// host's log and published to `<subject_prefix>.<function>`, kept in the
/// `WEIR_LOGS` stream, where `weir fn logs` reads them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GuestLogConfig {
    pub subject_prefix: String,
    /// Lines per second one function may write, with bursts of twice that;
    /// the excess is dropped and counted (`weir_guest_log_lines_dropped_total`).
    pub lines_per_second: u32,
    /// How long the `WEIR_LOGS` stream keeps lines.
    pub retention_secs: u64,
    /// Upper bound of the `WEIR_LOGS` stream; the oldest lines go first.
    pub max_bytes: i64,
}

impl Default for GuestLogConfig {
    fn default() -> Self {
        Self {
            subject_prefix: "weir.logs".into(),
            lines_per_second: 100,
            retention_secs: 24 * 3600,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// The control-plane API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Where `/v1` is served, e.g. `0.0.0.0:7070`.
    pub listen: Option<std::net::SocketAddr>,
    /// An admin token for every namespace, to create the first real tokens
    /// with. Set it from the environment (`WEIR__API__BOOTSTRAP_TOKEN`)
    /// rather than the file.
    pub bootstrap_token: Option<Secret>,
    /// Largest module upload; bigger ones are refused before they are read.
    pub max_module_bytes: usize,
    /// Requests per second one token may make, with bursts of twice that.
    pub requests_per_second: u32,
    /// Requests per second all tokens of one namespace may make together,
    /// with bursts of twice that.
    pub requests_per_second_per_namespace: u32,
    /// Requests per second one client address may make, whatever its
    /// tokens, with bursts of twice that: checked before any token lookup.
    pub requests_per_second_per_client: u32,
    /// Uploads compiled at once; more wait. At start-up, also how many of
    /// the config file's modules load at once.
    pub concurrent_compiles: usize,
    /// Seconds a client has to send a request's headers; a slower one is
    /// disconnected.
    pub header_read_timeout_secs: u64,
    /// Seconds an upload's body has to arrive once its headers are in; a
    /// slower one is refused with 408 and its slot freed.
    pub upload_body_timeout_secs: u64,
    /// Modules a namespace may hold (uploaded and not deleted).
    pub module_quota_count: u32,
    /// Bytes of modules a namespace may hold.
    pub module_quota_bytes: u64,
    /// Live (unrevoked, unexpired) tokens a namespace may have.
    pub max_tokens_per_namespace: u32,
    /// Uploads read or compiled at once; more are refused with 429. Memory
    /// held by uploads stays under this times `max_module_bytes`.
    pub concurrent_uploads: usize,
    /// Uploads one client address (an IPv6 /64) may have in flight at
    /// once; more are refused with 429, so one client cannot hold them all.
    pub concurrent_uploads_per_client: usize,
    /// CPU seconds an upload's compile may use (all its threads together):
    /// its compile job is then stopped and the upload refused. CPU time, not
    /// wall-clock time, so a loaded machine does not refuse an upload it
    /// compiles slowly; a job is also stopped after ten times this in
    /// wall-clock time.
    pub compile_timeout_secs: u64,
    /// Data memory one compile job may use (its `RLIMIT_DATA`); a compile
    /// that needs more is stopped and the upload refused.
    pub compile_memory_bytes: u64,
    /// The `weir` binary that runs compile jobs; by default this host's own
    /// executable. A host embedded in another program must name one.
    pub compiler_program: Option<PathBuf>,
    /// Whether this host runs the functions deployed through the API. Turn
    /// it off for a host that only serves the API while others run them.
    pub run_deployed: bool,
    /// Postgres connections the API may hold, in a pool of its own: however
    /// many requests arrive, the data path's connections stay its own.
    pub database_connections: u32,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: None,
            bootstrap_token: None,
            max_module_bytes: 50 * 1024 * 1024,
            requests_per_second: 50,
            requests_per_second_per_client: 200,
            requests_per_second_per_namespace: 200,
            concurrent_compiles: 2,
            concurrent_uploads: 4,
            concurrent_uploads_per_client: 2,
            max_tokens_per_namespace: 100,
            header_read_timeout_secs: 10,
            upload_body_timeout_secs: 60,
            module_quota_count: 100,
            module_quota_bytes: 1 << 30,
            compile_timeout_secs: 60,
            compile_memory_bytes: 4 << 30,
            compiler_program: None,
            run_deployed: true,
            database_connections: 2,
        }
    }
}

/// A value never printed: `Debug` shows `***`.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A JetStream stream the host makes sure exists.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    pub name: String,
    pub subjects: Vec<String>,
    /// How long JetStream remembers `Nats-Msg-Id`s to drop duplicates.
    #[serde(default = "default_duplicate_window_secs")]
    pub duplicate_window_secs: u64,
}

fn default_duplicate_window_secs() -> u64 {
    120
}

/// Where an event's key comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeySource {
    /// The subject token at this zero-based position (`cards.tx.<card>` → 2).
    SubjectToken(usize),
    /// The value of this message header.
    Header(String),
    /// A JSON pointer into the payload (RFC 6901), e.g. `/card`; strings and
    /// numbers are accepted.
    JsonPointer(String),
}

/// Where an event's time comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TimeSource {
    /// The time JetStream stored the message.
    #[default]
    MessageTimestamp,
    /// A header holding milliseconds since the Unix epoch.
    Header(String),
    /// A JSON pointer to an integer of milliseconds since the Unix epoch.
    JsonPointer(String),
}

/// Longest JetStream stream name.
const MAX_STREAM_NAME_BYTES: usize = 255;
/// Longest subject (and key or time source) a binding may name.
const MAX_SUBJECT_BYTES: usize = 1024;
/// Longest ack wait, backoff or deadline: a day.
const MAX_WAIT_MS: u64 = 86_400_000;
/// What a 32-bit Wasm memory can address.
const MAX_WASM_MEMORY_BYTES: u64 = 1 << 32;

/// One function binding: which component runs over which subjects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// Unique name; names the durable consumer and scopes the state.
    pub name: String,
    /// Path of the component file (a wasm32-wasip2 component).
    pub module: PathBuf,
    /// The stream to consume.
    pub stream: String,
    /// The subject filter inside that stream (NATS wildcards allowed).
    pub subject: String,
    pub key: KeySource,
    #[serde(default)]
    pub event_time: TimeSource,
    /// Subjects the function may publish to (NATS wildcards allowed).
    #[serde(default)]
    pub outputs: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// The circuit breaker around the function.
    #[serde(default)]
    pub breaker: crate::breaker::BreakerConfig,
    /// Events fetched and committed together; also the most events of the
    /// function the host holds at once.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long JetStream waits for an ack before delivering an event again;
    /// after a host crash, the events it held come back after this long.
    #[serde(default = "default_ack_wait_ms")]
    pub ack_wait_ms: u64,
    /// Event-time windows, for a component of a `weir:window` world.
    #[serde(default)]
    pub window: Option<crate::windows::WindowSettings>,
    /// `(namespace, name)` of a function deployed through the API, which
    /// runs as `name` = `<namespace>_<name>`; none for a config-file
    /// function. Set by the control plane only.
    #[serde(skip)]
    pub deployed_as: Option<(String, String)>,
}

fn default_ack_wait_ms() -> u64 {
    30_000
}

fn default_batch_size() -> usize {
    500
}

/// The subject of the records under `prefix` of function `name` deployed
/// in `namespace`.
pub fn deployed_record_subject(prefix: &str, namespace: &str, name: &str) -> String {
    format!("{prefix}.{namespace}.{name}")
}

/// Every subject a function bound with `outputs` and `window` publishes
/// to: its outputs and its late-data subject. A namespace must own each,
/// and a stream must capture each.
pub fn published_subjects(
    outputs: &[String],
    window: Option<&crate::windows::WindowSettings>,
) -> Vec<String> {
    outputs
        .iter()
        .cloned()
        .chain(window.and_then(|w| w.late_subject.clone()))
        .collect()
}

impl FunctionSpec {
    /// Every subject it publishes to (see [`published_subjects`]).
    pub fn publishes(&self) -> Vec<String> {
        published_subjects(&self.outputs, self.window.as_ref())
    }

    /// The subject of this function's records (dead letters, log lines)
    /// under `prefix`: `<prefix>.<namespace>.<name>` for a deployed
    /// function, so that a tenant's records are one subject tree
    /// (`<prefix>.<namespace>.>`) a NATS permission can grant;
    /// `<prefix>.<name>` for a config-file function.
    pub fn record_subject(&self, prefix: &str) -> String {
        match &self.deployed_as {
            Some((namespace, name)) => deployed_record_subject(prefix, namespace, name),
            None => format!("{prefix}.{}", self.name),
        }
    }

    /// What is wrong with this binding, if anything, naming the field.
    pub fn problem(&self) -> Option<&'static str> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Some(
                "name must be non-empty ASCII letters, digits, `-` or `_` (it names a NATS consumer)",
            );
        }
        if self.stream.is_empty() || self.stream.contains(['.', '*', '>', ' ']) {
            return Some("stream must be a JetStream stream name");
        }
        if self.subject.is_empty() || self.subject.contains(char::is_whitespace) {
            return Some("subject must be a NATS subject filter");
        }
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return Some("batch_size must be between 1 and 10000");
        }
        if self.retry.max_attempts == 0 {
            return Some("retry.max_attempts must be at least 1");
        }
        if self.ack_wait_ms < 100 {
            return Some("ack_wait_ms must be at least 100");
        }
        if self.limits.deadline_ms == 0 {
            return Some("limits.deadline_ms must be at least 1");
        }
        if self.limits.output_count == 0 || self.limits.state_entries_per_key == 0 {
            return Some("limits.output_count and limits.state_entries_per_key must be at least 1");
        }
        if let Some(breaker) = self.breaker.problem() {
            return Some(breaker);
        }
        if let Some(window) = &self.window {
            if let Some(problem) = window.problem() {
                return Some(problem);
            }
            if let Some(subject) = &window.late_subject
                && (!crate::output::is_publishable_subject(subject)
                    || subject.contains(['*', '>'])
                    || subject.starts_with('$'))
            {
                return Some("window.late_subject must be a NATS subject without wildcards or `$`");
            }
            if let Some(subject) = &window.late_subject
                && crate::output::subject_matches(&self.subject, subject)
            {
                return Some(
                    "window.late_subject must not be one the function reads: late events would come back to it",
                );
            }
        }
        if self.outputs.iter().any(|s| s.is_empty() || s.contains(' ')) {
            return Some("outputs must be NATS subjects");
        }
        // `>` alone or `$...` would let a guest publish to system subjects,
        // the JetStream API among them, with the host's credentials.
        if self
            .outputs
            .iter()
            .any(|s| s.starts_with('$') || s.starts_with('>') || s.starts_with("*."))
        {
            return Some("outputs must not be `$` system subjects or start with a wildcard");
        }
        if let KeySource::JsonPointer(p) | KeySource::Header(p) = &self.key
            && p.is_empty()
        {
            return Some("key source must not be empty");
        }
        self.text_problem().or_else(|| self.bound_problem())
    }

    /// Strings that Postgres or NATS could not hold, or that no stream or
    /// subject could be named by: control characters (U+0000 among them)
    /// and lengths past what a subject or stream name can be.
    fn text_problem(&self) -> Option<&'static str> {
        let unusable = |text: &str, longest: usize| {
            text.len() > longest || text.chars().any(|c| c.is_control())
        };
        if unusable(&self.stream, MAX_STREAM_NAME_BYTES) {
            return Some("stream must be at most 255 bytes, without control characters");
        }
        if unusable(&self.subject, MAX_SUBJECT_BYTES) {
            return Some("subject must be at most 1024 bytes, without control characters");
        }
        if self.outputs.iter().any(|o| unusable(o, MAX_SUBJECT_BYTES)) {
            return Some("outputs must be at most 1024 bytes each, without control characters");
        }
        if let KeySource::JsonPointer(p) | KeySource::Header(p) = &self.key
            && unusable(p, MAX_SUBJECT_BYTES)
        {
            return Some("key source must be at most 1024 bytes, without control characters");
        }
        if let TimeSource::JsonPointer(p) | TimeSource::Header(p) = &self.event_time
            && unusable(p, MAX_SUBJECT_BYTES)
        {
            return Some(
                "event_time source must be at most 1024 bytes, without control characters",
            );
        }
        None
    }

    /// Numbers past what the host can run: waits and deadlines longer than
    /// a day (JetStream and the host's timers could not hold some of them,
    /// and none is of use), more memory than a 32-bit Wasm memory has.
    fn bound_problem(&self) -> Option<&'static str> {
        if self.ack_wait_ms > MAX_WAIT_MS {
            return Some("ack_wait_ms must be at most 86400000 (a day)");
        }
        if self.retry.initial_backoff_ms > MAX_WAIT_MS || self.retry.max_backoff_ms > MAX_WAIT_MS {
            return Some("retry backoffs must be at most 86400000 ms (a day)");
        }
        if self.limits.deadline_ms > MAX_WAIT_MS {
            return Some("limits.deadline_ms must be at most 86400000 (a day)");
        }
        if self.limits.memory_bytes as u64 > MAX_WASM_MEMORY_BYTES {
            return Some("limits.memory_bytes must be at most 4 GiB (a 32-bit Wasm memory)");
        }
        // Per event: what one event may publish, store and log, so that one
        // function cannot flood the shared log stream or grow state and
        // batches without bound.
        let limits = &self.limits;
        if limits.output_count > 100_000 || limits.output_bytes > 64 << 20 {
            return Some(
                "limits.output_count must be at most 100000 and limits.output_bytes at most 64 MiB",
            );
        }
        if limits.state_value_bytes > 64 << 20 || limits.state_entries_per_key > 100_000 {
            return Some(
                "limits.state_value_bytes must be at most 64 MiB and limits.state_entries_per_key at most 100000",
            );
        }
        if limits.log_lines > 10_000 || limits.table_elements > 10_000_000 {
            return Some(
                "limits.log_lines must be at most 10000 and limits.table_elements at most 10000000",
            );
        }
        None
    }

    /// A binding of `module` to `subject` in `stream`, keyed by `key`, with
    /// the defaults for everything else: message timestamps as event time,
    /// no outputs, default limits, retry policy and batch size.
    pub fn new(
        name: impl Into<String>,
        module: impl Into<PathBuf>,
        stream: impl Into<String>,
        subject: impl Into<String>,
        key: KeySource,
    ) -> Self {
        Self {
            name: name.into(),
            module: module.into(),
            stream: stream.into(),
            subject: subject.into(),
            key,
            event_time: TimeSource::default(),
            outputs: Vec::new(),
            limits: Limits::default(),
            retry: RetryPolicy::default(),
            breaker: crate::breaker::BreakerConfig::default(),
            batch_size: default_batch_size(),
            ack_wait_ms: default_ack_wait_ms(),
            window: None,
            deployed_as: None,
        }
    }
}

/// Sandbox limits of one function. Passing one fails the invocation with
/// a typed outcome (`timeout`, `out-of-memory`, `output-limit`,
/// `state-limit`, ...); log lines past the bound are dropped instead.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wall-clock budget of one invocation, including any time the guest
    /// asks WASI to sleep.
    pub deadline_ms: u64,
    /// Largest linear memory a guest may grow to.
    pub memory_bytes: usize,
    /// Largest table (of function references) a guest may grow to.
    pub table_elements: u32,
    /// Records one invocation may publish.
    pub output_count: u32,
    /// Payload and header bytes one invocation may publish, in all.
    pub output_bytes: usize,
    /// Largest value under one state entry name.
    pub state_value_bytes: usize,
    /// Entry names one key may hold.
    pub state_entries_per_key: u32,
    /// Log lines (including stdout/stderr lines) one invocation may write.
    pub log_lines: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline_ms: 1_000,
            memory_bytes: 64 * 1024 * 1024,
            table_elements: 20_000,
            output_count: 1_000,
            output_bytes: 4 * 1024 * 1024,
            state_value_bytes: 1024 * 1024,
            state_entries_per_key: 1_000,
            log_lines: 100,
        }
    }
}

/// What happens when an invocation asks to be retried, traps or times out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Deliveries before the event goes to the dead-letter subject.
    pub max_attempts: u32,
    /// Delay before the second delivery; doubles per attempt.
    pub initial_backoff_ms: u64,
    /// Cap of the doubling.
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff_ms: 500,
            max_backoff_ms: 30_000,
        }
    }
}

impl HostConfig {
    /// Loads defaults, then `file` if given, then `WEIR__*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(HostConfig::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        let config: HostConfig = figment
            .merge(Env::prefixed("WEIR__").split("__"))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: names, sizes and subjects that make sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(64 * 1024..=64 * 1024 * 1024).contains(&self.max_wasm_stack_bytes) {
            return Err(ConfigError::Setting(
                "max_wasm_stack_bytes must be between 64 KiB and 64 MiB".into(),
            ));
        }
        let setting = |problem: &str| ConfigError::Setting(problem.to_string());
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            return Err(setting("tracing.sample_ratio must be between 0.0 and 1.0"));
        }
        if let Some(endpoint) = &self.tracing.otlp_endpoint
            && !endpoint.starts_with("http://")
        {
            return Err(setting(
                "tracing.otlp_endpoint must be an http:// URL (OTLP over HTTP; TLS is not built in, so export through a local collector or agent)",
            ));
        }
        if self.guest_logs.subject_prefix.is_empty()
            || !crate::output::is_publishable_subject(&self.guest_logs.subject_prefix)
        {
            return Err(setting("guest_logs.subject_prefix must be a NATS subject"));
        }
        let mut seen = std::collections::HashSet::new();
        for function in &self.functions {
            let problem = |problem: &str| ConfigError::Function {
                function: function.name.clone(),
                problem: problem.to_string(),
            };
            if !seen.insert(function.name.as_str()) {
                return Err(problem("the name is used by another function"));
            }
            if let Some(found) = function.problem() {
                return Err(problem(found));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (PathBuf, impl Drop) {
        struct Remove(PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let path = std::env::temp_dir().join(format!(
            "weir-config-{}-{:?}.toml",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, text).expect("write config");
        (path.clone(), Remove(path))
    }

    #[test]
    fn the_deploy_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/weir.toml");
        let config = HostConfig::load(Some(&path)).expect("deploy/weir.toml is valid");
        assert_eq!(config.functions.len(), 2);
        let fraud = &config.functions[1];
        assert_eq!(fraud.key, KeySource::JsonPointer("/card".into()));
        assert_eq!(fraud.event_time, TimeSource::JsonPointer("/ts".into()));
        assert_eq!(fraud.batch_size, 500);
        assert_eq!(fraud.retry.max_attempts, 5);
        assert_eq!(fraud.breaker.window_size, 50);
        assert_eq!(fraud.limits.output_count, 10);
        assert_eq!(
            config.tracing.otlp_endpoint.as_deref(),
            Some("http://jaeger:4318")
        );
        assert_eq!(config.health_listen, Some(([0, 0, 0, 0], 8080).into()));
    }

    #[test]
    fn unknown_fields_are_errors() {
        let (path, _guard) = write("nats_ulr = \"nats://x:4222\"\n");
        let error = HostConfig::load(Some(&path)).expect_err("typo");
        assert!(error.to_string().contains("nats_ulr"), "{error}");
    }

    #[test]
    fn bad_function_specs_name_the_problem() {
        let base = r#"
[[functions]]
name = "NAME"
module = "f.wasm"
stream = "S"
subject = "s"
key = { subject_token = 0 }
"#;
        let cases = [
            (base.replace("NAME", "has space"), "name must be"),
            (
                format!("{}batch_size = 0\n", base.replace("NAME", "f")),
                "batch_size",
            ),
            (
                format!(
                    "{}retry = {{ max_attempts = 0 }}\n",
                    base.replace("NAME", "f")
                ),
                "max_attempts",
            ),
            (
                format!(
                    "{}breaker = {{ failure_rate_threshold = 120.0 }}\n",
                    base.replace("NAME", "f")
                ),
                "percentages",
            ),
            (
                format!(
                    "{}limits = {{ output_count = 0 }}\n",
                    base.replace("NAME", "f")
                ),
                "output_count",
            ),
            (
                format!("{}{}", base.replace("NAME", "f"), base.replace("NAME", "f")),
                "used by another function",
            ),
            (
                format!(
                    "{}ack_wait_ms = 9223372036854775807\n",
                    base.replace("NAME", "f")
                ),
                "ack_wait_ms must be at most",
            ),
            (
                format!("{}outputs = [\"out\\u0000\"]\n", base.replace("NAME", "f")),
                "outputs must be at most 1024 bytes each, without control characters",
            ),
            (
                format!(
                    "{}limits = {{ memory_bytes = 8589934592 }}\n",
                    base.replace("NAME", "f")
                ),
                "limits.memory_bytes",
            ),
        ];
        for (text, expected) in cases {
            let (path, _guard) = write(&text);
            let error = HostConfig::load(Some(&path)).expect_err(expected);
            assert!(
                error.to_string().contains(expected),
                "{error} should mention {expected}"
            );
        }
    }

    #[test]
    fn tracing_and_guest_log_settings_are_checked() {
        let cases = [
            ("[tracing]\nsample_ratio = 1.5\n", "sample_ratio"),
            (
                "[tracing]\notlp_endpoint = \"127.0.0.1:4317\"\n",
                "otlp_endpoint",
            ),
            ("[tracing]\nprotocol = \"grpc\"\n", "grpc"),
            ("[guest_logs]\nsubject_prefix = \"a b\"\n", "subject_prefix"),
        ];
        for (text, expected) in cases {
            let (path, _guard) = write(text);
            let error = HostConfig::load(Some(&path)).expect_err(expected);
            assert!(
                error.to_string().contains(expected),
                "{error} should mention {expected}"
            );
        }
        let (path, _guard) = write(
            "[tracing]\notlp_endpoint = \"http://jaeger:4318\"\nprotocol = \"http/json\"\nsample_ratio = 0.01\n",
        );
        let config = HostConfig::load(Some(&path)).expect("valid");
        assert_eq!(config.tracing.protocol, OtlpProtocol::HttpJson);
        assert_eq!(config.tracing.sample_ratio, 0.01);
        assert_eq!(config.guest_logs.lines_per_second, 100);
    }

    #[test]
    fn the_bootstrap_token_is_never_printed() {
        let (path, _guard) =
            write("[api]\nlisten = \"127.0.0.1:7070\"\nbootstrap_token = \"weir_very_secret\"\n");
        let config = HostConfig::load(Some(&path)).expect("valid");
        assert_eq!(
            config.api.bootstrap_token,
            Some(Secret("weir_very_secret".into()))
        );
        let printed = format!("{config:?}");
        assert!(!printed.contains("very_secret"), "{printed}");
    }

    #[test]
    fn a_missing_required_field_is_named() {
        let (path, _guard) = write(
            "[[functions]]\nname = \"f\"\nmodule = \"m\"\nstream = \"S\"\nkey = { header = \"k\" }\n",
        );
        let error = HostConfig::load(Some(&path)).expect_err("no subject");
        assert!(error.to_string().contains("subject"), "{error}");
    }
}
