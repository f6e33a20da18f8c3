//! Events that fail: each failure mode ends on the dead-letter subject with
//! the right kind and attempt count (retried ones after exactly
//! `max_attempts` deliveries), a failed event leaves no state and no output
//! behind, and the good events around them are all applied exactly once.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;
use weir_host::config::{FunctionSpec, KeySource, Limits, RetryPolicy};
use weir_host::output::dead_letter_headers as dlq;

#[sqlx::test(migrations = false)]
async fn every_failure_mode_is_dead_lettered_and_nothing_else_is_lost(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let misbehave = FunctionSpec {
        outputs: vec!["fixture.out".into()],
        limits: Limits {
            deadline_ms: 100,
            memory_bytes: 16 << 20,
            ..Limits::default()
        },
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff_ms: 20,
            max_backoff_ms: 100,
        },
        batch_size: 50,
        ..FunctionSpec::new(
            "misbehave",
            component("misbehave")?,
            "FIXTURE_IN",
            "fixture.in",
            KeySource::JsonPointer("/key".into()),
        )
    };
    let config = stack.config(
        vec![
            stream("FIXTURE_IN", &["fixture.in"]),
            stream("FIXTURE_OUT", &["fixture.out"]),
        ],
        vec![misbehave],
    );
    let host = stack.host(config).await?;
    let js = &stack.js;

    // (action, expected dead-letter kind, expected attempts)
    let failures = [
        ("retry", "retry", 3),
        ("reject", "reject", 1),
        ("panic", "trap", 3),
        ("undeclared", "denied", 1),
        ("loop", "timeout", 3),
        ("alloc", "out-of-memory", 1),
    ];
    let mut payloads = Vec::new();
    for i in 0..100 {
        payloads.push(serde_json::json!({"do": "ok", "key": format!("k{}", i % 5)}));
        if i % 15 == 7 && i / 15 < failures.len() {
            let (action, _, _) = failures[i / 15];
            payloads.push(serde_json::json!({"do": action, "key": format!("k{}", i % 5)}));
        }
    }
    let sequences = publish_all(
        js,
        "fixture.in",
        payloads.iter().map(|p| p.to_string().into_bytes()),
    )
    .await?;
    assert_eq!(sequences.len(), 100 + failures.len());

    let dead_expected = failures.len() as u64;
    eventually(
        Duration::from_secs(60),
        "outputs and dead letters",
        || async {
            Ok(stream_len(js, "FIXTURE_OUT").await? >= 100
                && stream_len(js, weir_host::serve::DEAD_LETTER_STREAM).await? >= dead_expected)
        },
    )
    .await?;
    host.check()?;
    host.stop().await?;

    let pool = stack.pool().await?;
    let counts: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT key, value FROM weir_state WHERE function_name = 'misbehave' AND name = 'count' ORDER BY key",
    )
    .fetch_all(&pool)
    .await?;
    let counts: Vec<(String, u64)> = counts
        .into_iter()
        .map(|(k, v)| Ok((k, serde_json::from_slice(&v)?)))
        .collect::<Result<_>>()?;
    let expected_counts: Vec<(String, u64)> = (0..5).map(|k| (format!("k{k}"), 20)).collect();
    assert_eq!(counts, expected_counts, "failed events left no state");

    let outputs = read_stream(js, "FIXTURE_OUT").await?;
    assert_eq!(outputs.len(), 100, "failed events left no output");
    assert!(
        outputs
            .iter()
            .all(|m| m.payload.windows(4).any(|w| w == b"\"ok\""))
    );

    let dead = read_stream(js, weir_host::serve::DEAD_LETTER_STREAM).await?;
    let mut seen = BTreeMap::new();
    for message in &dead {
        let header = |name: &str| header(message, name);
        let payload: serde_json::Value = serde_json::from_slice(&message.payload)?;
        let action = payload["do"].as_str().unwrap_or_default().to_string();
        let version = header(dlq::VERSION);
        assert!(
            version.len() == 12 && version.chars().all(|c| c.is_ascii_hexdigit()),
            "{version:?}"
        );
        seen.insert(
            action,
            (header(dlq::KIND), header(dlq::ATTEMPTS).parse::<u64>()?),
        );
    }
    let expected: BTreeMap<String, (String, u64)> = failures
        .iter()
        .map(|(action, kind, attempts)| (action.to_string(), (kind.to_string(), *attempts)))
        .collect();
    assert_eq!(
        dead.len(),
        failures.len(),
        "each failure dead-lettered once"
    );
    assert_eq!(seen, expected);
    Ok(())
}
