//! The data-path protocol under the faults that broke it before: a graceful
//! stop while committed outputs cannot be published, a second host on the
//! same function with the owner paused past its lease, and a consumer
//! deleted after its applied sequences were pruned. Each is counted against
//! the oracle of the fault suites: exact per-key counts and sums, every
//! output stored exactly once by id, dead letters = poison.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::process::{HostProcess, signal};
use weir_e2e::*;

use crate::faults::{counter_config, create_streams, inputs, produce, verify};

/// Waits until `dir/weir.log` holds a line with `text`; fails with the
/// log's tail.
pub(crate) async fn logged(dir: &Path, text: &str, limit: Duration) -> Result<()> {
    let path = dir.join("weir.log");
    eventually(limit, &format!("the host to log `{text}`"), || async {
        Ok(std::fs::read_to_string(&path)
            .unwrap_or_default()
            .contains(text))
    })
    .await
    .map_err(|e| e.context(weir_e2e::process::log_tail(dir, 30)))
}

/// Events the counter function has applied so far (0 before the host has
/// made its tables).
async fn counted(pool: &sqlx::PgPool) -> Result<u64> {
    let total: Option<i64> = sqlx::query_scalar(
        "SELECT sum(convert_from(value, 'UTF8')::bigint)::bigint FROM weir_state
         WHERE function_name = 'counter' AND name = 'count'",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(None);
    Ok(total.unwrap_or(0).max(0) as u64)
}

/// Points the output stream away from `counter.out` (publishes to it find
/// no stream: an outage) or back.
async fn output_stream_captures(stack: &Stack, subject: &str) -> Result<()> {
    let mut stream = stack.js.get_stream("COUNTER_OUT").await?;
    let mut config = stream.info().await?.config.clone();
    config.subjects = vec![subject.to_string()];
    stack.js.update_stream(config).await?;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn graceful_stop_while_committed_outputs_cannot_be_published_loses_none(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let pool = stack.pool().await?;
    let dir = tempdir::TempDir::new("weir-protocol")?;
    let config = counter_config(&stack, stack.nats.url(), stack.database_url.clone())?;
    create_streams(&stack).await?;
    let inputs = inputs(20, 20);
    let (first, second) = inputs.split_at(inputs.len() / 2);

    let host = HostProcess::start(&config, dir.path(), &[])?;
    produce(stack.nats.url(), first.to_vec()).await?;
    eventually(Duration::from_secs(60), "the first half", || async {
        Ok(counted(&pool).await? >= first.iter().filter(|i| !i.poison()).count() as u64)
    })
    .await?;
    // The outputs have nowhere to go; the next batch commits and then
    // cannot publish.
    output_stream_captures(&stack, "counter.elsewhere").await?;
    produce(stack.nats.url(), second.to_vec()).await?;
    logged(
        dir.path(),
        "publishing committed outputs failed",
        Duration::from_secs(60),
    )
    .await?;
    signal(host.pid(), "TERM")?;
    let mut host = host;
    eventually(Duration::from_secs(30), "the host to stop", || {
        let exited = host.has_exited();
        async move { Ok(exited) }
    })
    .await?;

    output_stream_captures(&stack, "counter.out").await?;
    let host = HostProcess::start(&config, dir.path(), &[])?;
    verify(&stack, &inputs).await?;
    drop(host);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_second_host_stands_by_and_a_paused_owner_is_fenced(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let pool = stack.pool().await?;
    let first_dir = tempdir::TempDir::new("weir-owner-a")?;
    let second_dir = tempdir::TempDir::new("weir-owner-b")?;
    let config = counter_config(&stack, stack.nats.url(), stack.database_url.clone())?;
    create_streams(&stack).await?;
    let inputs = inputs(100, 40);
    let producer = tokio::spawn(produce(stack.nats.url(), inputs.clone()));

    let first = HostProcess::start(&config, first_dir.path(), &[])?;
    eventually(
        Duration::from_secs(60),
        "the first host to count",
        || async { Ok(counted(&pool).await? > 100) },
    )
    .await?;
    let second = HostProcess::start(&config, second_dir.path(), &[])?;
    logged(
        second_dir.path(),
        "another host owns the function",
        Duration::from_secs(60),
    )
    .await?;

    // The owner stops dead (a long GC pause, a frozen VM) past its lease,
    // with a batch in hand; the standby takes over.
    signal(first.pid(), "STOP")?;
    logged(
        second_dir.path(),
        "took over the function",
        Duration::from_secs(60),
    )
    .await?;
    let at_takeover = counted(&pool).await?;
    eventually(
        Duration::from_secs(60),
        "the second host to count",
        || async { Ok(counted(&pool).await? > at_takeover + 100) },
    )
    .await?;
    // The old owner wakes up beside the new one: it must not commit.
    signal(first.pid(), "CONT")?;
    logged(
        first_dir.path(),
        "lost ownership of the function",
        Duration::from_secs(60),
    )
    .await?;
    producer.await??;
    verify(&stack, &inputs).await?;
    drop((first, second));
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_consumer_deleted_after_pruning_is_recreated_where_the_function_was(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let pool = stack.pool().await?;
    let dir = tempdir::TempDir::new("weir-consumer")?;
    let mut config = counter_config(&stack, stack.nats.url(), stack.database_url.clone())?;
    // Batches of one: enough batches that applied sequences are pruned
    // while the stream flows for more than the prune lag (60 s).
    config.functions[0].batch_size = 1;
    create_streams(&stack).await?;
    let inputs = inputs(20, 150);
    let host = HostProcess::start(&config, dir.path(), &[])?;
    for chunk in inputs.chunks(200) {
        produce(stack.nats.url(), chunk.to_vec()).await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let good = inputs.iter().filter(|i| !i.poison()).count() as u64;
    // Pruned: fewer applied rows than events applied.
    let pruned = || async {
        let rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM weir_applied WHERE function_name = 'counter'")
                .fetch_one(&pool)
                .await
                .unwrap_or(i64::MAX);
        anyhow::Ok(counted(&pool).await? > 0 && (rows as u64) < counted(&pool).await?)
    };
    eventually(
        Duration::from_secs(120),
        "applied sequences to be pruned",
        || async { pruned().await },
    )
    .await?;
    eventually(Duration::from_secs(120), "every event", || async {
        Ok(counted(&pool).await? >= good)
    })
    .await?;
    signal(host.pid(), "TERM")?;
    let mut host = host;
    eventually(Duration::from_secs(30), "the host to stop", || {
        let exited = host.has_exited();
        async move { Ok(exited) }
    })
    .await?;

    // The durable consumer is lost (deleted by hand, a stream restored
    // from backup without it): the function must not start over.
    let stream = stack.js.get_stream("COUNTER_IN").await?;
    stream
        .delete_consumer("weir-counter")
        .await
        .context("deleting the consumer")?;
    let host = HostProcess::start(&config, dir.path(), &[])?;
    wait_for_consumer(&stack.js, "COUNTER_IN", "weir-counter").await?;
    // Let it read whatever the new consumer delivers.
    tokio::time::sleep(Duration::from_secs(5)).await;
    verify(&stack, &inputs).await?;
    drop(host);
    Ok(())
}

const ADMIN: &str = "weir_bootstrap_for_protocol_tests";
const PASS: &str = "/v1/namespaces/shop/functions/pass";

/// Calls the API as the bootstrap admin; the JSON answer.
async fn call(
    address: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    api_call(address, ADMIN, method, path, body).await
}

#[sqlx::test(migrations = false)]
async fn promotes_and_rollbacks_under_host_kills_publish_each_output_once(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let dir = tempdir::TempDir::new("weir-switch")?;
    let address: std::net::SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut config = stack.config(
        vec![
            stream("PASS_IN", &["pass.in"]),
            stream("PASS_OUT", &["bench.out"]),
        ],
        vec![],
    );
    config.api.bootstrap_token = Some(weir_host::config::Secret(ADMIN.into()));
    config.api.requests_per_second = 100_000;
    // The rollout is changed through a second host that only serves the
    // API, while the host running the function is down: its batch in hand
    // then runs again on the other version when it comes back.
    let api_dir = tempdir::TempDir::new("weir-switch-api")?;
    let api_config = weir_host::config::HostConfig {
        artifact_dir: api_dir.path().join("artifacts"),
        api: weir_host::config::ApiConfig {
            listen: Some(address),
            run_deployed: false,
            ..config.api.clone()
        },
        ..config.clone()
    };
    let _api_host = HostProcess::start(&api_config, api_dir.path(), &[])?;
    let start = |crash: Option<u32>| {
        let env: Vec<(&str, String)> = match crash {
            Some(after) => vec![
                ("WEIR_CRASH_POINT", "after-publish".to_string()),
                ("WEIR_CRASH_AFTER", after.to_string()),
            ],
            None => vec![],
        };
        HostProcess::start(&config, dir.path(), &env)
    };
    eventually(Duration::from_secs(60), "the API", || async {
        Ok(http_get(address, "/v1/").await.is_ok())
    })
    .await?;

    grant(
        address,
        ADMIN,
        "shop",
        &["PASS_IN".into(), "PASS_OUT".into()],
        &["pass.in".into(), "bench.out".into()],
    )
    .await?;
    // `passthrough` writes no state: nothing but the message id keeps a
    // re-run's outputs from being stored twice. Three versions of it.
    let mut host = start(None)?;
    let digest = upload_component(address, ADMIN, "passthrough").await?;
    let binding = serde_json::json!({
        "stream": "PASS_IN", "subject": "pass.in", "key": {"json_pointer": "/key"},
        "outputs": ["bench.out"], "batch_size": 10, "ack_wait_ms": 5000,
    });
    call(address, "PUT", PASS, binding).await?;
    for _ in 0..3 {
        let versions = format!("{PASS}/versions");
        call(
            address,
            "POST",
            &versions,
            serde_json::json!({"module": digest}),
        )
        .await?;
    }

    // Each round: the host aborts right after a publish, before its acks;
    // the rollout changes (a canary starts, is promoted, rolled back, ...)
    // while it is down, so the restarted host runs the batch again on
    // another version.
    let rollout = format!("{PASS}/rollout");
    let changes: [(&str, String, serde_json::Value); 6] = [
        (
            "PUT",
            rollout.clone(),
            serde_json::json!({"stable": 1, "canary": 2, "weight": 50}),
        ),
        ("POST", format!("{rollout}/promote"), serde_json::json!({})),
        (
            "PUT",
            rollout.clone(),
            serde_json::json!({"stable": 2, "canary": 3, "weight": 50}),
        ),
        ("POST", format!("{rollout}/rollback"), serde_json::json!({})),
        (
            "PUT",
            rollout.clone(),
            serde_json::json!({"stable": 2, "canary": 3, "weight": 50}),
        ),
        ("POST", format!("{rollout}/promote"), serde_json::json!({})),
    ];
    let mut next_id = 0u64;
    let mut per_key = std::collections::BTreeMap::<String, u64>::new();
    for (round, (method, path, body)) in changes.into_iter().enumerate() {
        host.kill();
        host = start(Some(1 + round as u32 % 3))?;
        let events: Vec<Vec<u8>> = (0..50)
            .map(|i| {
                next_id += 1;
                let key = format!("k{}", i % 7);
                let n = per_key.entry(key.clone()).or_default();
                *n += 1;
                serde_json::json!({"key": key, "n": *n, "id": next_id})
                    .to_string()
                    .into_bytes()
            })
            .collect();
        publish_all(&stack.js, "pass.in", events).await?;
        eventually(
            Duration::from_secs(60),
            "the host to abort after a publish",
            || {
                let exited = host.has_exited();
                async move { Ok(exited) }
            },
        )
        .await?;
        call(address, method, &path, body).await?;
        host = start(None)?;
        eventually(Duration::from_secs(60), "the round's outputs", || async {
            Ok(stream_len(&stack.js, "PASS_OUT").await? >= next_id)
        })
        .await?;
    }
    // Let any late repeat arrive before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Per key, the outputs are exactly 1..n: none lost, none twice.
    let mut seen = std::collections::BTreeMap::<String, Vec<u64>>::new();
    for message in read_stream(&stack.js, "PASS_OUT").await? {
        let payload: serde_json::Value = serde_json::from_slice(&message.payload)?;
        let key = payload["key"].as_str().context("key")?.to_string();
        seen.entry(key)
            .or_default()
            .push(payload["n"].as_u64().context("n")?);
    }
    for (key, count) in &per_key {
        let mut got = seen.remove(key).unwrap_or_default();
        got.sort_unstable();
        let want: Vec<u64> = (1..=*count).collect();
        assert_eq!(
            got, want,
            "outputs of key {key}: each of 1..{count} exactly once"
        );
    }
    assert!(seen.is_empty(), "outputs of keys never sent: {seen:?}");
    drop(host);
    Ok(())
}

/// A stream deleted and made again under the same name (sequences start
/// over at 1) is not the stream the function's applied sequences count in:
/// the owner refuses it, saying what to do, instead of skipping the new
/// stream's events as already applied.
#[sqlx::test(migrations = false)]
async fn a_recreated_stream_is_refused_not_skipped(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let pool = stack.pool().await?;
    let dir = tempdir::TempDir::new("weir-identity")?;
    let config = counter_config(&stack, stack.nats.url(), stack.database_url.clone())?;
    create_streams(&stack).await?;
    let first = inputs(10, 5);
    let mut host = HostProcess::start(&config, dir.path(), &[])?;
    produce(stack.nats.url(), first.clone()).await?;
    eventually(Duration::from_secs(60), "the first events", || async {
        Ok(counted(&pool).await? > 0)
    })
    .await?;
    verify(&stack, &first).await?;
    host.kill();

    stack.js.delete_stream("COUNTER_IN").await?;
    create_streams(&stack).await?;
    let again = inputs(10, 5);
    produce(stack.nats.url(), again).await?;
    let before = counted(&pool).await?;
    let _host = HostProcess::start(&config, dir.path(), &[])?;
    logged(
        dir.path(),
        "sequences of one stream mean nothing in another",
        Duration::from_secs(60),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        counted(&pool).await?,
        before,
        "nothing of the new stream is applied on the old one's progress"
    );
    Ok(())
}

/// The stream identity a function's progress records (name and creation
/// time) must survive the broker restarting from its store, or every
/// restart of nats-server would make the owner refuse the stream as a new
/// one.
#[tokio::test]
async fn a_streams_identity_survives_a_broker_restart() -> Result<()> {
    let mut nats = NatsServer::start()?;
    let js = nats.jetstream().await?;
    create_stream_named(&js, "IDENTITY", "identity.in").await?;
    let before = js.get_stream("IDENTITY").await?.cached_info().created;
    for _ in 0..3 {
        nats.restart()?;
        let js = nats.jetstream().await?;
        let after = js.get_stream("IDENTITY").await?.cached_info().created;
        assert_eq!(
            before, after,
            "the stream's creation time changed on restart"
        );
    }
    Ok(())
}

async fn create_stream_named(
    js: &async_nats::jetstream::Context,
    name: &str,
    subject: &str,
) -> Result<()> {
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        ..Default::default()
    })
    .await?;
    Ok(())
}
