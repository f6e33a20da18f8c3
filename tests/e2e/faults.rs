//! Fault injection, counted against an oracle: the host SIGKILLed at random
//! and at each named crash point, nats-server killed and paused, Postgres
//! connections terminated, and a TCP proxy adding latency, blackholes,
//! refusals and resets. Every run must end with 0 lost, 0 applied twice,
//! exact sums, every output exactly once, and dead letters = poison.
//!
//! `WEIR_FAULTS_SCALE=10` multiplies events and faults (the `--long` runs
//! recorded in docs/reliability.md).

use std::collections::{BTreeMap, BTreeSet};
use std::future::IntoFuture;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::HeaderMap;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::process::{HostProcess, log_tail, signal};
use weir_e2e::proxy::{Fault, FaultProxy};
use weir_e2e::*;
use weir_host::config::{FunctionSpec, HostConfig, KeySource};
use weir_host::crash::CrashPoint;

fn scale() -> usize {
    std::env::var("WEIR_FAULTS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// One published input, as JetStream acknowledged it.
#[derive(Debug, Clone)]
pub struct Input {
    id: u64,
    key: String,
    value: u64,
    poison: bool,
}

impl Input {
    /// Whether the counter function rejects it (one dead letter).
    pub fn poison(&self) -> bool {
        self.poison
    }
}

/// `keys` × `per_key` inputs with unique ids; every 997th is poison.
pub fn inputs(keys: usize, per_key: usize) -> Vec<Input> {
    let mut rng = crate::fraud::Lcg::new(99);
    (0..keys * per_key)
        .map(|i| Input {
            id: i as u64,
            key: format!("k{}", rng.below(keys as u64)),
            value: 1 + rng.below(1_000),
            poison: i % 997 == 500,
        })
        .collect()
}

/// Publishes every input with `Nats-Msg-Id = in-<id>`, retrying a chunk
/// until JetStream acknowledges all of it (the id makes retries harmless),
/// pacing chunks so that faults land mid-stream. A connection that keeps
/// failing is replaced: the producer must outlast any fault the test injects.
pub async fn produce(nats_url: String, inputs: Vec<Input>) -> Result<()> {
    let connect = || async {
        anyhow::Ok(async_nats::jetstream::new(
            async_nats::connect(nats_url.as_str()).await?,
        ))
    };
    let mut js = connect().await?;
    for chunk in inputs.chunks(200) {
        let mut failures = 0;
        while !publish_chunk(&js, chunk).await {
            failures += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            if failures % 5 == 0
                && let Ok(Ok(fresh)) = tokio::time::timeout(Duration::from_secs(5), connect()).await
            {
                js = fresh;
            }
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    Ok(())
}

/// Whether JetStream acknowledged every input of `chunk` within 5 s.
async fn publish_chunk(js: &async_nats::jetstream::Context, chunk: &[Input]) -> bool {
    let publish = async {
        let mut acks = Vec::with_capacity(chunk.len());
        for input in chunk {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("in-{}", input.id).as_str());
            let payload = serde_json::json!({
                "key": input.key, "id": input.id, "value": input.value, "poison": input.poison,
            })
            .to_string();
            acks.push(
                js.publish_with_headers("counter.in", headers, payload.into())
                    .await?,
            );
        }
        for ack in acks {
            ack.into_future().await?;
        }
        anyhow::Ok(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), publish).await,
        Ok(Ok(()))
    )
}

pub fn counter_config(stack: &Stack, nats_url: String, database_url: String) -> Result<HostConfig> {
    let counter = FunctionSpec {
        outputs: vec!["counter.out".into()],
        batch_size: 100,
        // A killed host's batch comes back this fast.
        ack_wait_ms: 1_000,
        ..FunctionSpec::new(
            "counter",
            component("counter")?,
            "COUNTER_IN",
            "counter.in",
            KeySource::JsonPointer("/key".into()),
        )
    };
    let mut config = stack.config(
        vec![input_stream(), stream("COUNTER_OUT", &["counter.out"])],
        vec![counter],
    );
    config.nats_url = nats_url;
    config.database_url = database_url;
    Ok(config)
}

fn input_stream() -> weir_host::config::StreamSpec {
    weir_host::config::StreamSpec {
        // Long enough to cover every producer retry of a run.
        duplicate_window_secs: 600,
        ..stream("COUNTER_IN", &["counter.in"])
    }
}

/// Creates the streams the way the host would, so the producer can start
/// before any host runs.
pub async fn create_streams(stack: &Stack) -> Result<()> {
    let spec = input_stream();
    stack
        .js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: spec.name,
            subjects: spec.subjects,
            duplicate_window: Duration::from_secs(spec.duplicate_window_secs),
            ..Default::default()
        })
        .await?;
    ensure_stream(&stack.js, "COUNTER_OUT", &["counter.out"]).await
}

