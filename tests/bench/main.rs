//! `cargo xtask bench`: Weir's throughput and latency, measured side by side
//! on one nats-server in one run.
//!
//! Scenarios, interleaved over several rounds on fresh streams of the same
//! pre-published backlog:
//! (a) raw: an async-nats pull consumer that publishes one output per input
//!     (with a message id) and acks each input — Weir's batch size and ack
//!     policy, no Wasm, no state;
//! (b) weir/passthrough: Weir running a pass-through Rust component;
//! (c) weir/fraud: Weir running `fraud-velocity`, state in Postgres.
//! Prints events/s, the median ratios b/a and c/a, Weir's CPU-µs per event,
//! and end-to-end latency percentiles at a fixed offered rate.
//!
//! Tracing overhead: (b) again with traces exported over OTLP/HTTP to a
//! receiver in this process, at 100 % and at 1 % sampling, interleaved with
//! tracing off.
//!
//! Isolation: a fast passthrough function's backlog throughput and its p99
//! at a fixed rate, alone and beside a neighbour that sleeps in every call,
//! one that loops until its deadline (breaker on), and the same looper with
//! its breaker off. Epoch cost: a compute-bound guest timed directly on an
//! engine with epoch interruption and on one without.
//!
//! `--only windows` (not part of `all`): Nexmark q5, q7 and q11 on Weir
//! and natively, side by side (`nexmark.rs`).
//!
//! `--only languages` (not part of `all`): `fraud-velocity` in Rust,
//! TypeScript, Python, C and C++ side by side (`languages.rs`).

mod languages;
mod nexmark;

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use hdrhistogram::Histogram;
use weir_e2e::*;
use weir_host::config::{FunctionSpec, KeySource, TimeSource};

const BATCH: usize = 500;

struct Options {
    events: usize,
    rounds: usize,
    rate: u64,
    latency_secs: u64,
    /// `all`, or one part: `throughput` (the a/b/c rounds only), `tracing`,
    /// `isolation`, `epoch`, `deploy`, `windows` or `languages`.
    only: String,
}

fn options() -> Result<Options> {
    let mut options = Options {
        events: 100_000,
        rounds: 3,
        rate: 5_000,
        latency_secs: 10,
        only: "all".into(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).context("every option takes a value")?;
        match args[i].as_str() {
            "--events" => options.events = value.parse()?,
            "--rounds" => options.rounds = value.parse()?,
            "--rate" => options.rate = value.parse()?,
            "--latency-secs" => options.latency_secs = value.parse()?,
            "--only" => options.only = value.clone(),
            other => anyhow::bail!(
                "unknown option {other}; use --events N --rounds N --rate N --latency-secs N --only all|throughput|tracing|isolation|epoch|deploy|windows|languages"
            ),
        }
        i += 2;
    }
    Ok(options)
}

#[tokio::main]
async fn main() -> Result<()> {
    weir_host::telemetry::init_logging();
    let options = options()?;
    let nats = NatsServer::start()?;
    let js = nats.jetstream().await?;
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let database = format!("weir_bench_{}", std::process::id());
    let admin = sqlx::PgPool::connect(&server).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&admin)
        .await?;
    let base = server.rsplit_once('/').map(|(b, _)| b).unwrap_or(&server);
    let url = format!("{base}/{database}");
    let artifacts = tempdir::TempDir::new("weir-bench-artifacts")?;

    let result = run(&options, &nats, &js, &url, artifacts.path()).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {database} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    result
}

