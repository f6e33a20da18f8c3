//! Poison events among good ones: an event whose key holds U+0000 (which a
//! Postgres `TEXT` column refuses), one carrying JetStream's
//! `Nats-Expected-*` headers (accepted on its own publish, fatal to a
//! re-publish that copies them), and one the function rejects. Each ends as
//! exactly one dead letter, and every good event around them is counted
//! exactly once: nothing wedges the function.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use async_nats::HeaderMap;
use async_nats::jetstream;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;
use weir_host::config::{FunctionSpec, KeySource};
use weir_host::output::dead_letter_headers as dlq;
use weir_host::serve::DEAD_LETTER_STREAM;

const EVENTS: u64 = 200;
const KEYS: u64 = 4;
/// The event carrying `Nats-Expected-*` headers: the second on its subject,
/// so that "the last sequence on the subject is 1" holds when it is
/// published, and before the other poison, so that its dead letter is the
/// first on the dead-letter subject, where it cannot hold.
const EXPECTING: u64 = 1;
/// The event whose key holds U+0000.
const NUL_KEY: u64 = 60;
/// The event the counter rejects.
const REJECTED: u64 = 130;

/// The input of event `id`, as the `counter` fixture reads it.
fn input(id: u64) -> serde_json::Value {
    let key = match id {
        NUL_KEY => "k\u{0}x".to_string(),
        _ => format!("k{}", id % KEYS),
    };
    let poison = id == EXPECTING || id == REJECTED;
    serde_json::json!({"key": key, "id": id, "value": id, "poison": poison})
}

fn is_good(id: u64) -> bool {
    ![EXPECTING, NUL_KEY, REJECTED].contains(&id)
}

#[sqlx::test(migrations = false)]
async fn poison_events_are_dead_lettered_once_and_wedge_nothing(
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
            "COUNTER_IN",
            "counter.in",
            KeySource::JsonPointer("/key".into()),
        )
    };
    let config = stack.config(
        vec![
            stream("COUNTER_IN", &["counter.in"]),
            stream("COUNTER_OUT", &["counter.out"]),
        ],
        vec![counter],
    );
    let dead_letter_subject = format!("{}.counter", config.dead_letter_prefix);
    let host = stack.host(config).await?;
    let sequences = publish_inputs(&stack.js).await?;

    let good = (0..EVENTS).filter(|id| is_good(*id)).count() as u64;
    eventually(
        Duration::from_secs(90),
        "every good event's output and every poison event's dead letter (a wedged function stops short)",
        || async {
            host.check()?;
            Ok(stream_len(&stack.js, "COUNTER_OUT").await? >= good
                && stream_len(&stack.js, DEAD_LETTER_STREAM).await? >= 3)
        },
    )
    .await?;
    host.check()?;
    host.stop().await?;

    check_dead_letters(&stack.js, &dead_letter_subject, &sequences).await?;
    assert_eq!(
        stream_len(&stack.js, "COUNTER_OUT").await?,
        good,
        "one output per good event"
    );
    assert_eq!(
        state_entries(&stack, "counter", "count").await?,
        expected_state(|_| 1),
        "per-key counts"
    );
    assert_eq!(
        state_entries(&stack, "counter", "sum").await?,
        expected_state(|id| id),
        "per-key sums"
    );
    Ok(())
}

/// Each key's total of `amount(id)` over the good events, as the counter
/// stores it (JSON text).
fn expected_state(amount: impl Fn(u64) -> u64) -> Vec<(String, String)> {
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for id in (0..EVENTS).filter(|id| is_good(*id)) {
        *totals.entry(format!("k{}", id % KEYS)).or_default() += amount(id);
    }
    totals
        .into_iter()
        .map(|(key, total)| (key, total.to_string()))
        .collect()
}

/// Publishes the events in id order; returns the stream sequence of each
/// poison event, by id. The one with `Nats-Expected-*` headers is checked
/// to be stored with them: JetStream keeps the headers it acted on.
async fn publish_inputs(js: &jetstream::Context) -> Result<BTreeMap<u64, u64>> {
    let payload = |id: u64| input(id).to_string().into_bytes();
    let first = js.publish("counter.in", payload(0).into()).await?.await?;
    ensure!(first.sequence == 1, "the input stream starts empty");
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", "1");
    headers.insert("Nats-Expected-Stream", "COUNTER_IN");
    let expecting = js
        .publish_with_headers("counter.in", headers, payload(EXPECTING).into())
        .await?
        .await
        .context("JetStream accepts the expected-sequence input")?;
    let stored = js
        .get_stream("COUNTER_IN")
        .await?
        .get_raw_message(expecting.sequence)
        .await?;
    ensure!(
        stored
            .headers
            .get("Nats-Expected-Last-Subject-Sequence")
            .is_some(),
        "JetStream stored the input without its expected-sequence header: {:?}",
        stored.headers
    );
    let rest = publish_all(js, "counter.in", (EXPECTING + 1..EVENTS).map(payload)).await?;
    let sequence_of = |id: u64| rest[(id - EXPECTING - 1) as usize];
    Ok(BTreeMap::from([
        (EXPECTING, expecting.sequence),
        (NUL_KEY, sequence_of(NUL_KEY)),
        (REJECTED, sequence_of(REJECTED)),
    ]))
}

/// Exactly one dead letter per poison event (counted by the original
/// sequence, so a duplicate the stream stored would show), each with its
/// kind and reason and without a header JetStream would act on.
async fn check_dead_letters(
    js: &jetstream::Context,
    subject: &str,
    poison: &BTreeMap<u64, u64>,
) -> Result<()> {
    let mut seen: BTreeMap<u64, Vec<async_nats::Message>> = BTreeMap::new();
    for message in read_stream(js, DEAD_LETTER_STREAM).await? {
        if message.subject.as_str() == subject {
            let sequence = header(&message, dlq::SEQUENCE).parse::<u64>()?;
            seen.entry(sequence).or_default().push(message);
        }
    }
    let counts: BTreeMap<u64, usize> = seen.iter().map(|(s, m)| (*s, m.len())).collect();
    let expected: BTreeMap<u64, usize> = poison.values().map(|s| (*s, 1)).collect();
    assert_eq!(counts, expected, "one dead letter per poison event");
    for (id, sequence) in poison {
        check_dead_letter(*id, &seen[sequence][0]);
    }
    Ok(())
}

/// The dead letter of poison event `id`: its kind, its reason, its input's
/// payload, and no header JetStream would act on beyond Weir's message id.
fn check_dead_letter(id: u64, message: &async_nats::Message) {
    let (kind, reason) = (header(message, dlq::KIND), header(message, dlq::REASON));
    let expected_kind = if id == NUL_KEY { "bad-event" } else { "reject" };
    assert_eq!(kind, expected_kind, "event {id}: {reason}");
    if id == NUL_KEY {
        assert!(reason.contains("U+0000"), "{reason}");
    }
    assert_eq!(message.payload.as_ref(), input(id).to_string().as_bytes());
    let steering: Vec<String> = message
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .map(|(name, _)| name.to_string())
        .filter(|name| name.to_ascii_lowercase().starts_with("nats-"))
        .filter(|name| !name.eq_ignore_ascii_case("Nats-Msg-Id"))
        .collect();
    assert!(steering.is_empty(), "event {id}: {steering:?}");
}
