//! Canary rollouts: a canary at 20 % takes 20 % ± 3 points of 5,000 keys,
//! each key stays on one version, rollback and promote move every key, and
//! a canary that fails half its events is rolled back automatically. Both
//! versions share the function's state, and every event is applied once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;
use weir_host::dispatch::lane_for;

const ADMIN: &str = "weir_bootstrap_for_canary_tests";
const FUNCTION: &str = "/v1/namespaces/shop/functions/tally";

struct Deployed {
    stack: Stack,
    host: RunningHost,
    address: SocketAddr,
}

async fn call(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    api_call(address, ADMIN, method, path, body).await
}

/// A host with the API, and `tally` deployed: version 1 is `counter`
/// (reports on counter.out), version 2 is `misbehave` (on fixture.out).
/// Both count events per key in the `count` entry.
async fn deployed(db: &PgConnectOptions, retry: serde_json::Value) -> Result<Deployed> {
    let stack = Stack::start(db).await?;
    let (host, address) = api_host(
        &stack,
        vec![
            stream("COUNTED", &["counted.in"]),
            stream("COUNTER_OUT", &["counter.out"]),
            stream("FIXTURE_OUT", &["fixture.out"]),
        ],
        ADMIN,
    )
    .await?;
    let mut digests = Vec::new();
    for name in ["counter", "misbehave"] {
        digests.push(upload_component(address, ADMIN, name).await?);
    }
    let binding = serde_json::json!({
        "stream": "COUNTED", "subject": "counted.in", "key": {"json_pointer": "/key"},
        "outputs": ["counter.out", "fixture.out"], "batch_size": 100, "retry": retry,
    });
    call(address, "PUT", FUNCTION, binding).await?;
    for digest in digests {
        let versions = format!("{FUNCTION}/versions");
        call(
            address,
            "POST",
            &versions,
            serde_json::json!({"module": digest}),
        )
        .await?;
    }
    Ok(Deployed {
        stack,
        host,
        address,
    })
}

fn event(key: &str, id: u64, action: &str) -> Vec<u8> {
    serde_json::json!({"key": key, "id": id, "value": 1, "do": action})
        .to_string()
        .into_bytes()
}

/// (id, key) of every output on a stream.
async fn outputs(stack: &Stack, stream: &str) -> Result<Vec<(u64, String)>> {
    read_stream(&stack.js, stream)
        .await?
        .iter()
        .map(|m| {
            let payload: serde_json::Value = serde_json::from_slice(&m.payload)?;
            Ok((
                payload["id"].as_u64().context("id")?,
                payload["key"].as_str().context("key")?.to_string(),
            ))
        })
        .collect()
}

/// Publishes events with `key` until one comes out on `stream`: the rollout
/// that sends `key` there is in force from then on.
async fn until_routed(d: &Deployed, key: &str, stream: &str, next_id: &mut u64) -> Result<()> {
    let before = stream_len(&d.stack.js, stream).await?;
    for _ in 0..500 {
        publish_all(&d.stack.js, "counted.in", [event(key, *next_id, "ok")]).await?;
        *next_id += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        if stream_len(&d.stack.js, stream).await? > before {
            return Ok(());
        }
    }
    anyhow::bail!("{key} never reached {stream}")
}

async fn drained(d: &Deployed, total: u64) -> Result<()> {
    eventually(Duration::from_secs(120), "every event handled", || async {
        Ok(stream_len(&d.stack.js, "COUNTER_OUT").await?
            + stream_len(&d.stack.js, "FIXTURE_OUT").await?
            >= total)
    })
    .await
}