async fn run(
    options: &Options,
    nats: &NatsServer,
    js: &jetstream::Context,
    url: &str,
    artifacts: &std::path::Path,
) -> Result<()> {
    let pool = sqlx::PgPool::connect(url).await?;
    println!(
        "weir bench: {} events per scenario, {} rounds, batch {BATCH}, explicit acks, {} cores",
        options.events,
        options.rounds,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let passthrough_payload = vec![b'x'; 100];
    match options.only.as_str() {
        "all" | "throughput" => {}
        "tracing" => {
            return tracing_overhead(options, nats, js, url, artifacts, &passthrough_payload).await;
        }
        "isolation" => return isolation(options, nats, js, url, artifacts).await,
        "epoch" => return epoch_cost(options, artifacts),
        "deploy" => return deploy_latency(nats, js, url, artifacts).await,
        "languages" => {
            return languages::run(
                nats,
                js,
                url,
                &pool,
                artifacts,
                options.events,
                options.rounds,
            )
            .await;
        }
        "windows" => {
            return nexmark::run(
                nats,
                js,
                url,
                &pool,
                artifacts,
                options.events,
                options.rounds,
            )
            .await;
        }
        other => anyhow::bail!("unknown part {other}"),
    }
    let mut raw_rates = Vec::new();
    let mut pass_rates = Vec::new();
    let mut fraud_rates = Vec::new();
    let mut pass_cpu = Vec::new();
    let mut fraud_cpu = Vec::new();
    for round in 0..options.rounds {
        let raw = raw_consumer(js, round, options.events, &passthrough_payload).await?;
        let (pass, pass_us) = weir_passthrough(
            nats,
            js,
            url,
            artifacts,
            PassRun {
                round,
                events: options.events,
                payload: &passthrough_payload,
                tracing: None,
            },
        )
        .await?;
        let (fraud, fraud_us) =
            weir_fraud(nats, js, url, &pool, artifacts, round, options.events).await?;
        println!(
            "round {}: raw {raw:>8.0} ev/s | weir/passthrough {pass:>8.0} ev/s ({pass_us:.1} CPU-µs/ev) | weir/fraud {fraud:>8.0} ev/s ({fraud_us:.1} CPU-µs/ev)",
            round + 1
        );
        raw_rates.push(raw);
        pass_rates.push(pass);
        fraud_rates.push(fraud);
        pass_cpu.push(pass_us);
        fraud_cpu.push(fraud_us);
    }
    let b_over_a: Vec<f64> = pass_rates
        .iter()
        .zip(&raw_rates)
        .map(|(b, a)| b / a)
        .collect();
    let c_over_a: Vec<f64> = fraud_rates
        .iter()
        .zip(&raw_rates)
        .map(|(c, a)| c / a)
        .collect();
    println!(
        "median raw (a):              {:>8.0} ev/s",
        median(&raw_rates)
    );
    println!(
        "median weir/passthrough (b): {:>8.0} ev/s",
        median(&pass_rates)
    );
    println!(
        "median weir/fraud (c):       {:>8.0} ev/s",
        median(&fraud_rates)
    );
    println!("median ratio b/a: {:.2}", median(&b_over_a));
    println!("median ratio c/a: {:.2}", median(&c_over_a));
    println!(
        "weir CPU per event: passthrough {:.1} µs, fraud {:.1} µs (host process, user+system)",
        median(&pass_cpu),
        median(&fraud_cpu)
    );
    if options.only == "throughput" {
        return Ok(());
    }
    let recoveries = recovery(nats, js, url, artifacts).await?;
    let mut sorted = recoveries.clone();
    sorted.sort();
    println!(
        "recovery after SIGKILL (kill → first post-kill event processed by the restarted host), {} kills: median {:.0} ms, max {:.0} ms",
        sorted.len(),
        sorted[sorted.len() / 2].as_secs_f64() * 1e3,
        sorted.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    let histogram = latency(nats, js, url, artifacts, options.rate, options.latency_secs).await?;
    println!(
        "end-to-end latency at {} ev/s offered (weir/passthrough, publish → output received): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} events",
        options.rate,
        histogram.value_at_quantile(0.5) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
        histogram.max() as f64 / 1000.0,
        histogram.len()
    );
    tracing_overhead(options, nats, js, url, artifacts, &passthrough_payload).await?;
    isolation(options, nats, js, url, artifacts).await?;
    epoch_cost(options, artifacts)?;
    deploy_latency(nats, js, url, artifacts).await
}

/// Upload → first event processed, for a small component, through the API
/// of a running host; and the start-up of a host with 50 deployed functions
/// whose artifacts are cached.
async fn deploy_latency(
    nats: &NatsServer,
    js: &jetstream::Context,
    url: &str,
    artifacts: &std::path::Path,
) -> Result<()> {
    const ADMIN: &str = "weir_bench_admin";
    let api: std::net::SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let health: std::net::SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    fresh_stream(js, "DEPLOY_IN", "deploy.>").await?;
    fresh_stream(js, "BENCH_OUT", "bench.out").await?;
    let mut config = host_config(nats, url, artifacts);
    config.api.listen = Some(api);
    config.api.bootstrap_token = Some(weir_host::config::Secret(ADMIN.into()));
    config.api.requests_per_second = 100_000;
    let host = RunningHost::start(config.clone());
    eventually(Duration::from_secs(60), "the API", || async {
        Ok(http_get(api, "/v1/x").await.is_ok())
    })
    .await?;
    let auth = format!("Bearer {ADMIN}");
    let send = |method: &'static str, path: String, body: Vec<u8>, kind: &'static str| {
        let auth = auth.clone();
        async move {
            let response = http_request(
                api,
                method,
                &path,
                &[("Authorization", &auth), ("Content-Type", kind)],
                &body,
            )
            .await?;
            anyhow::ensure!(response.status < 300, "{method} {path}: {response:?}");
            response.json()
        }
    };
    let module = std::fs::read(component("passthrough")?)?;
    let client = async_nats::connect(nats.url()).await?;
    let mut outputs = client.subscribe("bench.out").await?;
    let mut latencies = Vec::new();
    for i in 0..7 {
        // A fresh module each time: the upload compiles it.
        let mut bytes = module.clone();
        append_custom_section(&mut bytes, &format!("bench-{i}-{}", std::process::id()));
        let digest = send("POST", "/v1/modules".into(), bytes, "application/wasm").await?;
        let digest = digest["digest"].as_str().context("digest")?.to_string();
        let uploaded = Instant::now();
        let path = format!("/v1/namespaces/bench/functions/d{i}");
        let binding = serde_json::json!({
            "stream": "DEPLOY_IN", "subject": format!("deploy.{i}"),
            "key": {"subject_token": 1}, "outputs": ["bench.out"],
        });
        send(
            "PUT",
            path.clone(),
            binding.to_string().into_bytes(),
            "application/json",
        )
        .await?;
        let version = serde_json::json!({"module": digest})
            .to_string()
            .into_bytes();
        send(
            "POST",
            format!("{path}/versions"),
            version,
            "application/json",
        )
        .await?;
        // The event is published right away; it is processed once the
        // host runs the new function.
        js.publish(format!("deploy.{i}"), "x".into()).await?.await?;
        tokio::time::timeout(Duration::from_secs(30), outputs.next())
            .await?
            .context("an output")?;
        latencies.push(uploaded.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "upload returned → first event processed (function bound, version made, host picks it up): median {:.1} ms, max {:.1} ms over {} deployments",
        median(&latencies),
        latencies.iter().copied().fold(0.0, f64::max),
        latencies.len()
    );

    // 50 deployed functions; then a new host starts with them all.
    for i in 0..50 {
        let path = format!("/v1/namespaces/fleet/functions/f{i}");
        let binding = serde_json::json!({
            "stream": "DEPLOY_IN", "subject": format!("deploy.fleet.{i}"),
            "key": {"subject_token": 2}, "outputs": ["bench.out"],
        });
        send(
            "PUT",
            path.clone(),
            binding.to_string().into_bytes(),
            "application/json",
        )
        .await?;
        let digest = hex_digest(&module);
        let version = serde_json::json!({"module": digest})
            .to_string()
            .into_bytes();
        if i == 0 {
            send(
                "POST",
                "/v1/modules".into(),
                module.clone(),
                "application/wasm",
            )
            .await?;
        }
        send(
            "POST",
            format!("{path}/versions"),
            version,
            "application/json",
        )
        .await?;
    }
    host.stop().await?;
    let mut starts = Vec::new();
    for _ in 0..3 {
        let mut config = config.clone();
        config.api.listen = None;
        config.health_listen = Some(health);
        let started = Instant::now();
        let host = RunningHost::start(config);
        eventually(Duration::from_secs(120), "57 functions running", || async {
            let Ok((200, body)) = http_get(health, "/status").await else {
                return Ok(false);
            };
            let status: serde_json::Value = serde_json::from_str(&body)?;
            Ok(status["functions"].as_array().map_or(0, Vec::len) >= 57)
        })
        .await?;
        starts.push(started.elapsed().as_secs_f64() * 1e3);
        host.stop().await?;
    }
    println!(
        "host start → 57 deployed functions running (artifacts cached): median {:.0} ms over {} starts",
        median(&starts),
        starts.len()
    );
    Ok(())
}

/// Appends a custom section (ignored by the runtime) so the bytes, and so
/// the digest, differ from every earlier upload.
fn append_custom_section(module: &mut Vec<u8>, name: &str) {
    let mut payload = Vec::new();
    payload.push(name.len() as u8);
    payload.extend_from_slice(name.as_bytes());
    module.push(0);
    module.push(payload.len() as u8);
    module.extend_from_slice(&payload);
}

fn hex_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A neighbour of the fast function in the isolation runs.
#[derive(Clone, Copy, Debug)]
enum Neighbour {
    Alone,
    /// Sleeps 20 ms in every call (waiting, not computing).
    Sleeper,
    /// Spins until its 100 ms deadline in every call.
    Looper {
        breaker: bool,
    },
}

impl Neighbour {
    fn label(self) -> &'static str {
        match self {
            Neighbour::Alone => "alone",
            Neighbour::Sleeper => "beside a sleeper",
            Neighbour::Looper { breaker: true } => "beside a looper (breaker on)",
            Neighbour::Looper { breaker: false } => "beside a looper (breaker off)",
        }
    }

    fn action(self) -> Option<serde_json::Value> {
        match self {
            Neighbour::Alone => None,
            Neighbour::Sleeper => Some(serde_json::json!({"do": "sleep", "ms": 20, "key": "n"})),
            Neighbour::Looper { .. } => Some(serde_json::json!({"do": "loop", "key": "n"})),
        }
    }
}

/// The fast function's backlog throughput and fixed-rate p99, alone and
/// beside each kind of neighbour, interleaved over the rounds.
async fn isolation(
    options: &Options,
    nats: &NatsServer,
    js: &jetstream::Context,
    url: &str,
    artifacts: &std::path::Path,
) -> Result<()> {
    let variants = [
        Neighbour::Alone,
        Neighbour::Sleeper,
        Neighbour::Looper { breaker: true },
        Neighbour::Looper { breaker: false },
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut p99s: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let events = options.events / 2;
    for round in 0..options.rounds {
        for (i, neighbour) in variants.iter().enumerate() {
            let (rate, histogram) =
                isolation_run(nats, js, url, artifacts, *neighbour, events, options).await?;
            let p99 = histogram.value_at_quantile(0.99) as f64 / 1000.0;
            println!(
                "isolation round {}: fast function {:<30} {rate:>8.0} ev/s, p99 {p99:.2} ms at {} ev/s",
                round + 1,
                neighbour.label(),
                options.rate / 2
            );
            rates[i].push(rate);
            p99s[i].push(p99);
        }
    }
    for (i, neighbour) in variants.iter().enumerate().skip(1) {
        let ratios: Vec<f64> = rates[i].iter().zip(&rates[0]).map(|(n, a)| n / a).collect();
        let p99_ratios: Vec<f64> = p99s[i].iter().zip(&p99s[0]).map(|(n, a)| n / a).collect();
        println!(
            "isolation: {} — throughput {:.0} ev/s ({:.2} of alone), p99 {:.2} ms ({:.2}× alone)",
            neighbour.label(),
            median(&rates[i]),
            median(&ratios),
            median(&p99s[i]),
            median(&p99_ratios)
        );
    }
    println!(
        "isolation: alone — throughput {:.0} ev/s, p99 {:.2} ms",
        median(&rates[0]),
        median(&p99s[0])
    );
    Ok(())
}

async fn isolation_run(
    nats: &NatsServer,
    js: &jetstream::Context,
    url: &str,
    artifacts: &std::path::Path,
    neighbour: Neighbour,
    events: usize,
    options: &Options,
) -> Result<(f64, Histogram<u64>)> {
    fresh_stream(js, "ISO_IN", "iso.in").await?;
    fresh_stream(js, "BENCH_OUT", "bench.out").await?;
    fresh_stream(js, "NEIGH_IN", "neigh.in").await?;
    fresh_stream(js, "FIXTURE_OUT", "fixture.out").await?;
    // The streams are new: so are the functions reading them (a progress
    // row of the old stream would be refused).
    forget_functions(url, &["iso", "neighbour"]).await?;
    let mut config = host_config(nats, url, artifacts);
    config.functions = vec![passthrough_function("iso", "ISO_IN", "iso.in")?];
    if let Some(action) = neighbour.action() {
        let payload = action.to_string().into_bytes();
        publish_all(js, "neigh.in", (0..20_000).map(|_| payload.clone())).await?;
        let mut spec = FunctionSpec {
            outputs: vec!["fixture.out".into()],
            batch_size: 10,
            ..FunctionSpec::new(
                "neighbour",
                component("misbehave")?,
                "NEIGH_IN",
                "neigh.in",
                KeySource::JsonPointer("/key".into()),
            )
        };
        spec.limits.deadline_ms = 100;
        spec.retry.max_attempts = 2;
        spec.breaker.enabled = matches!(neighbour, Neighbour::Looper { breaker: true });
        config.functions.push(spec);
    }
    let host = RunningHost::start(config);
    wait_for_consumer(js, "ISO_IN", "weir-iso").await?;
    // The neighbour runs for a while first (long enough for a looper's
    // breaker to trip: 20 calls of 100 ms).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let payload = vec![b'x'; 100];
    let started = Instant::now();
    publish_all(js, "iso.in", (0..events).map(|_| payload.clone())).await?;
    wait_for_len(js, "BENCH_OUT", events as u64).await?;
    let rate = events as f64 / started.elapsed().as_secs_f64();
    let histogram = measure_latency(nats, "iso.in", options.rate / 2, 5).await?;
    host.stop().await?;
    Ok((rate, histogram))
}

/// What epoch interruption costs a compute-bound guest: the same calls
/// timed on an engine with it and on one without, interleaved.
fn epoch_cost(options: &Options, artifacts: &std::path::Path) -> Result<()> {
    use weir_host::config::Limits;
    use weir_host::sandbox::{Event, FunctionInstance, InstanceSettings, Sandbox, SandboxConfig};
    let module = component("misbehave")?;
    let settings = InstanceSettings {
        function: "compute".into(),
        allowed_outputs: vec!["fixture.out".to_string()].into(),
        deadline: Duration::from_secs(60),
        limits: Limits::default(),
        max_record_bytes: 1 << 20,
        breaker: Default::default(),
    };
    let event = Event {
        subject: "compute".into(),
        key: "k".into(),
        payload: br#"{"do":"compute","n":20000000}"#.to_vec(),
        headers: Vec::new(),
        event_time_ms: 0,
        sequence: 1,
    };
    let mut instances = Vec::new();
    for epoch_interruption in [true, false] {
        let sandbox = Sandbox::new(&SandboxConfig {
            artifact_dir: artifacts.to_path_buf(),
            epoch_interruption,
            ..SandboxConfig::default()
        })?;
        let code = sandbox.load_file(&module)?;
        let mut instance = FunctionInstance::new(&code, &settings)?;
        instance.begin_batch(Default::default());
        instances.push((sandbox, instance));
    }
    let calls = 10;
    let mut on = Vec::new();
    let mut off = Vec::new();
    for _ in 0..options.rounds.max(3) {
        for (i, (_, instance)) in instances.iter_mut().enumerate() {
            let started = Instant::now();
            for _ in 0..calls {
                let invocation = instance.handle(&event, false);
                anyhow::ensure!(invocation.result.is_ok(), "{:?}", invocation.result.err());
            }
            let per_call = started.elapsed().as_secs_f64() * 1e3 / calls as f64;
            if i == 0 {
                on.push(per_call)
            } else {
                off.push(per_call)
            }
        }
    }
    let ratios: Vec<f64> = on.iter().zip(&off).map(|(a, b)| a / b).collect();
    println!(
        "epoch interruption on a compute-bound guest (20M rounds per call): {:.1} ms per call with it, {:.1} ms without; cost {:+.1} % (median of {} rounds)",
        median(&on),
        median(&off),
        (median(&ratios) - 1.0) * 100.0,
        ratios.len()
    );
    Ok(())
}

/// Passthrough with tracing off, at 1 % and at 100 % sampling, interleaved.
async fn tracing_overhead(
    options: &Options,
    nats: &NatsServer,
    js: &jetstream::Context,
    url: &str,
    artifacts: &std::path::Path,
    payload: &[u8],
) -> Result<()> {
    let receiver = otlp::OtlpReceiver::start().await?;
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut cpu: [Vec<f64>; 3] = Default::default();
    let settings = [None, Some(0.01), Some(1.0)];
    for round in 0..options.rounds {
        let mut line = format!("tracing round {}:", round + 1);
        for (i, ratio) in settings.iter().enumerate() {
            let tracing = ratio.map(|r| (receiver.endpoint(), r));
            let (rate, us) = weir_passthrough(
                nats,
                js,
                url,
                artifacts,
                PassRun {
                    round: 100 + round * 3 + i,
                    events: options.events,
                    payload,
                    tracing,
                },
            )
            .await?;
            let label = match ratio {
                None => "off".to_string(),
                Some(r) => format!("{:.0} %", r * 100.0),
            };
            line.push_str(&format!(" {label}: {rate:>8.0} ev/s ({us:.1} CPU-µs/ev) |"));
            rates[i].push(rate);
            cpu[i].push(us);
        }
        println!("{}", line.trim_end_matches(" |"));
    }
    let ratio = |i: usize| {
        let per_round: Vec<f64> = rates[i].iter().zip(&rates[0]).map(|(t, o)| t / o).collect();
        median(&per_round)
    };
    println!(
        "tracing: median off {:.0} ev/s, 1 % {:.0} ev/s (ratio {:.2}), 100 % {:.0} ev/s (ratio {:.2}); CPU-µs/ev off {:.1}, 1 % {:.1}, 100 % {:.1} (includes the in-process OTLP receiver); {} spans received",
        median(&rates[0]),
        median(&rates[1]),
        ratio(1),
        median(&rates[2]),
        ratio(2),
        median(&cpu[0]),
        median(&cpu[1]),
        median(&cpu[2]),
        receiver.spans().len()
    );
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// A durable pull consumer `name` of `stream` with Weir's batch size and
/// ack policy (explicit acks), as a stream of messages.
async fn pull_messages(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
) -> Result<consumer::pull::Stream> {
    let consumer: consumer::PullConsumer = js
        .get_stream(stream)
        .await?
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: (BATCH * 4) as i64,
            ..Default::default()
        })
        .await?;
    Ok(consumer
        .stream()
        .max_messages_per_batch(BATCH)
        .messages()
        .await?)
}

/// The next batch: waits for one message, then takes up to [`BATCH`] of
/// those already there, as Weir does.
async fn next_batch(messages: &mut consumer::pull::Stream) -> Result<Vec<jetstream::Message>> {
    let mut batch = Vec::with_capacity(BATCH);
    batch.push(messages.next().await.context("stream ended")??);
    while batch.len() < BATCH {
        match futures::FutureExt::now_or_never(messages.next()) {
            Some(Some(message)) => batch.push(message?),
            _ => break,
        }
    }
    Ok(batch)
}

/// Publishes `outputs` (message id, payload) to `subject`, waits for
/// every publish ack, then acks `batch`: outputs stored before their
/// inputs are acked, as Weir does.
async fn publish_then_ack(
    js: &jetstream::Context,
    subject: &str,
    outputs: Vec<(String, bytes::Bytes)>,
    batch: &[jetstream::Message],
) -> Result<()> {
    let mut acks = Vec::with_capacity(outputs.len());
    for (id, payload) in outputs {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        acks.push(
            js.publish_with_headers(subject.to_string(), headers, payload)
                .await?,
        );
    }
    for ack in acks {
        ack.into_future().await?;
    }
    for message in batch {
        message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

/// CPU time (user + system) of this process so far, from /proc.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 12th and 13th of them, in clock ticks of 1/100 s on Linux.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<u64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Deletes the state and progress of `functions`, as deleting the
/// functions would; nothing to do before the first host made the tables.
async fn forget_functions(url: &str, functions: &[&str]) -> Result<()> {
    let pool = sqlx::PgPool::connect(url).await?;
    let names: Vec<String> = functions.iter().map(|f| f.to_string()).collect();
    for table in ["weir_state", "weir_applied", "weir_progress", "weir_outbox"] {
        let sql = format!("DELETE FROM {table} WHERE function_name = ANY($1)");
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&names)
            .execute(&pool)
            .await;
    }
    Ok(())
}

async fn fresh_stream(js: &jetstream::Context, name: &str, subject: &str) -> Result<()> {
    let _ = js.delete_stream(name).await;
    ensure_stream(js, name, &[subject]).await
}

async fn wait_for_len(js: &jetstream::Context, stream: &str, n: u64) -> Result<()> {
    eventually(Duration::from_secs(600), stream, || async {
        Ok(stream_len(js, stream).await? >= n)
    })
    .await
}

async fn raw_consumer(
    js: &jetstream::Context,
    round: usize,
    events: usize,
    payload: &[u8],
) -> Result<f64> {
    let input = format!("RAW_IN_{round}");
    let in_subject = format!("raw.{round}.in");
    let out_subject = format!("raw.{round}.out");
    fresh_stream(js, &input, &in_subject).await?;
    fresh_stream(js, "RAW_OUT", "raw.*.out").await?;
    publish_all(js, &in_subject, (0..events).map(|_| payload.to_vec())).await?;

    let started = Instant::now();
    let mut messages = pull_messages(js, &input, "raw").await?;
    let mut done = 0;
    while done < events {
        let batch = next_batch(&mut messages).await?;
        let outputs = batch.iter().map(|message| {
            let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
            (format!("raw:{round}:{sequence}:0"), message.payload.clone())
        });
        publish_then_ack(js, &out_subject, outputs.collect(), &batch).await?;
        done += batch.len();
    }
    let elapsed = started.elapsed();
    Ok(events as f64 / elapsed.as_secs_f64())
}

fn passthrough_function(name: &str, stream: &str, subject: &str) -> Result<FunctionSpec> {
    Ok(FunctionSpec {
        outputs: vec!["bench.out".into()],
        batch_size: BATCH,
        ..FunctionSpec::new(
            name,
            component("passthrough")?,
            stream,
            subject,
            KeySource::SubjectToken(0),
        )
    })
}

/// One passthrough run: its stream suffix, backlog, and trace export
/// (endpoint and sampling ratio), if any.
struct PassRun<'a> {
    round: usize,
    events: usize,
    payload: &'a [u8],
    tracing: Option<(String, f64)>,
}

async fn weir_passthrough(
    nats: &NatsServer,
    js: &jetstream::Context,
    url: &str,
    artifacts: &std::path::Path,
    run: PassRun<'_>,
) -> Result<(f64, f64)> {
    let PassRun {
        round,
        events,
        payload,
        tracing,
    } = run;
    let input = format!("PASS_IN_{round}");
    let subject = format!("pass.{round}.in");
    fresh_stream(js, &input, &subject).await?;
    fresh_stream(js, "BENCH_OUT", "bench.out").await?;
    publish_all(js, &subject, (0..events).map(|_| payload.to_vec())).await?;

    let mut config = host_config(nats, url, artifacts);
    if let Some((endpoint, ratio)) = tracing {
        config.tracing.otlp_endpoint = Some(endpoint);
        config.tracing.sample_ratio = ratio;
    }
    config.functions = vec![passthrough_function(
        &format!("pass-{round}"),
        &input,
        &subject,
    )?];
    timed_run(config, events, || {
        wait_for_len(js, "BENCH_OUT", events as u64)
    })
    .await
}

/// Runs a host on `config` until `done` resolves: events/s, and the host's
/// CPU-µs per event (this process runs nothing else meanwhile).
async fn timed_run<F, Fut>(
    config: weir_host::config::HostConfig,
    events: usize,
    done: F,
) -> Result<(f64, f64)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let cpu = process_cpu();
    let started = Instant::now();
    let host = RunningHost::start(config);
    done().await?;
    let elapsed = started.elapsed();
    let cpu_used = process_cpu().saturating_sub(cpu);
    host.stop().await?;
    Ok((
        events as f64 / elapsed.as_secs_f64(),
        cpu_used.as_secs_f64() * 1e6 / events as f64,
    ))
}

async fn weir_fraud(
    nats: &NatsServer,
    js: &jetstream::Context,
    url: &str,
    pool: &sqlx::PgPool,
    artifacts: &std::path::Path,
    round: usize,
    events: usize,
) -> Result<(f64, f64)> {
    let module = component("fraud-velocity")?;
    let run = FraudRun {
        tag: &round.to_string(),
        module,
        events,
    };
    weir_fraud_with(nats, js, url, pool, artifacts, run).await
}

/// One run of the fraud workload: its streams and function are named by
/// `tag`, and `module` is the `fraud-velocity` build it runs.
struct FraudRun<'a> {
    tag: &'a str,
    module: std::path::PathBuf,
    events: usize,
}

