//! Test harness for Weir's end-to-end tests and benchmark: a real
//! nats-server started on a free port with its own store directory (killed
//! on drop, restartable on the same store), the guest components built by
//! `cargo xtask build-components`, and a host run in-process until stopped.

pub mod otlp;
pub mod process;
pub mod proxy;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use weir_host::config::{FunctionSpec, HostConfig, StreamSpec};
use weir_host::control::StaticFunctions;

/// A nats-server with JetStream, owned by one test.
pub struct NatsServer {
    port: u16,
    /// Keeps the port this server's alone (see [`reserve_port`]).
    _port_lock: std::fs::File,
    store: tempdir::TempDir,
    child: Option<Child>,
}

/// A private temporary directory, removed on drop.
pub mod tempdir {
    use std::path::{Path, PathBuf};

    #[derive(Debug)]
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(prefix: &str) -> std::io::Result<Self> {
            let unique = format!(
                "{prefix}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default()
            );
            let path = std::env::temp_dir().join(unique);
            std::fs::create_dir_all(&path)?;
            Ok(Self(path))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl NatsServer {
    /// Starts nats-server (from `NATS_SERVER` or the PATH) on a free port.
    pub fn start() -> Result<Self> {
        let store = tempdir::TempDir::new("weir-nats")?;
        let (port, lock) = reserve_port()?;
        let mut server = Self {
            port,
            _port_lock: lock,
            store,
            child: None,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let binary = std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
        let mut command = Command::new(&binary);
        command
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        process::die_with_parent(&mut command);
        let child = command.spawn().with_context(|| {
            format!("starting `{binary}` (install nats-server or set NATS_SERVER)")
        })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "nats-server did not listen on port {} within 10 s",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Something answering the port is not proof that it is this server.
        std::thread::sleep(Duration::from_millis(20));
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            bail!(
                "nats-server on port {} exited at start ({status}): is the port taken?",
                self.port
            );
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn address(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// A JetStream context on a new connection.
    pub async fn jetstream(&self) -> Result<jetstream::Context> {
        let client = async_nats::connect(self.url()).await?;
        Ok(jetstream::new(client))
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and
    /// store.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port for a nats-server that a test kills and starts again on
/// the same port: taken from below the kernel's ephemeral range (so no
/// `bind(0)` and no outgoing connection can take it while the server is
/// down) and locked, across test processes, for as long as the returned
/// file is held.
fn reserve_port() -> Result<(u16, std::fs::File)> {
    let dir = std::env::temp_dir().join("weir-test-ports");
    std::fs::create_dir_all(&dir)?;
    let start = 20_000 + (std::process::id() % 10_000) as u16;
    for offset in 0..10_000u16 {
        let port = 20_000 + (start - 20_000 + offset) % 10_000;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))?;
        if lock.try_lock().is_err() {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok((port, lock));
        }
    }
    bail!("no free port between 20000 and 30000")
}

/// A loopback port nothing listens on, reserved for this test process like
/// nats-server's ([`reserve_port`]): below the ephemeral range, so no
/// outgoing connection takes it as its local port before the test's
/// listener binds it, and locked, so no other test is given it.
pub fn free_port() -> Result<u16> {
    let (port, lock) = reserve_port()?;
    // The reservation lasts as long as this test process.
    std::mem::forget(lock);
    Ok(port)
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, or the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The directory holding the built guest components.
pub fn components_dir() -> PathBuf {
    target_dir().join("wasm32-wasip2/component")
}

/// The built component of example crate `name` (e.g. `fraud-velocity`).
pub fn component(name: &str) -> Result<PathBuf> {
    let path = components_dir().join(format!("{}.wasm", name.replace('-', "_")));
    if !path.exists() {
        bail!(
            "component {} is missing: run `cargo xtask build-components` first",
            path.display()
        );
    }
    Ok(path)
}

/// The component of example `name` written in `language` (`ts`, `python`, `c`, `cpp`),
/// as `cargo xtask build-guests` builds it.
pub fn language_component(language: &str, name: &str) -> Result<PathBuf> {
    let path = target_dir().join(format!("guest-components/{language}/{name}.wasm"));
    if !path.exists() {
        bail!(
            "component {} is missing: run `cargo xtask build-guests` first",
            path.display()
        );
    }
    Ok(path)
}

/// A Postgres URL for the database `options` name (as `#[sqlx::test]` made it).
pub fn database_url(options: &sqlx::postgres::PgConnectOptions) -> String {
    let password = std::env::var("DATABASE_URL")
        .ok()
        .and_then(|url| {
            let credentials = url.split("://").nth(1)?.split('@').next()?.to_string();
            credentials.split_once(':').map(|(_, p)| p.to_string())
        })
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    format!(
        "postgres://{}{}@{}:{}/{}",
        options.get_username(),
        password,
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    )
}

/// A host configuration for tests: its own artifact cache and no streams.
pub fn host_config(nats: &NatsServer, database_url: &str, artifacts: &Path) -> HostConfig {
    HostConfig {
        nats_url: nats.url(),
        database_url: database_url.to_string(),
        artifact_dir: artifacts.to_path_buf(),
        // A killed host's functions are taken over (or reclaimed by its
        // restart) within seconds.
        owner_lease_ms: 3_000,
        // Tests of other things make calls in bursts; the per-client limit
        // has a test of its own.
        api: weir_host::config::ApiConfig {
            requests_per_second_per_client: 100_000,
            requests_per_second_per_namespace: 100_000,
            // A host in this process (the test binary) runs its compile jobs
            // with the `weir` binary; a missing one is named by the error.
            compiler_program: Some(
                process::weir_binary().unwrap_or_else(|_| target_dir().join("debug/weir")),
            ),
            ..Default::default()
        },
        ..HostConfig::default()
    }
}

/// A stream spec capturing `subjects`.
pub fn stream(name: &str, subjects: &[&str]) -> StreamSpec {
    StreamSpec {
        name: name.into(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        duplicate_window_secs: 120,
    }
}

/// One test's services: its own nats-server, a fresh database (made by
/// `#[sqlx::test]`), and an artifact cache.
pub struct Stack {
    pub nats: NatsServer,
    pub js: jetstream::Context,
    pub database_url: String,
    pub artifacts: tempdir::TempDir,
}

impl Stack {
    pub async fn start(database: &sqlx::postgres::PgConnectOptions) -> Result<Self> {
        let nats = NatsServer::start()?;
        let js = nats.jetstream().await?;
        Ok(Self {
            nats,
            js,
            database_url: database_url(database),
            artifacts: tempdir::TempDir::new("weir-artifacts")?,
        })
    }

    /// A host config with these streams and functions.
    pub fn config(&self, streams: Vec<StreamSpec>, functions: Vec<FunctionSpec>) -> HostConfig {
        HostConfig {
            streams,
            functions,
            ..host_config(&self.nats, &self.database_url, self.artifacts.path())
        }
    }

    /// Starts a host and waits until it has created the config's streams and
    /// its own.
    pub async fn host(&self, config: HostConfig) -> Result<RunningHost> {
        // The host makes its own streams (dead letters, guest logs) after the
        // configured ones: a test may read them as soon as this returns.
        let own = [
            weir_host::serve::DEAD_LETTER_STREAM,
            weir_host::guest_logs::LOG_STREAM,
        ];
        let streams: Vec<String> = (config.streams.iter().map(|s| s.name.clone()))
            .chain(own.map(String::from))
            .collect();
        let host = RunningHost::start(config);
        for name in streams {
            eventually(
                Duration::from_secs(60),
                "the host to create its streams",
                || async {
                    host.check()?;
                    Ok(self.js.get_stream(&name).await.is_ok())
                },
            )
            .await?;
        }
        Ok(host)
    }

    /// The database URL with its port replaced by `port` (a fault proxy's).
    pub fn database_url_via(
        &self,
        database: &sqlx::postgres::PgConnectOptions,
        port: u16,
    ) -> String {
        self.database_url.replacen(
            &format!(":{}/", database.get_port()),
            &format!(":{port}/"),
            1,
        )
    }

    pub async fn pool(&self) -> Result<sqlx::PgPool> {
        Ok(sqlx::PgPool::connect(&self.database_url).await?)
    }
}

/// Starts a host serving the control-plane API (with `token` as its
/// bootstrap admin token, no rate limit to speak of) over these streams,
/// waits until `/v1` answers, and grants namespace `shop` these streams
/// and their subjects.
pub async fn api_host(
    stack: &Stack,
    streams: Vec<StreamSpec>,
    token: &str,
) -> Result<(RunningHost, std::net::SocketAddr)> {
    let address: std::net::SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let names: Vec<String> = streams.iter().map(|s| s.name.clone()).collect();
    let subjects: Vec<String> = streams.iter().flat_map(|s| s.subjects.clone()).collect();
    let mut config = stack.config(streams, vec![]);
    config.api.listen = Some(address);
    config.api.bootstrap_token = Some(weir_host::config::Secret(token.into()));
    config.api.requests_per_second = 100_000;
    let host = stack.host(config).await?;
    eventually(Duration::from_secs(60), "the API", || async {
        host.check()?;
        Ok(http_get(address, "/v1/").await.is_ok())
    })
    .await?;
    grant(address, token, "shop", &names, &subjects).await?;
    Ok((host, address))
}

/// Grants `namespace` these streams and subject patterns, as a global admin
/// (`token`) would.
pub async fn grant(
    address: std::net::SocketAddr,
    token: &str,
    namespace: &str,
    streams: &[String],
    subjects: &[String],
) -> Result<()> {
    api_call(
        address,
        token,
        "PUT",
        &format!("/v1/namespaces/{namespace}/resources"),
        serde_json::json!({"streams": streams, "subjects": subjects}),
    )
    .await?;
    Ok(())
}

/// A host running in this process until [`RunningHost::stop`].
pub struct RunningHost {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), weir_host::serve::ServeError>>,
}

impl RunningHost {
    pub fn start(config: HostConfig) -> Self {
        let shutdown = CancellationToken::new();
        let functions: Vec<FunctionSpec> = config.functions.clone();
        let task = tokio::spawn(weir_host::serve::serve(
            config,
            StaticFunctions(functions),
            shutdown.clone(),
        ));
        Self { shutdown, task }
    }

    /// Graceful stop: the batch in hand is finished, then the host returns.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }

    /// Waits for the host to exit on its own (a start-up error) and returns
    /// its result.
    pub async fn stop_when_exited(self) -> Result<()> {
        self.task.await??;
        Ok(())
    }

    /// Fails if the host already exited with an error.
    pub fn check(&self) -> Result<()> {
        if self.task.is_finished() {
            bail!("the host exited early");
        }
        Ok(())
    }
}

/// Creates (or keeps) a stream directly, for outputs the test reads.
pub async fn ensure_stream(js: &jetstream::Context, name: &str, subjects: &[&str]) -> Result<()> {
    js.get_or_create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Publishes every payload to `subject` with up to 1000 acks in flight;
/// returns the stream sequence of each, in order.
pub async fn publish_all(
    js: &jetstream::Context,
    subject: &str,
    payloads: impl IntoIterator<Item = Vec<u8>>,
) -> Result<Vec<u64>> {
    let mut sequences = Vec::new();
    let mut pending = std::collections::VecDeque::new();
    for payload in payloads {
        let ack = js.publish(subject.to_string(), payload.into()).await?;
        pending.push_back(std::future::IntoFuture::into_future(ack));
        if pending.len() >= 1000
            && let Some(ack) = pending.pop_front()
        {
            sequences.push(ack.await?.sequence);
        }
    }
    for ack in pending {
        sequences.push(ack.await?.sequence);
    }
    Ok(sequences)
}

/// Every message currently in `stream`, read with an ephemeral consumer.
pub async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
) -> Result<Vec<async_nats::Message>> {
    let mut handle = js.get_stream(stream).await?;
    let total = handle.info().await?.state.messages as usize;
    if total == 0 {
        return Ok(Vec::new());
    }
    let consumer = handle
        .create_consumer(jetstream::consumer::pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut read = Vec::with_capacity(total);
    while read.len() < total {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .context("reading the stream timed out")?;
        match next {
            Some(message) => read.push(message?.message),
            None => break,
        }
    }
    Ok(read)
}

/// `GET path` over HTTP/1.1 on `address`: the status code and the body.
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    let response = http_request(address, "GET", path, &[], &[]).await?;
    Ok((response.status, response.body))
}

/// An HTTP response as a test reads it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("the body is not JSON: {:?}", self.body))
    }
}

/// Calls the control-plane API as `token` with a JSON body (none when
/// null), whatever the answer: its status and body.
pub async fn api_send(
    address: std::net::SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> Result<HttpResponse> {
    let auth = format!("Bearer {token}");
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    http_request(
        address,
        method,
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &body,
    )
    .await
}

/// Calls the control-plane API as `token` with a JSON body (none when
/// null); the JSON answer, or an error naming the call if it is not a 2xx.
pub async fn api_call(
    address: std::net::SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    let response = api_send(address, token, method, path, &body).await?;
    anyhow::ensure!(response.status < 300, "{method} {path}: {response:?}");
    response.json()
}

/// Uploads the built component `name` (see [`component`]) as `token`;
/// the stored module's digest.
pub async fn upload_component(
    address: std::net::SocketAddr,
    token: &str,
    name: &str,
) -> Result<String> {
    upload_file(address, token, &component(name)?).await
}

/// Uploads the component at `path` as `token`; the stored module's digest.
pub async fn upload_file(
    address: std::net::SocketAddr,
    token: &str,
    path: &Path,
) -> Result<String> {
    let name = path.display();
    let bytes = std::fs::read(path)?;
    let auth = format!("Bearer {token}");
    let response = http_request(
        address,
        "POST",
        "/v1/modules",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/wasm"),
        ],
        &bytes,
    )
    .await?;
    anyhow::ensure!(response.status < 300, "uploading {name}: {response:?}");
    Ok(response.json()?["digest"]
        .as_str()
        .context("the upload's digest")?
        .to_string())
}

/// One HTTP/1.1 request on a fresh connection (closed after the response).
pub async fn http_request(
    address: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse> {
    http_request_from(None, address, method, path, headers, body).await
}

/// [`http_request`] from the local IPv4 address `source` (any 127.x.y.z
/// reaches a loopback listener), so a test can be several clients.
pub async fn http_request_from(
    source: Option<std::net::Ipv4Addr>,
    address: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = match source {
        None => tokio::net::TcpStream::connect(address).await?,
        Some(source) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind((source, 0).into())?;
            socket.connect(address).await?
        }
    };
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: weir\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    // A server may answer (413) and close before it has read the whole
    // body; that is not this request failing.
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let response = String::from_utf8_lossy(&raw);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .context("an HTTP status line")?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// The value of header `name` on `message`, or "" when absent.
pub fn header(message: &async_nats::Message, name: &str) -> String {
    message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(name))
        .map(|value| value.as_str().to_string())
        .unwrap_or_default()
}

/// Waits until the host has bound `consumer` on `stream`.
pub async fn wait_for_consumer(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
) -> Result<()> {
    eventually(Duration::from_secs(60), consumer, || async {
        Ok(js
            .get_stream(stream)
            .await?
            .consumer_info(consumer)
            .await
            .is_ok())
    })
    .await
}

/// Every key's value of state entry `name` of `function`, as text, by key.
pub async fn state_entries(
    stack: &Stack,
    function: &str,
    name: &str,
) -> Result<Vec<(String, String)>> {
    let pool = stack.pool().await?;
    let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT key, value FROM weir_state WHERE function_name = $1 AND name = $2 ORDER BY key",
    )
    .bind(function)
    .bind(name)
    .fetch_all(&pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(key, value)| (key, String::from_utf8_lossy(&value).into_owned()))
        .collect())
}

/// Number of messages in `stream` now.
pub async fn stream_len(js: &jetstream::Context, stream: &str) -> Result<u64> {
    Ok(js.get_stream(stream).await?.info().await?.state.messages)
}

/// Polls `check` every 50 ms until it returns true, failing after `limit`
/// with `what` in the message. A liveness bound, not a performance check.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
