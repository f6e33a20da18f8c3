//! `--only windows`: Nexmark q5, q7 and q11 over a replayed JetStream
//! stream of bids, run by Weir (the `nexmark` Wasm component, state in
//! Postgres) and, side by side in the same run, by a native Rust consumer
//! of the same stream computing the same windows in memory with the same
//! window rules (`weir-window-core`): the difference is the cost of the
//! sandbox and the platform (durable state, exactly-once commits).
//!
//! - q5, hot items: bids per auction, sliding 10 s every 2 s;
//! - q7, highest bid: the highest price per tumbling 10 s window (one key);
//! - q11, user sessions: bids per bidder session, gap 10 s.
//!
//! Then q5 again, natively and on Weir, as the slide shrinks from 2 s to
//! 100 ms: with panes, folding an event costs the same whatever the
//! overlap, and a firing a bounded number of merges; the firings
//! themselves (one result published per auction and window) grow as
//! size/slide, for the native consumer as for Weir.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use async_nats::jetstream;
use serde::Deserialize;
use weir_e2e::*;
use weir_host::config::{FunctionSpec, KeySource, TimeSource};
use weir_host::windows::{Placement, WindowCore, WindowKind, WindowSettings};

use super::{BATCH, fresh_stream, median, process_cpu};

/// One Nexmark query as a window binding.
#[derive(Debug, Clone, Copy)]
struct Query {
    name: &'static str,
    kind: WindowKind,
    /// The bid field that keys it; none: one key for all bids.
    key: Option<&'static str>,
}

const SECOND: i64 = 1_000;

fn queries() -> [Query; 3] {
    [
        Query {
            name: "q5",
            kind: WindowKind::Sliding {
                size_ms: 10 * SECOND,
                slide_ms: 2 * SECOND,
            },
            key: Some("auction"),
        },
        Query {
            name: "q7",
            kind: WindowKind::Tumbling {
                size_ms: 10 * SECOND,
            },
            key: None,
        },
        Query {
            name: "q11",
            kind: WindowKind::Session {
                gap_ms: 10 * SECOND,
            },
            key: Some("bidder"),
        },
    ]
}

fn settings(kind: WindowKind) -> WindowSettings {
    WindowSettings {
        kind,
        out_of_orderness_ms: SECOND,
        allowed_lateness_ms: 0,
        idle_timeout_ms: 60 * SECOND,
        late_subject: None,
    }
}

#[derive(Deserialize)]
struct Bid {
    auction: String,
    bidder: String,
    price: u64,
    ts: i64,
}

/// `events` bids at 1,000 per second of event time, out of order within
/// half a second; half of them on 10 hot auctions of 1,000, bidders
/// 5,000. Deterministic.
fn bids(events: usize) -> Vec<Vec<u8>> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let base = 1_700_000_000_000i64;
    (0..events)
        .map(|i| {
            let auction = match next() % 2 {
                0 => next() % 10,
                _ => next() % 1_000,
            };
            let ts = base + i as i64 - (next() % 500) as i64;
            serde_json::json!({
                "auction": format!("a{auction}"),
                "bidder": format!("b{}", next() % 5_000),
                "price": 100 + next() % 10_000,
                "ts": ts,
            })
            .to_string()
            .into_bytes()
        })
        .collect()
}