/// Events/s and the host's CPU-µs per event of `run`, from a backlog
/// published beforehand until its last event is applied.
async fn weir_fraud_with(
    nats: &NatsServer,
    js: &jetstream::Context,
    url: &str,
    pool: &sqlx::PgPool,
    artifacts: &std::path::Path,
    run: FraudRun<'_>,
) -> Result<(f64, f64)> {
    let FraudRun {
        tag,
        module,
        events,
    } = run;
    let input = format!("FRAUD_IN_{}", tag.replace('-', "_"));
    let subject = format!("fraud.{tag}.in");
    fresh_stream(js, &input, &subject).await?;
    ensure_stream(js, "BENCH_ALERTS", &["alerts.velocity"]).await?;
    let base = 1_700_000_000_000i64;
    let payloads: Vec<Vec<u8>> = (0..events)
        .map(|i| {
            let card = (i * 7_919) % 10_000;
            serde_json::json!({"card": format!("card-{card}"), "amount_cents": 100 + i % 5_000, "ts": base + i as i64 * 50})
                .to_string()
                .into_bytes()
        })
        .collect();
    let sequences = publish_all(js, &subject, payloads).await?;
    let last = *sequences.last().unwrap_or(&0) as i64;
    let name = format!("fraud-{tag}");
    let mut config = host_config(nats, url, artifacts);
    config.functions = vec![FunctionSpec {
        event_time: TimeSource::JsonPointer("/ts".into()),
        outputs: vec!["alerts.velocity".into()],
        batch_size: BATCH,
        ..FunctionSpec::new(
            name.clone(),
            module,
            input,
            subject,
            KeySource::JsonPointer("/card".into()),
        )
    }];
    timed_until_applied(config, events, pool, &name, last).await
}

