//! `weir dev`: the local stack in one process. Uses the NATS server on
//! 127.0.0.1:4222 (or starts one with a store under `target/weir-dev`),
//! creates the `weir_dev` database, deploys the example functions, generates
//! orders, card transactions and sensor readings, and prints what flows out.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use clap::Args;
use tokio_util::sync::CancellationToken;
use weir_host::config::{FunctionSpec, HostConfig, KeySource, StreamSpec, TimeSource};
use weir_host::control::StaticFunctions;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Events per second the generator publishes (orders and card
    /// transactions together).
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Stop after this many seconds; runs until Ctrl-C when absent.
    #[arg(long)]
    seconds: Option<u64>,
    /// Postgres server (the `weir_dev` database is created on it).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    postgres: String,
    /// NATS server; started here when nothing listens on it.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Directory of the built components.
    #[arg(long, default_value = "target/wasm32-wasip2/component")]
    components: PathBuf,
    /// Export traces to this OTLP/HTTP endpoint, e.g. a local Jaeger's
    /// `http://127.0.0.1:4318`.
    #[arg(long, env = "WEIR_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Serve /healthz, /readyz and /metrics here.
    #[arg(long, default_value = "127.0.0.1:9464")]
    health_listen: std::net::SocketAddr,
}

pub async fn run(mut args: DevArgs) -> Result<()> {
    let (nats_url, _nats) = ensure_nats(&args.nats).await?;
    args.nats = nats_url;
    let database_url = ensure_database(&args.postgres, "weir_dev").await?;
    let config = dev_config(&args, database_url.clone())?;
    let shutdown = weir_host::shutdown::on_signal();
    if let Some(seconds) = args.seconds {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            stop.cancel();
        });
    }
    let host = tokio::spawn(weir_host::serve::serve(
        config.clone(),
        StaticFunctions(config.functions.clone()),
        shutdown.clone(),
    ));
    let client = async_nats::connect(args.nats.as_str()).await?;
    let js = jetstream::new(client);
    wait_for_streams(&js, &shutdown).await?;
    println!(
        "metrics at http://{}/metrics; guest log lines: `weir fn logs enrich --follow`; traces: {}",
        args.health_listen,
        match &args.otlp_endpoint {
            Some(endpoint) => format!("exported to {endpoint}"),
            None => "off (pass --otlp-endpoint http://127.0.0.1:4318 for a local Jaeger)".into(),
        }
    );
    let generator = tokio::spawn(generate(js.clone(), args.rate, shutdown.clone()));
    let pool = sqlx::PgPool::connect(&database_url).await?;
    report(&js, &pool, &shutdown).await;
    generator.await??;
    host.await??;
    Ok(())
}

/// A child nats-server, killed when dropped.
struct OwnedNats(Child);

impl Drop for OwnedNats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The NATS server to use: the one at `url` if it is 2.10 or newer, else
/// one started here (on `url`'s port if free, else on the next free one).
async fn ensure_nats(url: &str) -> Result<(String, Option<OwnedNats>)> {
    let address = url.trim_start_matches("nats://");
    if std::net::TcpStream::connect(address).is_ok() {
        let version = match async_nats::connect(url).await {
            Ok(client) => client.server_info().version,
            Err(_) => String::new(),
        };
        if is_current(&version) {
            println!("using the NATS server at {url} ({version})");
            return Ok((url.to_string(), None));
        }
        let port = (4223..4300)
            .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
            .context("no free port for a nats-server")?;
        println!(
            "the NATS server at {url} is {version}, older than 2.10 (it crawls after crashes); starting one of its own on port {port}"
        );
        let own = format!("127.0.0.1:{port}");
        let child = start_nats(&own)?;
        return Ok((format!("nats://{own}"), Some(child)));
    }
    Ok((url.to_string(), Some(start_nats(address)?)))
}

/// Whether a nats-server version is 2.10 or newer.
fn is_current(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 10)
}

