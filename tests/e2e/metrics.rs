//! `/metrics`: the Prometheus text a running host serves, parsed as
//! Prometheus would, has counters equal to the events sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;
use weir_host::config::{FunctionSpec, KeySource};

/// The value of the sample `name` whose labels include `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

#[sqlx::test(migrations = false)]
async fn counters_match_the_events_sent(_pool: PgPoolOptions, db: PgConnectOptions) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let health: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    // A name no other test uses: under plain `cargo test` every test shares
    // one process, hence one recorder.
    let metered = FunctionSpec {
        outputs: vec!["counter.out".into()],
        batch_size: 50,
        ..FunctionSpec::new(
            "metered",
            component("counter")?,
            "METERED_IN",
            "metered.in",
            KeySource::JsonPointer("/key".into()),
        )
    };
    let mut config = stack.config(
        vec![
            stream("METERED_IN", &["metered.in"]),
            stream("METERED_OUT", &["counter.out"]),
        ],
        vec![metered],
    );
    config.health_listen = Some(health);
    let host = stack.host(config).await?;

    let payloads = (0..305u64).map(|id| {
        serde_json::json!({"key": format!("k{}", id % 7), "id": id, "value": 1, "poison": id % 61 == 0})
            .to_string()
            .into_bytes()
    });
    publish_all(&stack.js, "metered.in", payloads).await?;
    // 0, 61, 122, 183, 244: five poison inputs.
    eventually(
        Duration::from_secs(60),
        "every event to be handled",
        || async {
            Ok(stream_len(&stack.js, "METERED_OUT").await? >= 300
                && stream_len(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await? >= 5)
        },
    )
    .await?;

    let (status, body) = http_get(health, "/metrics").await?;
    assert_eq!(status, 200, "{body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .context("Prometheus text format")?;
    let function = [("function", "metered")];
    let outcome = |o: &'static str| {
        sample(
            &scrape,
            "weir_events_total",
            &[("function", "metered"), ("outcome", o)],
        )
    };
    assert_eq!(
        sample(&scrape, "weir_invocations_total", &function),
        Some(305.0)
    );
    assert_eq!(outcome("applied"), Some(300.0));
    assert_eq!(outcome("reject"), Some(5.0));
    assert_eq!(
        sample(&scrape, "weir_dead_letters_total", &function),
        Some(5.0)
    );
    assert_eq!(sample(&scrape, "weir_retries_total", &function), Some(0.0));
    assert_eq!(sample(&scrape, "weir_in_flight", &function), Some(0.0));
    let hits = sample(&scrape, "weir_state_cache_hits_total", &function).unwrap_or(0.0);
    let misses = sample(&scrape, "weir_state_cache_misses_total", &function).unwrap_or(0.0);
    assert_eq!(
        misses, 7.0,
        "each of the 7 keys is loaded from Postgres once"
    );
    assert!(hits > 0.0);
    let labels: HashMap<String, f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "weir_invocation_seconds_count")
        .filter_map(|s| match s.value {
            prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => {
                Some((s.labels.get("function").unwrap_or_default().to_string(), v))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        labels.get("metered"),
        Some(&305.0),
        "one latency sample per invocation"
    );
    // Every metric the Grafana dashboard charts is one the host serves.
    let served: std::collections::HashSet<&str> = scrape
        .samples
        .iter()
        .map(|s| base_name(&s.metric))
        .collect();
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/grafana/weir-dashboard.json"),
    )?;
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard)?;
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .context("panels")?
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 8, "{exprs:?}");
    for expr in &exprs {
        for name in metric_names(expr) {
            assert!(
                served.contains(base_name(name)),
                "the dashboard charts `{name}`, which the host does not serve"
            );
        }
    }
    host.stop().await
}

/// A histogram's series name without its `_bucket`/`_sum`/`_count` part.
fn base_name(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
}

/// The `weir_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("weir_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(&tail[..end]);
        rest = &tail[end..];
    }
    names
}