#[sqlx::test(migrations = false)]
async fn a_canary_takes_its_share_of_keys_and_rollback_and_promote_move_them_all(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let d = deployed(&db, serde_json::json!({})).await?;
    let rollout = format!("{FUNCTION}/rollout");
    // A key the hash keeps on the stable version at 20 %, and one it sends
    // to the canary: markers that tell when a rollout is in force.
    let on_stable = (0..)
        .map(|i| format!("marker-{i}"))
        .find(|k| lane_for(k, 20) == 0);
    let on_canary = (0..)
        .map(|i| format!("marker-{i}"))
        .find(|k| lane_for(k, 20) == 1);
    let (on_stable, on_canary) = (on_stable.context("key")?, on_canary.context("key")?);
    let mut id = 1_000_000;

    let shown = call(
        d.address,
        "PUT",
        &rollout,
        serde_json::json!({"stable": 1, "canary": 2, "weight": 20}),
    )
    .await?;
    assert_eq!(shown["rollout"]["canary"], 2);
    until_routed(&d, &on_canary, "FIXTURE_OUT", &mut id).await?;

    // 5,000 keys, two events each.
    let keys: Vec<String> = (0..5_000).map(|k| format!("key-{k}")).collect();
    let events = keys.iter().enumerate().flat_map(|(k, key)| {
        [
            event(key, 2 * k as u64, "ok"),
            event(key, 2 * k as u64 + 1, "ok"),
        ]
    });
    publish_all(&d.stack.js, "counted.in", events).await?;
    let published = |extra: u64| 10_000 + extra;
    let markers = id - 1_000_000;
    drained(&d, published(markers)).await?;

    let mut version_of_key: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for (stream, version) in [("COUNTER_OUT", "v1"), ("FIXTURE_OUT", "v2")] {
        for (_, key) in outputs(&d.stack, stream).await? {
            if key.starts_with("key-") {
                version_of_key.entry(key).or_default().insert(version);
            }
        }
    }
    assert_eq!(version_of_key.len(), 5_000);
    assert!(
        version_of_key.values().all(|versions| versions.len() == 1),
        "every key stays on one version"
    );
    let on_v2 = version_of_key.values().filter(|v| v.contains("v2")).count();
    let share = on_v2 as f64 * 100.0 / 5_000.0;
    assert!((17.0..=23.0).contains(&share), "canary share {share:.1} %");
    for (key, versions) in &version_of_key {
        let expected = if lane_for(key, 20) == 1 { "v2" } else { "v1" };
        assert!(versions.contains(expected), "{key} on {versions:?}");
    }

    // Roll back: every key on v1.
    let shown = call(
        d.address,
        "POST",
        &format!("{rollout}/rollback"),
        serde_json::Value::Null,
    )
    .await?;
    assert_eq!(shown["rollout"]["canary"], serde_json::Value::Null);
    assert_eq!(shown["stable"], 1);
    until_routed(&d, &on_canary, "COUNTER_OUT", &mut id).await?;
    let before_v2 = stream_len(&d.stack.js, "FIXTURE_OUT").await?;
    let burst = (0..500u64).map(|i| event(&format!("key-{i}"), 20_000 + i, "ok"));
    publish_all(&d.stack.js, "counted.in", burst).await?;
    drained(&d, published(id - 1_000_000 + 500)).await?;
    assert_eq!(
        stream_len(&d.stack.js, "FIXTURE_OUT").await?,
        before_v2,
        "nothing on v2"
    );

    // Canary again, then promote: every key on v2.
    call(
        d.address,
        "PUT",
        &rollout,
        serde_json::json!({"stable": 1, "canary": 2, "weight": 20}),
    )
    .await?;
    until_routed(&d, &on_canary, "FIXTURE_OUT", &mut id).await?;
    let shown = call(
        d.address,
        "POST",
        &format!("{rollout}/promote"),
        serde_json::Value::Null,
    )
    .await?;
    assert_eq!(shown["stable"], 2);
    until_routed(&d, &on_stable, "FIXTURE_OUT", &mut id).await?;
    let before_v1 = stream_len(&d.stack.js, "COUNTER_OUT").await?;
    let burst = (0..500u64).map(|i| event(&format!("key-{i}"), 30_000 + i, "ok"));
    publish_all(&d.stack.js, "counted.in", burst).await?;
    drained(&d, published(id - 1_000_000 + 1_000)).await?;
    assert_eq!(
        stream_len(&d.stack.js, "COUNTER_OUT").await?,
        before_v1,
        "nothing on v1"
    );
    d.host.stop().await?;

    // Each event once, by one version; counts exact per key.
    let all: Vec<u64> = outputs(&d.stack, "COUNTER_OUT")
        .await?
        .into_iter()
        .chain(outputs(&d.stack, "FIXTURE_OUT").await?)
        .map(|(id, _)| id)
        .collect();
    let distinct: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(all.len(), distinct.len(), "no event handled twice");
    assert_eq!(all.len() as u64, published(id - 1_000_000 + 1_000));
    let pool = d.stack.pool().await?;
    let counts: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT key, value FROM weir_state WHERE function_name = 'shop_tally' AND name = 'count' AND key LIKE 'key-%'",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(counts.len(), 5_000);
    for (key, value) in counts {
        let index: u64 = key.trim_start_matches("key-").parse()?;
        let expected = if index < 500 { 4 } else { 2 };
        assert_eq!(
            String::from_utf8_lossy(&value),
            expected.to_string(),
            "{key}"
        );
    }
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_failing_canary_is_rolled_back_automatically_and_loses_nothing(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let d = deployed(
        &db,
        serde_json::json!({"max_attempts": 10, "initial_backoff_ms": 50, "max_backoff_ms": 200}),
    )
    .await?;
    // v2 (`misbehave`) fails every event whose action is `retry`; v1
    // (`counter`) ignores the action. Half the events ask for it.
    call(
        d.address,
        "PUT",
        &format!("{FUNCTION}/rollout"),
        serde_json::json!({"stable": 1, "canary": 2, "weight": 50,
                           "rollback_margin": 20.0, "rollback_min_calls": 20}),
    )
    .await?;
    let on_canary = (0..)
        .map(|i| format!("marker-{i}"))
        .find(|k| lane_for(k, 50) == 1)
        .context("key")?;
    let mut id = 1_000_000;
    until_routed(&d, &on_canary, "FIXTURE_OUT", &mut id).await?;
    let total = 400u64;
    let events = (0..total).map(|i| {
        let action = if i % 2 == 0 { "retry" } else { "ok" };
        event(&format!("key-{}", i % 40), i, action)
    });
    publish_all(&d.stack.js, "counted.in", events).await?;

    eventually(
        Duration::from_secs(60),
        "the automatic rollback",
        || async {
            let shown = call(d.address, "GET", FUNCTION, serde_json::Value::Null).await?;
            Ok(shown["rollout"]["canary"].is_null())
        },
    )
    .await?;
    let shown = call(d.address, "GET", FUNCTION, serde_json::Value::Null).await?;
    assert_eq!(shown["stable"], 1);
    let reason = shown["rolled_back"].as_str().unwrap_or_default();
    assert!(reason.starts_with("version 2 failed"), "{reason}");
    let markers = id - 1_000_000;
    drained(&d, total + markers).await?;
    d.host.stop().await?;

    // The events the canary failed were retried on v1: none lost, none
    // twice, no dead letters.
    let all: Vec<u64> = outputs(&d.stack, "COUNTER_OUT")
        .await?
        .into_iter()
        .chain(outputs(&d.stack, "FIXTURE_OUT").await?)
        .map(|(id, _)| id)
        .filter(|id| *id < total)
        .collect();
    let distinct: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(all.len(), distinct.len(), "no event handled twice");
    assert_eq!(distinct, (0..total).collect::<BTreeSet<_>>());
    assert_eq!(
        stream_len(&d.stack.js, weir_host::serve::DEAD_LETTER_STREAM).await?,
        0
    );
    let pool = d.stack.pool().await?;
    let counts: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT key, value FROM weir_state WHERE function_name = 'shop_tally' AND name = 'count' AND key LIKE 'key-%'",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(counts.len(), 40);
    assert!(
        counts.iter().all(|(_, v)| v.as_slice() == b"10"),
        "{counts:?}"
    );
    Ok(())
}