fn start_nats(address: &str) -> Result<OwnedNats> {
    let port = address.rsplit(':').next().unwrap_or("4222");
    let store = Path::new("target/weir-dev/nats");
    std::fs::create_dir_all(store)?;
    println!(
        "starting nats-server on port {port} (store {})",
        store.display()
    );
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", port, "-js", "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nats-server (run scripts/ensure-services.sh to install it)")?;
    let owned = OwnedNats(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(address).is_err() {
        if Instant::now() > deadline {
            bail!("nats-server did not start on {address}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(owned)
}

async fn ensure_database(server: &str, name: &str) -> Result<String> {
    let server = server.trim_end_matches('/');
    let admin = sqlx::PgPool::connect(&format!("{server}/postgres"))
        .await
        .with_context(|| format!("connecting to Postgres at {server}"))?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&admin)
            .await?;
    if !exists {
        // Database names cannot be bound as parameters; `name` is ours.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
        println!("created database {name}");
    }
    Ok(format!("{server}/{name}"))
}

fn dev_config(args: &DevArgs, database_url: String) -> Result<HostConfig> {
    let module = |crate_name: &str| -> Result<PathBuf> {
        let path = args
            .components
            .join(format!("{}.wasm", crate_name.replace('-', "_")));
        if !path.exists() {
            bail!(
                "{} is missing: build the examples with `cargo xtask build-components`",
                path.display()
            );
        }
        Ok(path)
    };
    let stream = |name: &str, subject: &str| StreamSpec {
        name: name.into(),
        subjects: vec![subject.into()],
        duplicate_window_secs: 120,
    };
    Ok(HostConfig {
        nats_url: args.nats.clone(),
        database_url,
        artifact_dir: PathBuf::from("target/weir-dev/artifacts"),
        streams: vec![
            stream("DEV_ORDERS", "orders.created"),
            stream("DEV_ENRICHED", "orders.enriched"),
            stream("DEV_CARDS", "cards.tx"),
            stream("DEV_ALERTS", "alerts.velocity"),
            stream("DEV_READINGS", "sensors.readings"),
            stream("DEV_AVERAGES", "sensors.average"),
        ],
        functions: vec![
            FunctionSpec {
                outputs: vec!["orders.enriched".into()],
                ..FunctionSpec::new(
                    "enrich",
                    module("enrich")?,
                    "DEV_ORDERS",
                    "orders.created",
                    KeySource::JsonPointer("/order_id".into()),
                )
            },
            FunctionSpec {
                event_time: TimeSource::JsonPointer("/ts".into()),
                outputs: vec!["alerts.velocity".into()],
                ..FunctionSpec::new(
                    "fraud-velocity",
                    module("fraud-velocity")?,
                    "DEV_CARDS",
                    "cards.tx",
                    KeySource::JsonPointer("/card".into()),
                )
            },
            // Windows of 10 s here (the example's docs say a minute), so
            // that averages show up within a short run.
            FunctionSpec {
                event_time: TimeSource::JsonPointer("/ts".into()),
                outputs: vec!["sensors.average".into()],
                window: Some(weir_host::windows::WindowSettings {
                    kind: weir_host::windows::WindowKind::Tumbling { size_ms: 10_000 },
                    out_of_orderness_ms: 1_000,
                    allowed_lateness_ms: 0,
                    idle_timeout_ms: 5_000,
                    late_subject: None,
                }),
                ..FunctionSpec::new(
                    "sensor-average",
                    module("sensor-average")?,
                    "DEV_READINGS",
                    "sensors.readings",
                    KeySource::JsonPointer("/sensor".into()),
                )
            },
        ],
        tracing: weir_host::config::TracingConfig {
            otlp_endpoint: args.otlp_endpoint.clone(),
            ..Default::default()
        },
        health_listen: Some(args.health_listen),
        ..HostConfig::default()
    })
}

async fn wait_for_streams(js: &jetstream::Context, shutdown: &CancellationToken) -> Result<()> {
    while js.get_stream("DEV_AVERAGES").await.is_err() {
        if shutdown.is_cancelled() {
            bail!("stopped before the host was ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Publishes orders (one in a hundred malformed) and card transactions
/// (bursty, so some cards trip the velocity rule) at `rate` per second,
/// and a reading of each of five sensors per second.
async fn generate(js: jetstream::Context, rate: u32, shutdown: CancellationToken) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let per_tick = (rate / 10).max(1) as u64;
    let mut n: u64 = 0;
    let mut ticks: u64 = 0;
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    while !shutdown.is_cancelled() {
        tick.tick().await;
        for _ in 0..per_tick {
            n += 1;
            let (subject, payload) = if n.is_multiple_of(3) {
                let payload = if n.is_multiple_of(300) {
                    format!("{{broken order {n}")
                } else {
                    serde_json::json!({
                        "order_id": format!("order-{n}"),
                        "items": [{"sku": "widget", "qty": 1 + n % 4, "price_cents": 1999}],
                    })
                    .to_string()
                };
                ("orders.created", payload)
            } else {
                // 50 cards, one transaction every ~17 s of event time each;
                // now and then one card has a burst that trips the rule.
                let card = if n % 1_000 < 40 { 7 } else { n % 50 };
                let ts = started_ms + n as i64 * 1_000 / 3;
                let payload = serde_json::json!({
                    "card": format!("card-{card:02}"),
                    "amount_cents": 100 + n % 9_000,
                    "ts": ts,
                })
                .to_string();
                ("cards.tx", payload)
            };
            let ack = js.publish(subject, payload.into()).await?;
            std::future::IntoFuture::into_future(ack).await?;
        }
        ticks += 1;
        if ticks.is_multiple_of(10) {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as i64;
            for sensor in 0..5u64 {
                let celsius = 18.0 + sensor as f64 + ((ticks / 10 + sensor) % 7) as f64 * 0.5;
                let payload = serde_json::json!({
                    "sensor": format!("sensor-{sensor}"),
                    "ts": now_ms,
                    "celsius": celsius,
                });
                let ack = js
                    .publish("sensors.readings", payload.to_string().into())
                    .await?;
                std::future::IntoFuture::into_future(ack).await?;
            }
        }
    }
    Ok(())
}

async fn report(js: &jetstream::Context, pool: &sqlx::PgPool, shutdown: &CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let count = |stream: &'static str| {
            let js = js.clone();
            async move {
                match js.get_stream(stream).await {
                    Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
                    Err(_) => 0,
                }
            }
        };
        let top: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT key, value FROM weir_state WHERE function_name = 'fraud-velocity' AND name = 'count'
             ORDER BY length(value) DESC, value DESC LIMIT 3",
        )
        .fetch_all(pool)
        .await
        .unwrap_or_default();
        let top: Vec<String> = top
            .into_iter()
            .map(|(card, count)| format!("{card}={}", String::from_utf8_lossy(&count)))
            .collect();
        println!(
            "orders in {:>6} | enriched {:>6} | card txs {:>6} | velocity alerts {:>5} | sensor averages {:>4} | dead letters {:>4} | busiest cards {}",
            count("DEV_ORDERS").await,
            count("DEV_ENRICHED").await,
            count("DEV_CARDS").await,
            count("DEV_ALERTS").await,
            count("DEV_AVERAGES").await,
            count(weir_host::serve::DEAD_LETTER_STREAM).await,
            top.join(" "),
        );
    }
}

#[cfg(test)]
mod nats_version_tests {
    use super::is_current;

    #[test]
    fn only_2_10_and_newer_are_current() {
        assert!(is_current("2.10.0"));
        assert!(is_current("2.15.1"));
        assert!(is_current("3.0.0"));
        assert!(!is_current("2.9.10"));
        assert!(!is_current(""));
    }
}