/// [`timed_run`] until function `name` has applied stream sequence `last`.
async fn timed_until_applied(
    config: weir_host::config::HostConfig,
    events: usize,
    pool: &sqlx::PgPool,
    name: &str,
    last: i64,
) -> Result<(f64, f64)> {
    timed_run(config, events, || {
        eventually(Duration::from_secs(900), "the backlog applied", || async {
            let applied: Option<i64> = sqlx::query_scalar(
                "SELECT applied_seq FROM weir_progress WHERE function_name = $1",
            )
            .bind(name)
            .fetch_optional(pool)
            .await?;
            Ok(applied.unwrap_or(0) >= last)
        })
    })
    .await
}

/// Kills a `weir serve` process while events flow at 1,000/s, restarts it at
/// once, and times kill → the first output of an event published after the
/// kill (the new process runs and has caught up with the gap).
async fn recovery(
    nats: &NatsServer,
    js: &jetstream::Context,
    url: &str,
    artifacts: &std::path::Path,
) -> Result<Vec<Duration>> {
    fresh_stream(js, "REC_IN", "rec.in").await?;
    fresh_stream(js, "BENCH_OUT", "bench.out").await?;
    let dir = tempdir::TempDir::new("weir-bench-recovery")?;
    let mut config = host_config(nats, url, artifacts);
    config.functions = vec![passthrough_function("recovery", "REC_IN", "rec.in")?];
    let client = async_nats::connect(nats.url()).await?;
    let mut outputs = client.subscribe("bench.out").await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let producer = {
        let js = js.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            while !stop.is_cancelled() {
                tick.tick().await;
                let mut headers = HeaderMap::new();
                headers.insert("Bench-Sent-Us", now_micros().to_string().as_str());
                js.publish_with_headers("rec.in", headers, vec![b'r'; 100].into())
                    .await?;
            }
            anyhow::Ok(())
        })
    };
    let mut host = weir_e2e::process::HostProcess::start(&config, dir.path(), &[])?;
    tokio::time::timeout(Duration::from_secs(30), outputs.next())
        .await
        .context("the first host never produced output")?;
    let mut recoveries = Vec::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        host.kill();
        let killed = Instant::now();
        let killed_us = now_micros();
        host = weir_e2e::process::HostProcess::start(&config, dir.path(), &[])?;
        // Recovered: an event published after the kill has come out, so the
        // new process runs and has caught up with the gap.
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), outputs.next())
                .await
                .context("the restarted host never produced output")?
                .context("output subscription closed")?;
            let sent_us: u64 = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Bench-Sent-Us"))
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(0);
            if sent_us > killed_us {
                break;
            }
        }
        recoveries.push(killed.elapsed());
    }
    stop.cancel();
    producer.await??;
    host.kill();
    Ok(recoveries)
}