/// Waits until every good input is counted and every output and dead letter
/// is stored, then checks the oracle exactly.
pub async fn verify(stack: &Stack, inputs: &[Input]) -> Result<()> {
    let good: Vec<&Input> = inputs.iter().filter(|i| !i.poison).collect();
    let poison: BTreeSet<u64> = inputs.iter().filter(|i| i.poison).map(|i| i.id).collect();
    let mut expected: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for input in &good {
        let entry = expected.entry(input.key.clone()).or_default();
        entry.0 += 1;
        entry.1 += input.value;
    }
    let pool = stack.pool().await?;
    let counted = || async {
        let total: Option<i64> = sqlx::query_scalar(
            "SELECT sum(convert_from(value, 'UTF8')::bigint)::bigint FROM weir_state
             WHERE function_name = 'counter' AND name = 'count'",
        )
        .fetch_one(&pool)
        .await?;
        anyhow::Ok(total.unwrap_or(0) as usize)
    };
    let progress = || async {
        anyhow::Ok((
            counted().await?,
            stream_len(&stack.js, "COUNTER_OUT").await?,
            stream_len(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await?,
        ))
    };
    let drained = eventually(Duration::from_secs(120), "the backlog to drain", || async {
        let (counted, outputs, dead) = progress().await?;
        Ok(counted >= good.len() && outputs >= good.len() as u64 && dead >= poison.len() as u64)
    })
    .await;
    if let Err(error) = drained {
        let (counted, outputs, dead) = progress().await?;
        anyhow::bail!(
            "{error}: counted {counted} of {}, outputs {outputs}, dead letters {dead} of {}",
            good.len(),
            poison.len()
        );
    }

    let rows: Vec<(String, String, Vec<u8>)> =
        sqlx::query_as("SELECT key, name, value FROM weir_state WHERE function_name = 'counter'")
            .fetch_all(&pool)
            .await?;
    let mut stored: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (key, name, value) in rows {
        let value: u64 = serde_json::from_slice(&value)?;
        let entry = stored.entry(key).or_default();
        match name.as_str() {
            "count" => entry.0 = value,
            "sum" => entry.1 = value,
            other => anyhow::bail!("unexpected state entry {other}"),
        }
    }
    let lost_or_doubled: Vec<_> = expected
        .iter()
        .filter(|(key, want)| stored.get(*key) != Some(want))
        .map(|(key, want)| (key.clone(), *want, stored.get(key).copied()))
        .take(5)
        .collect();
    assert!(
        lost_or_doubled.is_empty(),
        "per-key (count, sum) differ from the oracle (key, expected, stored): {lost_or_doubled:?}"
    );
    assert_eq!(stored.len(), expected.len());

    let outputs = read_stream(&stack.js, "COUNTER_OUT").await?;
    let mut ids = BTreeSet::new();
    for message in &outputs {
        let output: serde_json::Value = serde_json::from_slice(&message.payload)?;
        let id = output["id"].as_u64().context("output id")?;
        assert!(ids.insert(id), "output of input {id} stored twice");
    }
    let expected_ids: BTreeSet<u64> = good.iter().map(|i| i.id).collect();
    assert_eq!(ids, expected_ids, "every output exactly once");

    let dead = read_stream(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await?;
    let dead_ids: Vec<u64> = dead
        .iter()
        .map(|m| {
            let input: serde_json::Value = serde_json::from_slice(&m.payload)?;
            input["id"].as_u64().context("dead letter id")
        })
        .collect::<Result<_>>()?;
    assert_eq!(
        dead_ids.len(),
        poison.len(),
        "each poison event dead-lettered once"
    );
    assert_eq!(dead_ids.into_iter().collect::<BTreeSet<_>>(), poison);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn host_killed_at_random_and_at_every_crash_point(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let dir = tempdir::TempDir::new("weir-faults")?;
    let config = counter_config(&stack, stack.nats.url(), stack.database_url.clone())?;
    create_streams(&stack).await?;
    let inputs = inputs(100, 100 * scale());
    let producer = tokio::spawn(produce(stack.nats.url(), inputs.clone()));

    let mut rng = crate::fraud::Lcg::new(5);
    // Each named crash point, twice, at an unpredictable batch, while the
    // producer is still publishing.
    let mut host = HostProcess::start(&config, dir.path(), &[])?;
    let crash_points = CrashPoint::ALL
        .iter()
        .cycle()
        .take(CrashPoint::ALL.len() * 2 * scale());
    for point in crash_points {
        host.kill();
        let after = (1 + rng.below(5)).to_string();
        host = HostProcess::start(
            &config,
            dir.path(),
            &[
                ("WEIR_CRASH_POINT", point.name().to_string()),
                ("WEIR_CRASH_AFTER", after),
            ],
        )?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !host.has_exited() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the host never reached crash point {}",
                point.name()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Then random SIGKILLs while the host works.
    for _ in 0..20 * scale() {
        host = HostProcess::start(&config, dir.path(), &[])?;
        tokio::time::sleep(Duration::from_millis(100 + rng.below(300))).await;
        host.kill();
    }
    host = HostProcess::start(&config, dir.path(), &[])?;
    producer.await??;
    verify(&stack, &inputs)
        .await
        .map_err(|e| e.context(log_tail(dir.path(), 60)))?;
    host.kill();
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn nats_killed_and_paused(_pool: PgPoolOptions, db: PgConnectOptions) -> Result<()> {
    let mut stack = Stack::start(&db).await?;
    let dir = tempdir::TempDir::new("weir-faults")?;
    let config = counter_config(&stack, stack.nats.url(), stack.database_url.clone())?;
    create_streams(&stack).await?;
    let inputs = inputs(100, 100 * scale());
    let producer = tokio::spawn(produce(stack.nats.url(), inputs.clone()));
    let host = HostProcess::start(&config, dir.path(), &[])?;

    for round in 0..5 * scale() {
        tokio::time::sleep(Duration::from_millis(400)).await;
        stack.nats.restart()?;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let pid = stack.nats.pid().context("nats-server is running")?;
        signal(pid, "STOP")?;
        tokio::time::sleep(Duration::from_millis(300 + 100 * (round as u64 % 3))).await;
        signal(pid, "CONT")?;
    }
    producer.await??;
    // Read the results on a connection that did not live through the faults.
    stack.js = stack.nats.jetstream().await?;
    verify(&stack, &inputs)
        .await
        .map_err(|e| e.context(log_tail(dir.path(), 60)))?;
    drop(host);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn postgres_connections_terminated(_pool: PgPoolOptions, db: PgConnectOptions) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let dir = tempdir::TempDir::new("weir-faults")?;
    let config = counter_config(&stack, stack.nats.url(), stack.database_url.clone())?;
    create_streams(&stack).await?;
    let inputs = inputs(100, 100 * scale());
    let producer = tokio::spawn(produce(stack.nats.url(), inputs.clone()));
    let host = HostProcess::start(&config, dir.path(), &[])?;

    let admin = sqlx::PgPool::connect(&stack.database_url).await?;
    let database = db.get_database().unwrap_or_default().to_string();
    for _ in 0..5 * scale() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&database)
        .execute(&admin)
        .await?;
    }
    producer.await??;
    verify(&stack, &inputs)
        .await
        .map_err(|e| e.context(log_tail(dir.path(), 60)))?;
    drop(host);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn latency_blackholes_and_resets_between_host_and_services(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let dir = tempdir::TempDir::new("weir-faults")?;
    let nats_proxy = FaultProxy::start(stack.nats.address()).await?;
    let postgres_proxy = FaultProxy::start(([127, 0, 0, 1], db.get_port()).into()).await?;
    let database_url = stack.database_url_via(&db, postgres_proxy.address().port());
    let config = counter_config(
        &stack,
        format!("nats://{}", nats_proxy.address()),
        database_url,
    )?;
    create_streams(&stack).await?;
    let inputs = inputs(100, 100 * scale());
    let producer = tokio::spawn(produce(stack.nats.url(), inputs.clone()));
    let host = HostProcess::start(&config, dir.path(), &[])?;

    let pause = || tokio::time::sleep(Duration::from_millis(700));
    for _ in 0..scale() {
        for proxy in [&nats_proxy, &postgres_proxy] {
            proxy.set(Fault::Latency(Duration::from_millis(20)));
            pause().await;
            proxy.set(Fault::Blackhole);
            pause().await;
            proxy.set(Fault::None);
            pause().await;
            proxy.reset();
            proxy.set(Fault::Refuse);
            pause().await;
            proxy.set(Fault::None);
            pause().await;
        }
    }
    producer.await??;
    verify(&stack, &inputs)
        .await
        .map_err(|e| e.context(log_tail(dir.path(), 60)))?;
    drop(host);
    Ok(())
}