/// Runs the queries: per round, each query natively and on Weir, over the
/// same pre-published stream; then the slide sweep of q5.
pub async fn run(
    nats: &NatsServer,
    js: &jetstream::Context,
    url: &str,
    pool: &sqlx::PgPool,
    artifacts: &std::path::Path,
    events: usize,
    rounds: usize,
) -> Result<()> {
    println!("nexmark: {events} bids, 1,000 per second of event time, {rounds} rounds");
    // The schema, before the first progress query (a host would make it
    // at start, racing that query).
    weir_host::state::StateStore::open(pool.clone(), 1 << 20).await?;
    fresh_stream(js, "NEXMARK_OUT", "nexmark.>").await?;
    let payloads = bids(events);
    let mut lines = Vec::new();
    for query in queries() {
        let (mut native, mut native_cpu) = (Vec::new(), Vec::new());
        let (mut weir, mut weir_cpu) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let input = format!("NEXMARK_{}_{round}", query.name.to_uppercase());
            let subject = format!("bids.{}.{round}", query.name);
            fresh_stream(js, &input, &subject).await?;
            let sequences = publish_all(js, &subject, payloads.clone()).await?;
            let last = sequences.last().copied().unwrap_or(0);
            let (native_rate, native_us, _) = native_query(js, &input, query, events).await?;
            native.push(native_rate);
            native_cpu.push(native_us);
            let (rate, cpu) = weir_query(
                nats, js, url, pool, artifacts, &input, &subject, query, events, last,
            )
            .await?;
            weir.push(rate);
            weir_cpu.push(cpu);
            println!(
                "{} round {}: native {native_rate:>8.0} ev/s ({native_us:.1} CPU-µs/ev) | weir {rate:>8.0} ev/s ({cpu:.1} CPU-µs/ev)",
                query.name,
                round + 1,
            );
        }
        lines.push(format!(
            "{}: native {:.0} ev/s ({:.1} CPU-µs/ev), weir {:.0} ev/s ({:.1} CPU-µs/ev), weir/native {:.2}",
            query.name,
            median(&native),
            median(&native_cpu),
            median(&weir),
            median(&weir_cpu),
            median(&weir) / median(&native),
        ));
    }
    for line in &lines {
        println!("median {line}");
    }
    let mut sweep = Vec::new();
    for slide in [2_000, 1_000, 500, 200, 100] {
        let query = Query {
            name: "q5",
            kind: WindowKind::Sliding {
                size_ms: 10 * SECOND,
                slide_ms: slide,
            },
            key: Some("auction"),
        };
        let input = format!("NEXMARK_SWEEP_{slide}");
        let subject = format!("bids.sweep.{slide}");
        fresh_stream(js, &input, &subject).await?;
        let sequences = publish_all(js, &subject, payloads.clone()).await?;
        let last = sequences.last().copied().unwrap_or(0);
        // Native first: what the query itself costs as the slide shrinks
        // (its firings, each published, grow as size/slide).
        let (native_rate, native_us, firings) = native_query(js, &input, query, events).await?;
        let (rate, cpu) = weir_query(
            nats, js, url, pool, artifacts, &input, &subject, query, events, last,
        )
        .await?;
        sweep.push(format!(
            "slide {slide} ms ({:.1} firings/bid): native {native_rate:.0} ev/s ({native_us:.1} CPU-µs/ev), weir {rate:.0} ev/s ({cpu:.1} CPU-µs/ev), weir/native {:.2}",
            firings as f64 / events as f64,
            rate / native_rate,
        ));
    }
    println!("q5 as the slide shrinks:");
    for line in &sweep {
        println!("  {line}");
    }
    Ok(())
}

/// The query run by Weir over the stream `input`: events/s from start to
/// every bid applied, and the host's CPU-µs per bid.
#[allow(clippy::too_many_arguments)]
async fn weir_query(
    nats: &NatsServer,
    js: &jetstream::Context,
    url: &str,
    pool: &sqlx::PgPool,
    artifacts: &std::path::Path,
    input: &str,
    subject: &str,
    query: Query,
    events: usize,
    last: u64,
) -> Result<(f64, f64)> {
    let _ = js;
    let name = format!("nexmark-{}", input.to_lowercase().replace('_', "-"));
    let key = match query.key {
        Some(field) => KeySource::JsonPointer(format!("/{field}")),
        // Every bid under one key: its subject's first token.
        None => KeySource::SubjectToken(0),
    };
    let mut config = host_config(nats, url, artifacts);
    config.functions = vec![FunctionSpec {
        event_time: TimeSource::JsonPointer("/ts".into()),
        outputs: vec!["nexmark.out".into()],
        batch_size: BATCH,
        window: Some(settings(query.kind)),
        ..FunctionSpec::new(name.clone(), component("nexmark")?, input, subject, key)
    }];
    super::timed_until_applied(config, events, pool, &name, i64::try_from(last)?).await
}