/// Weir/passthrough fed at `rate` events/s for `seconds`; latency from just
/// before the publish to the output's arrival at a subscriber.
async fn latency(
    nats: &NatsServer,
    js: &jetstream::Context,
    url: &str,
    artifacts: &std::path::Path,
    rate: u64,
    seconds: u64,
) -> Result<Histogram<u64>> {
    fresh_stream(js, "LAT_IN", "lat.in").await?;
    fresh_stream(js, "BENCH_OUT", "bench.out").await?;
    let mut config = host_config(nats, url, artifacts);
    config.functions = vec![passthrough_function("latency", "LAT_IN", "lat.in")?];
    let host = RunningHost::start(config);
    // Let the host bind its consumer before the clock starts.
    wait_for_consumer(js, "LAT_IN", "weir-latency").await?;

    let histogram = measure_latency(nats, "lat.in", rate, seconds).await?;
    host.stop().await?;
    Ok(histogram)
}

/// Publishes to `subject` at `rate` for `seconds` and times each event until
/// its output shows up on `bench.out`.
async fn measure_latency(
    nats: &NatsServer,
    subject: &str,
    rate: u64,
    seconds: u64,
) -> Result<Histogram<u64>> {
    let client = async_nats::connect(nats.url()).await?;
    let mut outputs = client.subscribe("bench.out").await?;
    let total = rate * seconds;
    let receiver = tokio::spawn(async move {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut received = 0;
        while received < total {
            let Ok(Some(message)) =
                tokio::time::timeout(Duration::from_secs(30), outputs.next()).await
            else {
                break;
            };
            let sent_us: u64 = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Bench-Sent-Us"))
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(0);
            let now_us = now_micros();
            histogram.record(now_us.saturating_sub(sent_us).max(1))?;
            received += 1;
        }
        anyhow::Ok(histogram)
    });

    let publisher = jetstream::new(client);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let mut headers = HeaderMap::new();
        headers.insert("Bench-Sent-Us", now_micros().to_string().as_str());
        pending.push(
            publisher
                .publish_with_headers(subject.to_string(), headers, vec![b'x'; 100].into())
                .await?,
        );
        if pending.len() >= 256 {
            for ack in pending.drain(..) {
                ack.into_future().await?;
            }
        }
    }
    for ack in pending {
        ack.into_future().await?;
    }
    receiver.await?
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
