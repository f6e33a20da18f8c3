//! Traces: a real OTLP/HTTP receiver gets one trace per input that runs
//! from the producer's `traceparent` through function A (`enrich`), its
//! guest span and its publish, into function B (`passthrough`), with the
//! parent links and attributes a user reads in Jaeger.

use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::otlp::{
    KIND_CONSUMER, KIND_INTERNAL, KIND_PRODUCER, OtlpReceiver, ReceivedSpan, parse_traceparent,
};
use weir_e2e::*;
use weir_host::config::{FunctionSpec, KeySource};

const PRODUCER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

/// The one span named `name` in `spans`.
fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> Result<&'a ReceivedSpan> {
    one_of(spans.iter().filter(|s| s.name == name), spans, name)
}

/// The one span named `name` whose parent is `parent`.
fn child<'a>(
    spans: &'a [ReceivedSpan],
    name: &str,
    parent: &ReceivedSpan,
) -> Result<&'a ReceivedSpan> {
    let found = spans
        .iter()
        .filter(|s| s.name == name && s.parent_span_id == parent.span_id);
    one_of(found, spans, name)
}

fn one_of<'a>(
    found: impl Iterator<Item = &'a ReceivedSpan>,
    spans: &[ReceivedSpan],
    name: &str,
) -> Result<&'a ReceivedSpan> {
    let found: Vec<_> = found.collect();
    match found[..] {
        [span] => Ok(span),
        _ => anyhow::bail!(
            "expected one `{name}` span, found {}; the trace has {:?}",
            found.len(),
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        ),
    }
}

