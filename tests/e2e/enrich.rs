//! `enrich`: every valid order yields exactly one enriched output; malformed
//! inputs land on the dead-letter subject with the reason in headers, and
//! the orders behind them flow on. The inputs and checks are shared with
//! the other languages' `enrich` (`languages.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Result;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;
use weir_host::config::{FunctionSpec, KeySource};
use weir_host::output::dead_letter_headers as dlq;

#[sqlx::test(migrations = false)]
async fn valid_orders_are_enriched_and_bad_ones_dead_lettered(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let enrich = FunctionSpec {
        outputs: vec!["orders.enriched".into()],
        batch_size: 100,
        ..FunctionSpec::new(
            "enrich",
            component("enrich")?,
            "ORDERS",
            "orders.created",
            KeySource::JsonPointer("/order_id".into()),
        )
    };
    let config = stack.config(
        vec![
            stream("ORDERS", &["orders.created"]),
            stream("ENRICHED", &["orders.enriched"]),
        ],
        vec![enrich],
    );
    let host = stack.host(config).await?;
    let js = &stack.js;

    let orders = orders();
    let sequences = publish_all(js, "orders.created", orders.inputs.clone()).await?;
    wait_for_enriched(&stack, &orders).await?;
    host.stop().await?;
    assert_enriched_exactly(&stack, &orders, &sequences, "weir.dlq.enrich", "enrich").await?;
    Ok(())
}

/// 1,000 good orders; every 50th input is not JSON (the host cannot find
/// the key: bad-event), every 100th has no items (the guest rejects it).
pub struct Orders {
    pub inputs: Vec<Vec<u8>>,
    /// (total_cents, item_count) per order id.
    pub expected_totals: BTreeMap<String, (u64, u64)>,
    pub not_json: usize,
    pub no_items: usize,
}

pub fn orders() -> Orders {
    let mut inputs = Vec::new();
    let mut expected_totals = BTreeMap::new();
    let mut not_json = 0;
    let mut no_items = 0;
    for i in 0..1_000u64 {
        if i % 50 == 25 {
            inputs.push(format!("{{not json {i}").into_bytes());
            not_json += 1;
        }
        if i % 100 == 75 {
            inputs.push(format!(r#"{{"order_id":"bad-{i}","note":"no items"}}"#).into_bytes());
            no_items += 1;
        }
        let order_id = format!("order-{i}");
        let items = serde_json::json!([
            {"sku": "a", "qty": 1 + i % 3, "price_cents": 250},
            {"sku": "b", "qty": 2, "price_cents": 1_000 + i},
        ]);
        let total = (1 + i % 3) * 250 + 2 * (1_000 + i);
        expected_totals.insert(order_id.clone(), (total, 1 + i % 3 + 2));
        inputs.push(
            serde_json::json!({"order_id": order_id, "items": items, "customer": "c"})
                .to_string()
                .into_bytes(),
        );
    }
    Orders {
        inputs,
        expected_totals,
        not_json,
        no_items,
    }
}

/// Waits until ENRICHED holds an output per valid order and the dead-letter
/// stream a record per bad input.
pub async fn wait_for_enriched(stack: &Stack, orders: &Orders) -> Result<()> {
    let js = &stack.js;
    let dead_total = (orders.not_json + orders.no_items) as u64;
    eventually(
        Duration::from_secs(60),
        "all outputs and dead letters",
        || async {
            Ok(
                stream_len(js, "ENRICHED").await? >= orders.expected_totals.len() as u64
                    && stream_len(js, weir_host::serve::DEAD_LETTER_STREAM).await? >= dead_total,
            )
        },
    )
    .await
}

/// Exactly one output per valid order with exact totals, and exactly one
/// dead letter per bad input on `dead_letter_subject`, with the reason.
pub async fn assert_enriched_exactly(
    stack: &Stack,
    orders: &Orders,
    sequences: &[u64],
    dead_letter_subject: &str,
    function: &str,
) -> Result<()> {
    let js = &stack.js;
    let bad_sequences: BTreeSet<u64> = orders
        .inputs
        .iter()
        .zip(sequences)
        .filter(|(payload, _)| {
            payload.starts_with(b"{not") || payload.windows(8).any(|w| w == b"no items")
        })
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(bad_sequences.len(), orders.not_json + orders.no_items);
    let enriched = read_stream(js, "ENRICHED").await?;
    assert_eq!(
        enriched.len(),
        orders.expected_totals.len(),
        "exactly one output per valid order"
    );
    let mut seen = BTreeMap::new();
    for message in &enriched {
        let order: serde_json::Value = serde_json::from_slice(&message.payload)?;
        let id = order["order_id"].as_str().unwrap_or_default().to_string();
        assert_eq!(order["customer"], "c", "original fields are kept");
        let totals = (
            order["total_cents"].as_u64().unwrap_or(u64::MAX),
            order["item_count"].as_u64().unwrap_or(u64::MAX),
        );
        assert!(
            seen.insert(id, totals).is_none(),
            "an order was enriched twice"
        );
    }
    assert_eq!(seen, orders.expected_totals);

    let dead = read_stream(js, weir_host::serve::DEAD_LETTER_STREAM).await?;
    assert_eq!(dead.len(), bad_sequences.len());
    let mut kinds = BTreeMap::new();
    let mut dead_sequences = BTreeSet::new();
    for message in &dead {
        assert_eq!(message.subject.as_str(), dead_letter_subject);
        let header = |name: &str| header(message, name);
        assert_eq!(header(dlq::FUNCTION), function);
        assert_eq!(header(dlq::SUBJECT), "orders.created");
        assert_eq!(header(dlq::ATTEMPTS), "1");
        let kind = header(dlq::KIND);
        let reason = header(dlq::REASON);
        match kind.as_str() {
            "bad-event" => {
                assert!(reason.contains("not JSON"), "reason: {reason}");
                assert!(
                    message.payload.starts_with(b"{not"),
                    "the original payload is kept"
                );
            }
            "reject" => assert!(reason.contains("items"), "reason: {reason}"),
            other => panic!("unexpected dead-letter kind {other}: {reason}"),
        }
        *kinds.entry(kind).or_insert(0) += 1;
        dead_sequences.insert(header(dlq::SEQUENCE).parse::<u64>()?);
    }
    assert_eq!(kinds.get("bad-event"), Some(&orders.not_json));
    assert_eq!(kinds.get("reject"), Some(&orders.no_items));
    assert_eq!(dead_sequences, bad_sequences);
    Ok(())
}
