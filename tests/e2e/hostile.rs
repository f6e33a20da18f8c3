//! Hostile guests: each one's offending event ends as its policy says with
//! the right outcome kind, the host stays up, and a well-behaved function
//! running beside them applies every one of its events exactly once.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;
use weir_host::breaker::BreakerConfig;
use weir_host::config::{FunctionSpec, KeySource, Limits, RetryPolicy};
use weir_host::output::dead_letter_headers as dlq;

#[sqlx::test(migrations = false)]
async fn hostile_guests_fail_alone_and_the_neighbour_loses_nothing(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let hostile = FunctionSpec {
        outputs: vec!["fixture.out".into()],
        limits: Limits {
            deadline_ms: 200,
            memory_bytes: 16 << 20,
            output_count: 100,
            output_bytes: 1 << 20,
            state_value_bytes: 1 << 20,
            state_entries_per_key: 100,
            ..Limits::default()
        },
        retry: RetryPolicy {
            max_attempts: 2,
            initial_backoff_ms: 20,
            max_backoff_ms: 50,
        },
        // Here every failure is judged alone; the breaker has its own test.
        breaker: BreakerConfig {
            enabled: false,
            ..BreakerConfig::default()
        },
        batch_size: 10,
        ..FunctionSpec::new(
            "hostile",
            component("misbehave")?,
            "HOSTILE_IN",
            "hostile.in",
            KeySource::JsonPointer("/key".into()),
        )
    };
    let neighbour = FunctionSpec {
        outputs: vec!["counter.out".into()],
        batch_size: 100,
        ..FunctionSpec::new(
            "neighbour",
            component("counter")?,
            "COUNTED",
            "counted.in",
            KeySource::JsonPointer("/key".into()),
        )
    };
    let config = stack.config(
        vec![
            stream("HOSTILE_IN", &["hostile.in"]),
            stream("FIXTURE_OUT", &["fixture.out"]),
            stream("COUNTED", &["counted.in"]),
            stream("COUNTED_OUT", &["counter.out"]),
        ],
        vec![hostile, neighbour],
    );
    let host = stack.host(config).await?;

    // (action, its argument, expected kind, expected attempts)
    let attacks = [
        ("loop", 0, "timeout", 2),
        ("alloc", 0, "out-of-memory", 1),
        ("recurse", 0, "stack-overflow", 1),
        ("panic", 0, "trap", 2),
        ("huge-output", 0, "output-limit", 1),
        ("wide-output", 0, "output-limit", 1),
        ("emit-flood", 0, "output-limit", 1),
        ("state-flood", 0, "state-limit", 1),
        ("state-huge", 0, "state-limit", 1),
        // Asks WASI to sleep an hour: woken at its deadline, a timeout.
        ("sleep", 3_600_000, "timeout", 2),
        ("open-file", 0, "reject", 1),
        ("open-socket", 0, "reject", 1),
        ("flood", 0, "", 0),
    ];
    // Slow but within the deadline: applied.
    let finishing = [("slow", 50), ("sleep", 20), ("flood", 0), ("ok", 0)];
    let payloads = attacks
        .iter()
        .map(|(action, ms, _, _)| (action, ms))
        .chain(finishing.iter().map(|(action, ms)| (action, ms)))
        .map(|(action, ms)| {
            serde_json::json!({"do": action, "ms": ms, "key": format!("k-{action}-{ms}")})
                .to_string()
                .into_bytes()
        });
    let hostile_inputs = publish_all(&stack.js, "hostile.in", payloads).await?.len();
    let neighbour_events = 3_000u64;
    let counted = (0..neighbour_events).map(|id| {
        serde_json::json!({"key": format!("n{}", id % 10), "id": id, "value": id})
            .to_string()
            .into_bytes()
    });
    publish_all(&stack.js, "counted.in", counted).await?;

    let dead_expected = attacks.iter().filter(|a| !a.2.is_empty()).count() as u64;
    eventually(Duration::from_secs(120), "every event handled", || async {
        host.check()?;
        Ok(
            stream_len(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await? >= dead_expected
                && stream_len(&stack.js, "COUNTED_OUT").await? >= neighbour_events
                // The two `flood`s, `slow`, the short `sleep` and `ok`.
                && stream_len(&stack.js, "FIXTURE_OUT").await? >= 5,
        )
    })
    .await?;
    host.check()?;
    host.stop().await?;
    assert_eq!(hostile_inputs, attacks.len() + finishing.len());

    let dead = read_stream(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await?;
    let mut seen = BTreeMap::new();
    for message in &dead {
        let payload: serde_json::Value = serde_json::from_slice(&message.payload)?;
        let action = payload["do"].as_str().context("do")?.to_string();
        seen.insert(
            action,
            (
                header(message, dlq::KIND),
                header(message, dlq::ATTEMPTS).parse::<u64>()?,
                header(message, dlq::REASON),
            ),
        );
    }
    assert_eq!(dead.len() as u64, dead_expected, "{seen:#?}");
    for (action, _, kind, attempts) in attacks.iter().filter(|a| !a.2.is_empty()) {
        let (got_kind, got_attempts, reason) = seen.get(*action).context(*action)?;
        assert_eq!(
            (got_kind.as_str(), *got_attempts),
            (*kind, *attempts),
            "{action}: {reason}"
        );
    }
    // What the sandbox told the guests, and what each limit says. A panic
    // is reported by its message, taken from the guest's stderr.
    let reasons = [
        ("open-file", "open-file: "),
        ("open-socket", "open-socket: "),
        ("panic", ": asked to panic (wasm trap:"),
        ("emit-flood", "more than 100 records"),
        ("huge-output", "larger than NATS accepts"),
        ("wide-output", "more than 1048576 bytes"),
        // Woken at the deadline: stopped by the next epoch check, or
        // marked overrun when it returns first.
        ("sleep", "past its deadline of 200 ms"),
        ("state-flood", "100 state entries"),
    ];
    for (action, expected) in reasons {
        let reason = &seen[action].2;
        assert!(reason.contains(expected), "{action}: {reason}");
    }
    assert!(
        seen["panic"].2.starts_with("panicked at "),
        "{:?}",
        seen["panic"]
    );

    // The hostile function's state: only the finishing events counted.
    let pool = stack.pool().await?;
    let hostile_counts: Vec<(String,)> = sqlx::query_as(
        "SELECT key FROM weir_state WHERE function_name = 'hostile' AND name = 'count' ORDER BY key",
    )
    .fetch_all(&pool)
    .await?;
    let hostile_keys: Vec<&str> = hostile_counts.iter().map(|(k,)| k.as_str()).collect();
    assert_eq!(
        hostile_keys,
        ["k-flood-0", "k-ok-0", "k-sleep-20", "k-slow-50"],
        "failed events left no state"
    );

    // The neighbour: exact counts and sums.
    let rows: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT key, name, value FROM weir_state WHERE function_name = 'neighbour' ORDER BY key, name",
    )
    .fetch_all(&pool)
    .await?;
    let mut expected = Vec::new();
    for k in 0..10u64 {
        let sum: u64 = (0..neighbour_events).filter(|id| id % 10 == k).sum();
        expected.push((format!("n{k}"), "count".to_string(), "300".to_string()));
        expected.push((format!("n{k}"), "sum".to_string(), sum.to_string()));
    }
    let rows: Vec<(String, String, String)> = rows
        .into_iter()
        .map(|(k, n, v)| (k, n, String::from_utf8_lossy(&v).into_owned()))
        .collect();
    assert_eq!(rows, expected);
    assert_eq!(
        stream_len(&stack.js, "COUNTED_OUT").await?,
        neighbour_events
    );
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_host_stopped_while_a_guest_loops_stops_within_the_deadlines(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let looper = FunctionSpec {
        outputs: vec!["fixture.out".into()],
        limits: Limits {
            deadline_ms: 200,
            ..Limits::default()
        },
        batch_size: 5,
        ..FunctionSpec::new(
            "looper",
            component("misbehave")?,
            "LOOP_IN",
            "loop.in",
            KeySource::JsonPointer("/key".into()),
        )
    };
    let config = stack.config(
        vec![
            stream("LOOP_IN", &["loop.in"]),
            stream("FIXTURE_OUT", &["fixture.out"]),
        ],
        vec![looper],
    );
    let host = stack.host(config).await?;
    let loops = (0..50).map(|i| {
        serde_json::json!({"do": "loop", "key": format!("k{i}")})
            .to_string()
            .into_bytes()
    });
    publish_all(&stack.js, "loop.in", loops).await?;
    // Guests are spinning now; a graceful stop finishes the batch in hand,
    // which the deadlines bound (5 × 200 ms), however the host tears down.
    tokio::time::sleep(Duration::from_millis(700)).await;
    tokio::time::timeout(Duration::from_secs(30), host.stop())
        .await
        .context("the host did not stop: a looping guest was no longer interrupted")??;
    Ok(())
}