/// The query run natively: a pull consumer of `input` in this process,
/// batches of [`BATCH`], the windows in memory, each window's result
/// published with a message id, inputs acked after. Events/s and this
/// process's CPU-µs per event (nats client included, as Weir's is).
async fn native_query(
    js: &jetstream::Context,
    input: &str,
    query: Query,
    events: usize,
) -> Result<(f64, f64, usize)> {
    let started = Instant::now();
    let cpu = process_cpu();
    let mut messages = super::pull_messages(js, input, "native").await?;
    let mut windows = NativeWindows::new(settings(query.kind));
    let (mut done, mut firings) = (0, 0);
    while done < events {
        let batch = super::next_batch(&mut messages).await?;
        for message in &batch {
            let bid: Bid = serde_json::from_slice(&message.payload)?;
            let key = match query.key {
                Some("auction") => bid.auction,
                Some(_) => bid.bidder,
                None => "nexmark".to_string(),
            };
            windows.place(key, bid.ts, bid.price);
        }
        let results = windows.fire();
        firings += results.len();
        let results = results
            .into_iter()
            .map(|(id, payload)| (id, payload.into()))
            .collect();
        super::publish_then_ack(js, "nexmark.native", results, &batch).await?;
        done += batch.len();
    }
    let cpu_used = process_cpu().saturating_sub(cpu);
    Ok((
        events as f64 / started.elapsed().as_secs_f64(),
        cpu_used.as_secs_f64() * 1e6 / events as f64,
        firings,
    ))
}

/// Windows in memory: the core places and fires, the parts are (bids,
/// highest price) per (key, part).
struct NativeWindows {
    core: WindowCore,
    parts: HashMap<(String, i64), (u64, u64)>,
}

impl NativeWindows {
    fn new(settings: WindowSettings) -> Self {
        Self {
            core: WindowCore::new(settings),
            parts: HashMap::new(),
        }
    }

    fn place(&mut self, key: String, ts: i64, price: u64) {
        let fold = |part: &mut (u64, u64)| {
            part.0 += 1;
            part.1 = part.1.max(price);
        };
        match self.core.place(&key, ts, 0) {
            Placement::Pane { pane } => fold(self.parts.entry((key, pane)).or_default()),
            Placement::Session { window, absorbed } => {
                let mut merged = (0, 0);
                for old in absorbed {
                    if let Some((bids, max)) = self.parts.remove(&(key.clone(), old.start_ms)) {
                        merged = (merged.0 + bids, merged.1.max(max));
                    }
                }
                fold(&mut merged);
                let part = self.parts.entry((key, window.start_ms)).or_default();
                *part = (part.0 + merged.0, part.1.max(merged.1));
            }
            Placement::OutOfRange | Placement::TooLate { .. } => {}
        }
    }

    /// The results of the windows due: (message id, payload).
    fn fire(&mut self) -> Vec<(String, Vec<u8>)> {
        let advance = self.core.advance(0);
        let mut results = Vec::with_capacity(advance.firings.len());
        for firing in advance.firings {
            let (bids, max_price) = firing
                .parts
                .iter()
                .filter_map(|p| self.parts.get(&(firing.key.clone(), *p)))
                .fold((0, 0), |(b, m), (pb, pm)| (b + pb, m.max(*pm)));
            let id = format!(
                "native:{}:{}:{}",
                firing.window.start_ms, firing.firing, firing.key
            );
            let payload = serde_json::json!({
                "key": firing.key, "start": firing.window.start_ms, "end": firing.window.end_ms,
                "firing": firing.firing, "bids": bids, "max_price": max_price,
            });
            results.push((id, payload.to_string().into_bytes()));
        }
        for part in advance.expired {
            self.parts.remove(&part);
        }
        results
    }
}
