//! `fraud-velocity` over 20,000 events and 500 cards: per-card counters in
//! Postgres and the alert outputs must equal an oracle computed from the
//! inputs, each alert exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Result;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;
use weir_host::config::{FunctionSpec, HostConfig, KeySource, TimeSource};

pub const WINDOW_MS: i64 = 60_000;
pub const THRESHOLD: usize = 5;

/// A card transaction as the producer sends it.
#[derive(Debug, Clone)]
pub struct Tx {
    pub card: String,
    pub ts: i64,
    pub amount_cents: u64,
}

impl Tx {
    pub fn payload(&self) -> Vec<u8> {
        serde_json::json!({"card": self.card, "amount_cents": self.amount_cents, "ts": self.ts})
            .to_string()
            .into_bytes()
    }
}

/// A small deterministic generator, so every run checks the same inputs.
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `per_card` transactions for each of `cards` cards, interleaved, with
/// gaps of 1–20 s of event time and one event in twenty out of order.
pub fn transactions(cards: usize, per_card: usize, seed: u64) -> Vec<Tx> {
    let mut rng = Lcg::new(seed);
    let mut clocks: Vec<i64> = (0..cards)
        .map(|i| 1_700_000_000_000 + i as i64 * 1_000)
        .collect();
    let mut left: Vec<usize> = vec![per_card; cards];
    let mut txs = Vec::with_capacity(cards * per_card);
    let mut open: Vec<usize> = (0..cards).collect();
    while !open.is_empty() {
        let pick = rng.below(open.len() as u64) as usize;
        let card = open[pick];
        let step = 1_000 + rng.below(19_000) as i64;
        let ts = if rng.below(20) == 0 {
            clocks[card] - rng.below(10_000) as i64
        } else {
            clocks[card] += step;
            clocks[card]
        };
        txs.push(Tx {
            card: format!("card-{card:04}"),
            ts,
            amount_cents: 100 + rng.below(50_000),
        });
        left[card] -= 1;
        if left[card] == 0 {
            open.swap_remove(pick);
        }
    }
    txs
}

/// What the function must produce: counts per card and alerts as
/// (card, sequence, in_window).
#[derive(Debug, Default, PartialEq)]
pub struct Expected {
    pub counts: BTreeMap<String, u64>,
    pub alerts: BTreeSet<(String, u64, usize)>,
}

/// The oracle, written from the function's specification, not its code.
pub fn expected(txs: &[Tx], sequences: &[u64]) -> Expected {
    struct Card {
        recent: Vec<i64>,
        max_ts: i64,
    }
    let mut cards: BTreeMap<String, Card> = BTreeMap::new();
    let mut out = Expected::default();
    for (tx, &sequence) in txs.iter().zip(sequences) {
        *out.counts.entry(tx.card.clone()).or_default() += 1;
        let card = cards.entry(tx.card.clone()).or_insert(Card {
            recent: Vec::new(),
            max_ts: i64::MIN,
        });
        card.recent.push(tx.ts);
        card.max_ts = card.max_ts.max(tx.ts);
        let floor = card.max_ts - WINDOW_MS;
        card.recent.retain(|&t| t > floor);
        let in_window = card
            .recent
            .iter()
            .filter(|&&t| t > tx.ts - WINDOW_MS && t <= tx.ts)
            .count();
        if in_window > THRESHOLD {
            out.alerts.insert((tx.card.clone(), sequence, in_window));
        }
    }
    out
}

/// A host config running `fraud-velocity` with its input and alert streams.
pub fn fraud_host(stack: &Stack, batch_size: usize) -> Result<HostConfig> {
    let function = FunctionSpec {
        event_time: TimeSource::JsonPointer("/ts".into()),
        outputs: vec!["alerts.velocity".into()],
        batch_size,
        ..FunctionSpec::new(
            "fraud-velocity",
            component("fraud-velocity")?,
            "CARDS",
            "cards.tx",
            KeySource::JsonPointer("/card".into()),
        )
    };
    Ok(stack.config(
        vec![
            stream("CARDS", &["cards.>"]),
            stream("ALERTS", &["alerts.>"]),
        ],
        vec![function],
    ))
}