#[sqlx::test(migrations = false)]
async fn one_trace_runs_from_the_producer_through_a_chain_of_functions(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let receiver = OtlpReceiver::start().await?;
    let enrich = FunctionSpec {
        outputs: vec!["orders.enriched".into()],
        ..FunctionSpec::new(
            "enrich",
            component("enrich")?,
            "ORDERS",
            "orders.new",
            KeySource::JsonPointer("/order_id".into()),
        )
    };
    let passthrough = FunctionSpec {
        outputs: vec!["bench.out".into()],
        ..FunctionSpec::new(
            "relay",
            component("passthrough")?,
            "ENRICHED",
            "orders.enriched",
            KeySource::JsonPointer("/order_id".into()),
        )
    };
    let counter = FunctionSpec {
        outputs: vec!["counter.out".into()],
        ..FunctionSpec::new(
            "counter",
            component("counter")?,
            "COUNTED",
            "counted.in",
            KeySource::JsonPointer("/key".into()),
        )
    };
    let mut config = stack.config(
        vec![
            stream("ORDERS", &["orders.new"]),
            stream("ENRICHED", &["orders.enriched"]),
            stream("RELAYED", &["bench.out"]),
            stream("COUNTED", &["counted.in"]),
            stream("COUNTED_OUT", &["counter.out"]),
        ],
        vec![enrich, passthrough, counter],
    );
    config.tracing.otlp_endpoint = Some(receiver.endpoint());
    config.tracing.service_name = "weir-test".into();
    // New traces are never sampled here: only the producer's sampled
    // `traceparent` makes its trace recorded.
    config.tracing.sample_ratio = 0.0;
    let host = stack.host(config).await?;

    let traceparent = format!("00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", traceparent.as_str());
    let order = br#"{"order_id":"o-42","items":[{"sku":"a","qty":3,"price_cents":250}]}"#;
    stack
        .js
        .publish_with_headers("orders.new", headers, order.as_slice().into())
        .await?
        .await?;
    // The same order without a trace context: unsampled at ratio 0.
    stack
        .js
        .publish(
            "orders.new",
            br#"{"order_id":"o-43","items":[]}"#.as_slice().into(),
        )
        .await?
        .await?;
    let mut headers = async_nats::HeaderMap::new();
    let counted_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    headers.insert("traceparent", counted_parent);
    stack
        .js
        .publish_with_headers(
            "counted.in",
            headers,
            br#"{"key":"k","id":1,"value":5}"#.as_slice().into(),
        )
        .await?
        .await?;
    eventually(Duration::from_secs(60), "both orders relayed", || async {
        Ok(stream_len(&stack.js, "RELAYED").await? == 2
            && stream_len(&stack.js, "COUNTED_OUT").await? == 1)
    })
    .await?;
    // A graceful stop flushes the exporter.
    host.stop().await?;

    let relayed = read_stream(&stack.js, "RELAYED").await?;
    let traced_output = relayed
        .iter()
        .find(|m| m.payload.windows(4).any(|w| w == b"o-42"))
        .context("o-42 relayed")?;
    let untraced_output = relayed
        .iter()
        .find(|m| m.payload.windows(4).any(|w| w == b"o-43"))
        .context("o-43 relayed")?;

    let spans = receiver.trace(PRODUCER_TRACE);
    let a_process = one(&spans, "process orders.new")?;
    let a_invoke = one(&spans, "invoke enrich")?;
    let guest = one(&spans, "totals")?;
    let a_send = one(&spans, "send orders.enriched")?;
    let b_process = one(&spans, "process orders.enriched")?;
    let b_invoke = one(&spans, "invoke relay")?;
    let b_send = one(&spans, "send bench.out")?;
    let a_load = child(&spans, "state.load", a_process)?;
    child(&spans, "state.load", b_process)?;
    assert_eq!(
        spans.len(),
        9,
        "A: process, load, invoke, guest span, send; B: process, load, invoke, send: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );

    // Parent links, from the producer to B's publish.
    assert_eq!(a_process.parent_span_id, PRODUCER_SPAN);
    for child in [a_load, a_invoke, a_send] {
        assert_eq!(child.parent_span_id, a_process.span_id, "{}", child.name);
    }
    assert_eq!(guest.parent_span_id, a_invoke.span_id);
    assert_eq!(b_process.parent_span_id, a_send.span_id);
    assert_eq!(b_invoke.parent_span_id, b_process.span_id);
    assert_eq!(b_send.parent_span_id, b_process.span_id);
    let (trace_id, parent, sampled) = parse_traceparent(&header(traced_output, "traceparent"))?;
    assert_eq!(
        (trace_id.as_str(), parent.as_str(), sampled),
        (PRODUCER_TRACE, b_send.span_id.as_str(), true),
        "the relayed output points at B's send span"
    );

    // Kinds and attributes.
    assert_eq!(
        (a_process.kind, b_process.kind),
        (KIND_CONSUMER, KIND_CONSUMER)
    );
    assert_eq!((a_send.kind, b_send.kind), (KIND_PRODUCER, KIND_PRODUCER));
    assert_eq!((a_invoke.kind, guest.kind), (KIND_INTERNAL, KIND_INTERNAL));
    assert_eq!(a_process.service_name, "weir-test");
    for (key, value) in [
        ("messaging.system", "nats"),
        ("messaging.operation.type", "process"),
        ("messaging.destination.name", "orders.new"),
        ("messaging.consumer.group.name", "weir-enrich"),
        ("weir.function", "enrich"),
        ("weir.stream", "ORDERS"),
        ("weir.stream.sequence", "1"),
        ("weir.delivery.count", "1"),
        ("weir.key", "o-42"),
        ("weir.outcome", "applied"),
    ] {
        assert_eq!(a_process.attribute(key), Some(value), "{key}");
    }
    let version = a_process.attribute("weir.function.version").unwrap_or("");
    assert!(
        version.len() == 12 && version.chars().all(|c| c.is_ascii_hexdigit()),
        "version is the module digest prefix: {version:?}"
    );
    assert_eq!(guest.attribute("item_count"), Some("3"));
    assert_eq!(guest.attribute("weir.guest"), Some("true"));
    assert_eq!(
        a_send.attribute("messaging.destination.name"),
        Some("orders.enriched")
    );
    assert!(
        a_send
            .attribute("messaging.message.id")
            // weir:<function>.<incarnation>:<input sequence>:<index>
            .is_some_and(|id| id.starts_with("weir:enrich.") && id.ends_with(":1:0")),
        "{:?}",
        a_send.attribute("messaging.message.id")
    );
    // Timing nests: the guest span inside the invocation inside the process.
    assert!(a_process.start_ns <= a_invoke.start_ns && a_invoke.end_ns <= a_process.end_ns);
    assert!(a_invoke.start_ns <= guest.start_ns && guest.end_ns <= a_invoke.end_ns);

    // The untraced order: not sampled, so nothing exported, but its output
    // still carries a (not sampled) context for whatever reads it next.
    let (untraced_id, _, sampled) = parse_traceparent(&header(untraced_output, "traceparent"))?;
    assert!(!sampled);
    assert!(receiver.trace(&untraced_id).is_empty());

    // A stateful function: its commit is traced too.
    let counted = receiver.trace("0af7651916cd43dd8448eb211c80319c");
    let c_process = one(&counted, "process counted.in")?;
    child(&counted, "state.load", c_process)?;
    child(&counted, "state.commit", c_process)?;
    assert_eq!(c_process.attribute("weir.key"), Some("k"));
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_failed_event_is_traced_as_an_error_and_its_dead_letter_stays_in_the_trace(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let receiver = OtlpReceiver::start().await?;
    let enrich = FunctionSpec {
        outputs: vec!["orders.enriched".into()],
        ..FunctionSpec::new(
            "enrich",
            component("enrich")?,
            "ORDERS",
            "orders.new",
            KeySource::JsonPointer("/order_id".into()),
        )
    };
    let mut config = stack.config(
        vec![
            stream("ORDERS", &["orders.new"]),
            stream("ENRICHED", &["orders.enriched"]),
        ],
        vec![enrich],
    );
    config.tracing.otlp_endpoint = Some(receiver.endpoint());
    let host = stack.host(config).await?;
    // Rejected by enrich: no items.
    stack
        .js
        .publish("orders.new", br#"{"order_id":"bad"}"#.as_slice().into())
        .await?
        .await?;
    // A valid order whose trace header is garbage: handled, in a new trace.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", "00-not-a-trace-context");
    stack
        .js
        .publish_with_headers(
            "orders.new",
            headers,
            br#"{"order_id":"ok","items":[]}"#.as_slice().into(),
        )
        .await?
        .await?;
    eventually(Duration::from_secs(60), "the dead letter", || async {
        Ok(
            stream_len(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await? == 1
                && stream_len(&stack.js, "ENRICHED").await? == 1,
        )
    })
    .await?;
    host.stop().await?;

    let enriched = read_stream(&stack.js, "ENRICHED").await?;
    let (trace_id, parent, _) = parse_traceparent(&header(&enriched[0], "traceparent"))?;
    let spans = receiver.trace(&trace_id);
    let process = one(&spans, "process orders.new")?;
    assert_eq!(process.parent_span_id, "", "the garbage header is ignored");
    assert_eq!(process.attribute("weir.outcome"), Some("applied"));
    assert_eq!(one(&spans, "send orders.enriched")?.span_id, parent);

    let dead = read_stream(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await?;
    let (trace_id, parent, sampled) = parse_traceparent(&header(&dead[0], "traceparent"))?;
    assert!(sampled, "ratio 1.0 samples every new trace");
    let spans = receiver.trace(&trace_id);
    let process = one(&spans, "process orders.new")?;
    let send = one(&spans, "send weir.dlq.enrich")?;
    assert_eq!(process.parent_span_id, "", "a new trace starts at Weir");
    assert_eq!(process.attribute("weir.outcome"), Some("reject"));
    assert_eq!(process.status_code, 2, "error status");
    assert_eq!(send.parent_span_id, process.span_id);
    assert_eq!(parent, send.span_id);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn an_unreachable_trace_backend_costs_no_events(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let counter = FunctionSpec {
        outputs: vec!["counter.out".into()],
        batch_size: 50,
        ..FunctionSpec::new(
            "counter",
            component("counter")?,
            "COUNTED",
            "counted.in",
            KeySource::JsonPointer("/key".into()),
        )
    };
    let mut config = stack.config(
        vec![
            stream("COUNTED", &["counted.in"]),
            stream("COUNTED_OUT", &["counter.out"]),
        ],
        vec![counter],
    );
    // Nothing listens there.
    config.tracing.otlp_endpoint = Some(format!("http://127.0.0.1:{}", free_port()?));
    let host = stack.host(config).await?;
    let payloads = (0..500u64).map(|id| {
        serde_json::json!({"key": format!("k{}", id % 5), "id": id, "value": id})
            .to_string()
            .into_bytes()
    });
    publish_all(&stack.js, "counted.in", payloads).await?;
    eventually(Duration::from_secs(60), "every event counted", || async {
        Ok(stream_len(&stack.js, "COUNTED_OUT").await? == 500)
    })
    .await?;
    host.stop().await?;
    let counts = state_entries(&stack, "counter", "count").await?;
    let expected: Vec<(String, String)> = (0..5)
        .map(|k| (format!("k{k}"), "100".to_string()))
        .collect();
    assert_eq!(counts, expected);
    Ok(())
}

/// A window's firing is an invocation with no input message: it starts a
/// trace of its own (`fire <function>`, the window in its attributes),
/// with the guest call under it, and its output continues that trace.
#[sqlx::test(migrations = false)]
async fn a_window_firing_is_traced_and_its_output_continues_the_trace(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    use weir_host::windows::WindowKind;
    let stack = Stack::start(&db).await?;
    let receiver = OtlpReceiver::start().await?;
    let window = crate::windows::settings(WindowKind::Tumbling { size_ms: 1_000 }, 0, 0);
    let mut config = crate::windows::window_config(&stack, "window-sum", window)?;
    config.tracing.otlp_endpoint = Some(receiver.endpoint());
    let host = stack.host(config).await?;
    // Two events in [10 s, 11 s) and one at 20 s that closes that window.
    let events = [(1, 10_100), (2, 10_900), (3, 20_000)].map(|(id, ts)| {
        serde_json::json!({"id": id, "key": "k", "ts": ts, "value": 1})
            .to_string()
            .into_bytes()
    });
    publish_all(&stack.js, "events.in", events).await?;
    eventually(Duration::from_secs(60), "the firing", || async {
        Ok(stream_len(&stack.js, "WINDOWS").await? >= 1)
    })
    .await?;
    host.stop().await?;

    let outputs = read_stream(&stack.js, "WINDOWS").await?;
    let (trace_id, parent, sampled) = parse_traceparent(&header(&outputs[0], "traceparent"))?;
    assert!(sampled, "ratio 1.0 samples every new trace");
    let spans = receiver.trace(&trace_id);
    let fire = one(&spans, "fire win")?;
    assert_eq!(fire.parent_span_id, "", "a firing starts its own trace");
    assert_eq!(fire.kind, KIND_INTERNAL);
    assert_eq!(fire.attribute("weir.window.key"), Some("k"));
    assert_eq!(fire.attribute("weir.window.start_ms"), Some("10000"));
    assert_eq!(fire.attribute("weir.window.end_ms"), Some("11000"));
    assert_eq!(fire.attribute("weir.window.firing"), Some("0"));
    assert_eq!(fire.attribute("weir.outcome"), Some("fired"));
    child(&spans, "invoke win", fire)?;
    let send = child(&spans, "send windows.out", fire)?;
    assert_eq!(
        send.span_id, parent,
        "the output's context is its send span"
    );
    Ok(())
}
