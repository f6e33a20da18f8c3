//! The circuit breaker and backpressure, end to end: a function that turns
//! slow opens its breaker, its events wait (none lost, none dead-lettered,
//! no attempt spent) and are each applied once after it recovers; a function
//! far slower than its input holds no more than its batch.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;
use weir_host::breaker::{BreakerConfig, WindowKind};
use weir_host::config::{FunctionSpec, KeySource, Limits, RetryPolicy};

fn scrape(body: &str) -> Result<prometheus_parse::Scrape> {
    Ok(prometheus_parse::Scrape::parse(
        body.lines().map(|l| Ok(l.to_string())),
    )?)
}

/// The value of `name` whose labels include `labels`, if served.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[sqlx::test(migrations = false)]
async fn a_function_that_turns_slow_is_cut_off_and_loses_nothing(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let health: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let slowpoke = FunctionSpec {
        outputs: vec!["fixture.out".into()],
        limits: Limits {
            deadline_ms: 2_000,
            ..Limits::default()
        },
        // One attempt, and no event fails: none may be dead-lettered.
        retry: RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        },
        breaker: BreakerConfig {
            window_kind: WindowKind::Count,
            window_size: 10,
            minimum_calls: 5,
            failure_rate_threshold: 50.0,
            slow_call_rate_threshold: 50.0,
            slow_call_duration_ms: 100,
            wait_in_open_ms: 300,
            half_open_calls: 3,
            ..BreakerConfig::default()
        },
        batch_size: 10,
        ..FunctionSpec::new(
            "slowpoke",
            component("misbehave")?,
            "SLOW_IN",
            "slow.in",
            KeySource::JsonPointer("/key".into()),
        )
    };
    let mut config = stack.config(
        vec![
            stream("SLOW_IN", &["slow.in"]),
            stream("FIXTURE_OUT", &["fixture.out"]),
        ],
        vec![slowpoke],
    );
    config.health_listen = Some(health);
    let host = stack.host(config).await?;

    // The first 12 calls take 150 ms (slow), the rest are quick.
    let total = 60u64;
    let payloads = (0..total).map(|id| {
        let (action, ms) = if id < 12 { ("slow", 150) } else { ("ok", 0) };
        serde_json::json!({"do": action, "ms": ms, "id": id, "key": format!("k{}", id % 3)})
            .to_string()
            .into_bytes()
    });
    publish_all(&stack.js, "slow.in", payloads).await?;
    eventually(Duration::from_secs(120), "every event applied", || async {
        host.check()?;
        Ok(stream_len(&stack.js, "FIXTURE_OUT").await? >= total)
    })
    .await?;

    let (_, body) = http_get(health, "/metrics").await?;
    let metrics = scrape(&body)?;
    let function = ("function", "slowpoke");
    let transitions = |to: &str| {
        value(
            &metrics,
            "weir_breaker_transitions_total",
            &[function, ("to", to)],
        )
        .unwrap_or(0.0)
    };
    assert!(transitions("open") >= 1.0, "{body}");
    assert!(transitions("half-open") >= 1.0, "{body}");
    assert!(transitions("closed") >= 1.0, "{body}");
    assert_eq!(
        value(&metrics, "weir_breaker_state", &[function]),
        Some(0.0),
        "closed again"
    );
    let deferred = value(
        &metrics,
        "weir_events_total",
        &[function, ("outcome", "deferred")],
    )
    .unwrap_or(0.0);
    assert!(
        deferred >= 1.0,
        "the open breaker handed events back: {body}"
    );
    let (status, body) = http_get(health, "/status").await?;
    assert_eq!(status, 200);
    let status: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(status["functions"][0]["name"], "slowpoke");
    assert_eq!(status["functions"][0]["breaker"]["state"], "closed");
    host.stop().await?;

    // Each event applied once: one output per id, exact counts, and no
    // dead letter although every event had a single attempt.
    let outputs = read_stream(&stack.js, "FIXTURE_OUT").await?;
    let ids: BTreeSet<u64> = outputs
        .iter()
        .map(|m| {
            let payload: serde_json::Value = serde_json::from_slice(&m.payload)?;
            payload["id"].as_u64().context("id")
        })
        .collect::<Result<_>>()?;
    assert_eq!(outputs.len() as u64, total);
    assert_eq!(ids, (0..total).collect::<BTreeSet<_>>());
    assert_eq!(
        stream_len(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await?,
        0
    );
    let counts = state_entries(&stack, "slowpoke", "count").await?;
    let expected: Vec<(String, String)> = (0..3)
        .map(|k| (format!("k{k}"), (total / 3).to_string()))
        .collect();
    assert_eq!(counts, expected);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_function_far_slower_than_its_input_holds_only_its_batch(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let health: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let batch = 5usize;
    let laggard = FunctionSpec {
        outputs: vec!["fixture.out".into()],
        batch_size: batch,
        ..FunctionSpec::new(
            "laggard",
            component("misbehave")?,
            "LAG_IN",
            "lag.in",
            KeySource::JsonPointer("/key".into()),
        )
    };
    let mut config = stack.config(
        vec![
            stream("LAG_IN", &["lag.in"]),
            stream("FIXTURE_OUT", &["fixture.out"]),
        ],
        vec![laggard],
    );
    config.health_listen = Some(health);
    let host = stack.host(config).await?;

    // 200 events at once; each takes 20 ms, so the input outruns the
    // function by orders of magnitude.
    let total = 200u64;
    let payloads = (0..total).map(|id| {
        serde_json::json!({"do": "slow", "ms": 20, "id": id, "key": format!("k{}", id % 4)})
            .to_string()
            .into_bytes()
    });
    publish_all(&stack.js, "lag.in", payloads).await?;

    let stream = stack.js.get_stream("LAG_IN").await?;
    wait_for_consumer(&stack.js, "LAG_IN", "weir-laggard").await?;
    let (mut most_held, mut most_in_flight, mut largest_backlog) = (0usize, 0f64, 0u64);
    loop {
        let info = stream.consumer_info("weir-laggard").await?;
        most_held = most_held.max(info.num_ack_pending);
        largest_backlog = largest_backlog.max(info.num_pending);
        let (_, body) = http_get(health, "/metrics").await?;
        let in_flight = value(
            &scrape(&body)?,
            "weir_in_flight",
            &[("function", "laggard")],
        );
        most_in_flight = most_in_flight.max(in_flight.unwrap_or(0.0));
        if stream_len(&stack.js, "FIXTURE_OUT").await? >= total {
            break;
        }
        host.check()?;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    host.stop().await?;
    // The host's own count is exact; the server's may still include the
    // previous batch, whose acks are sent but not yet processed.
    assert!(most_in_flight <= batch as f64, "{most_in_flight}");
    assert!(
        most_held <= 2 * batch,
        "the server saw {most_held} unacked events; the batch is {batch}"
    );
    assert!(
        largest_backlog >= total / 2,
        "the backlog waited in JetStream: {largest_backlog}"
    );
    assert_eq!(stream_len(&stack.js, "FIXTURE_OUT").await?, total);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn deliveries_the_breaker_hands_back_cost_no_attempts(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let health: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let attempts = 3u64;
    let failing = FunctionSpec {
        outputs: vec!["fixture.out".into()],
        retry: RetryPolicy {
            max_attempts: attempts as u32,
            initial_backoff_ms: 20,
            max_backoff_ms: 50,
        },
        breaker: BreakerConfig {
            window_size: 10,
            minimum_calls: 5,
            failure_rate_threshold: 50.0,
            wait_in_open_ms: 300,
            half_open_calls: 3,
            ..BreakerConfig::default()
        },
        batch_size: 10,
        ..FunctionSpec::new(
            "failing",
            component("misbehave")?,
            "FAIL_IN",
            "fail.in",
            KeySource::JsonPointer("/key".into()),
        )
    };
    let mut config = stack.config(
        vec![
            stream("FAIL_IN", &["fail.in"]),
            stream("FIXTURE_OUT", &["fixture.out"]),
        ],
        vec![failing],
    );
    config.health_listen = Some(health);
    let host = stack.host(config).await?;

    // Every call asks to be retried: the breaker keeps opening, and events
    // keep being handed back between their real attempts.
    let total = 12u64;
    let payloads = (0..total).map(|id| {
        serde_json::json!({"do": "retry", "id": id, "key": format!("k{id}")})
            .to_string()
            .into_bytes()
    });
    publish_all(&stack.js, "fail.in", payloads).await?;
    eventually(
        Duration::from_secs(120),
        "every event dead-lettered",
        || async {
            host.check()?;
            Ok(stream_len(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await? >= total)
        },
    )
    .await?;
    let (_, body) = http_get(health, "/metrics").await?;
    host.stop().await?;

    let metrics = scrape(&body)?;
    let function = ("function", "failing");
    let deferred = value(
        &metrics,
        "weir_events_total",
        &[function, ("outcome", "deferred")],
    )
    .unwrap_or(0.0);
    assert!(deferred >= 1.0, "the breaker handed events back: {body}");
    // Exactly `attempts` real runs per event, however often it was handed
    // back in between.
    assert_eq!(
        value(&metrics, "weir_invocations_total", &[function]),
        Some((total * attempts) as f64),
        "{body}"
    );
    let dead = read_stream(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await?;
    assert_eq!(dead.len() as u64, total);
    for message in &dead {
        assert_eq!(header(message, "Weir-Attempts"), attempts.to_string());
        assert_eq!(header(message, "Weir-Error-Kind"), "retry");
    }
    Ok(())
}