/// The `count` entry of every card, from Postgres.
pub async fn stored_counts(pool: &sqlx::PgPool) -> Result<BTreeMap<String, u64>> {
    stored_counts_of(pool, "fraud-velocity").await
}

/// The `count` entry of every card of the function that runs as `function`.
pub async fn stored_counts_of(
    pool: &sqlx::PgPool,
    function: &str,
) -> Result<BTreeMap<String, u64>> {
    let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT key, value FROM weir_state WHERE function_name = $1 AND name = 'count'",
    )
    .bind(function)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(key, value)| Ok((key, serde_json::from_slice(&value)?)))
        .collect()
}

/// Every alert in the ALERTS stream as (card, sequence, in_window).
pub async fn stored_alerts(
    js: &async_nats::jetstream::Context,
) -> Result<Vec<(String, u64, usize)>> {
    read_stream(js, "ALERTS")
        .await?
        .iter()
        .map(|m| {
            let alert: serde_json::Value = serde_json::from_slice(&m.payload)?;
            Ok((
                alert["card"].as_str().unwrap_or_default().to_string(),
                alert["sequence"].as_u64().unwrap_or_default(),
                alert["in_window"].as_u64().unwrap_or_default() as usize,
            ))
        })
        .collect()
}

/// Asserts the ALERTS stream holds exactly the expected alerts, each once.
pub async fn assert_alerts_exact(stack: &Stack, expected: &Expected) -> Result<()> {
    let alerts = stored_alerts(&stack.js).await?;
    assert_eq!(
        alerts.len(),
        expected.alerts.len(),
        "each alert exactly once"
    );
    assert_eq!(alerts.into_iter().collect::<BTreeSet<_>>(), expected.alerts);
    Ok(())
}

/// Waits until the ALERTS stream holds `count` alerts.
pub async fn wait_for_alerts(stack: &Stack, count: usize) -> Result<()> {
    eventually(Duration::from_secs(30), "every alert", || async {
        Ok(stream_len(&stack.js, "ALERTS").await? >= count as u64)
    })
    .await
}

/// Waits until the per-card counters add up to `events`: every event is
/// applied once (more would overshoot, and the caller checks exact counts).
pub async fn drained(pool: &sqlx::PgPool, events: usize) -> Result<()> {
    drained_of(pool, "fraud-velocity", events).await
}

/// [`drained`] for the function that runs as `function`.
pub async fn drained_of(pool: &sqlx::PgPool, function: &str, events: usize) -> Result<()> {
    eventually(
        Duration::from_secs(120),
        "every event to be applied",
        || async {
            let applied: Option<i64> = sqlx::query_scalar(
                "SELECT sum(convert_from(value, 'UTF8')::bigint)::bigint FROM weir_state
             WHERE function_name = $1 AND name = 'count'",
            )
            .bind(function)
            .fetch_one(pool)
            .await?;
            Ok(applied.unwrap_or(0) as usize >= events)
        },
    )
    .await
}

#[sqlx::test(migrations = false)]
async fn counters_and_alerts_are_exact_over_20k_events(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let host = stack.host(fraud_host(&stack, 500)?).await?;

    let txs = transactions(500, 40, 7);
    let sequences = publish_all(&stack.js, "cards.tx", txs.iter().map(Tx::payload)).await?;
    let expected = expected(&txs, &sequences);
    assert!(
        expected.alerts.len() > 100,
        "the inputs should trigger plenty of alerts, got {}",
        expected.alerts.len()
    );

    let pool = stack.pool().await?;
    drained(&pool, txs.len()).await?;
    wait_for_alerts(&stack, expected.alerts.len()).await?;
    host.stop().await?;

    assert_eq!(stored_counts(&pool).await?, expected.counts);
    assert_alerts_exact(&stack, &expected).await?;
    assert_eq!(
        stream_len(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await?,
        0
    );
    Ok(())
}
