//! `fraud-velocity`: alerts when a card is used more than [`THRESHOLD`] times within
//! [`WINDOW_MS`] of event time.
//!
//! The binding keys events by `/card` and takes event time from `/ts`, so the handler
//! reads them as `event.key` and `event.event_time_ms`. Per card it keeps, as JSON state:
//! `count` (every transaction seen), `max_ts` (the latest event time seen) and `recent`
//! (the sorted event times later than `max_ts - WINDOW_MS`). Late events are counted
//! against their own time: an event at `t` alerts when more than `THRESHOLD` of the
//! kept times fall in `(t - WINDOW_MS, t]`.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use weir_sdk::{Error, Event, emit, state};

/// An event alerts when more than this many of the card's transactions fall in its window.
pub const THRESHOLD: usize = 5;
/// The length of the rolling window, in milliseconds of event time.
pub const WINDOW_MS: i64 = 60_000;
/// Where alerts go.
pub const ALERT_SUBJECT: &str = "alerts.velocity";

/// The record published on [`ALERT_SUBJECT`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub card: String,
    /// The stream sequence of the transaction that crossed the threshold.
    pub sequence: u64,
    pub event_time_ms: i64,
    /// Transactions of the card in `(event_time_ms - WINDOW_MS, event_time_ms]`.
    pub in_window: usize,
}

#[weir_sdk::handler]
fn handle(event: Event) -> Result<(), Error> {
    // The binding already extracted the card and the time; only the JSON itself is checked.
    event.json::<IgnoredAny>()?;
    let t = event.event_time_ms;

    let count = state::get_json::<u64>("count")?
        .unwrap_or(0)
        .saturating_add(1);
    let max_ts = state::get_json::<i64>("max_ts")?.map_or(t, |max| max.max(t));
    let mut recent: Vec<i64> = state::get_json("recent")?.unwrap_or_default();

    recent.insert(recent.partition_point(|&x| x <= t), t);
    let expired = recent.partition_point(|&x| x <= max_ts.saturating_sub(WINDOW_MS));
    recent.drain(..expired);
    let since = t.saturating_sub(WINDOW_MS);
    let in_window = recent.iter().filter(|&&x| since < x && x <= t).count();

    state::set_json("count", &count)?;
    state::set_json("max_ts", &max_ts)?;
    state::set_json("recent", &recent)?;

    if in_window > THRESHOLD {
        let alert = Alert {
            card: event.key,
            sequence: event.sequence,
            event_time_ms: t,
            in_window,
        };
        emit::publish_json(ALERT_SUBJECT, &alert)?;
    }
    Ok(())
}

#[cfg(all(test, not(target_arch = "wasm32")))] // the harness is native-only
mod tests {
    use super::{ALERT_SUBJECT, Alert, THRESHOLD, WINDOW_MS, handle};
    use weir_sdk::Error;
    use weir_sdk::testing::{Harness, event};

    /// Sends a transaction of `card` at time `ts` with stream sequence `seq`.
    fn txn(h: &mut Harness, card: &str, ts: i64, seq: u64) -> Result<(), Error> {
        let payload = format!(r#"{{"card":"{card}","amount_cents":1250,"ts":{ts}}}"#);
        let e = event("payments", card, payload)
            .with_time(ts)
            .with_sequence(seq);
        h.call(handle, e)
    }

    fn alerts(h: &Harness) -> Vec<Alert> {
        h.emitted()
            .iter()
            .inspect(|out| assert_eq!(out.subject, ALERT_SUBJECT))
            .map(|out| out.json())
            .collect()
    }

    #[test]
    fn five_in_a_minute_do_not_alert_and_the_sixth_does() {
        let mut h = Harness::new();
        for (i, ts) in [0, 10_000, 20_000, 30_000, 40_000].into_iter().enumerate() {
            txn(&mut h, "c1", 1_000_000 + ts, i as u64 + 1).expect("ok");
        }
        assert!(h.emitted().is_empty(), "{:?}", h.emitted());

        txn(&mut h, "c1", 1_059_999, 6).expect("ok");
        assert_eq!(
            alerts(&h),
            [Alert {
                card: "c1".to_owned(),
                sequence: 6,
                event_time_ms: 1_059_999,
                in_window: THRESHOLD + 1,
            }]
        );
        assert_eq!(
            h.emitted()[0].headers,
            [("content-type".to_owned(), "application/json".to_owned())]
        );
    }

    #[test]
    fn the_window_excludes_its_start() {
        // Five transactions at 0..=40s, then one at exactly 60s: the one at 0 is out.
        let mut h = Harness::new();
        for (i, ts) in [0, 10_000, 20_000, 30_000, 40_000, WINDOW_MS]
            .into_iter()
            .enumerate()
        {
            txn(&mut h, "c1", ts, i as u64).expect("ok");
        }
        assert!(h.emitted().is_empty());
        assert_eq!(
            h.json_state::<Vec<i64>>("c1", "recent"),
            Some(vec![10_000, 20_000, 30_000, 40_000, 60_000])
        );
    }

    #[test]
    fn spaced_transactions_never_alert_and_count_is_exact() {
        let mut h = Harness::new();
        for i in 0..50 {
            txn(&mut h, "c1", i * 61_000, i as u64).expect("ok");
        }
        assert!(h.emitted().is_empty());
        assert_eq!(h.json_state::<u64>("c1", "count"), Some(50));
        assert_eq!(
            h.json_state::<Vec<i64>>("c1", "recent"),
            Some(vec![49 * 61_000])
        );
        assert_eq!(h.json_state::<i64>("c1", "max_ts"), Some(49 * 61_000));
    }

    #[test]
    fn every_transaction_over_the_threshold_alerts_and_cards_are_separate() {
        let mut h = Harness::new();
        for i in 0..8 {
            txn(&mut h, "c1", i * 1_000, i as u64).expect("ok");
            txn(&mut h, "c2", i * 20_000, 100 + i as u64).expect("ok");
        }
        let in_window: Vec<(String, usize)> = alerts(&h)
            .into_iter()
            .map(|a| (a.card, a.in_window))
            .collect();
        assert_eq!(
            in_window,
            [("c1".into(), 6), ("c1".into(), 7), ("c1".into(), 8)]
        );
        assert_eq!(h.json_state::<u64>("c1", "count"), Some(8));
        assert_eq!(h.json_state::<u64>("c2", "count"), Some(8));
        // c2's times are 0, 20s, .., 140s: only those after 140s - 60s stay.
        assert_eq!(
            h.json_state::<Vec<i64>>("c2", "recent"),
            Some(vec![100_000, 120_000, 140_000])
        );
    }

    #[test]
    fn out_of_order_times_count_against_their_own_window() {
        let mut h = Harness::new();
        // All six are within 60 s of each other, but the sixth (40s) sees only
        // 10s, 20s, 30s and 40s in (-20s, 40s].
        for (i, ts) in [10_000, 60_000, 20_000, 50_000, 30_000, 40_000]
            .into_iter()
            .enumerate()
        {
            txn(&mut h, "c1", ts, i as u64).expect("ok");
        }
        assert!(h.emitted().is_empty());
        assert_eq!(
            h.json_state::<Vec<i64>>("c1", "recent"),
            Some(vec![10_000, 20_000, 30_000, 40_000, 50_000, 60_000])
        );
        assert_eq!(h.json_state::<i64>("c1", "max_ts"), Some(60_000));

        // A seventh at 65s sees all seven in (5s, 65s].
        txn(&mut h, "c1", 65_000, 7).expect("ok");
        assert_eq!(
            alerts(&h).iter().map(|a| a.in_window).collect::<Vec<_>>(),
            [7]
        );
        assert_eq!(
            h.json_state::<Vec<i64>>("c1", "recent").map(|r| r.len()),
            Some(7)
        );

        // Far too late: counted, but dropped at once and alone in its window.
        txn(&mut h, "c1", 1_000, 8).expect("ok");
        assert_eq!(h.json_state::<u64>("c1", "count"), Some(8));
        assert_eq!(
            h.json_state::<Vec<i64>>("c1", "recent").map(|r| r.len()),
            Some(7)
        );
        assert_eq!(h.json_state::<i64>("c1", "max_ts"), Some(65_000));
        assert_eq!(h.emitted().len(), 1);
    }

    #[test]
    fn a_rejected_event_leaves_state_untouched() {
        let mut h = Harness::new();
        for i in 0..3 {
            txn(&mut h, "c1", i * 1_000, i as u64).expect("ok");
        }
        let before = ["count", "max_ts", "recent"].map(|name| h.state("c1", name));

        let bad = event("payments", "c1", "{\"card\": \"c1\", ").with_time(5_000);
        let result = h.call(handle, bad);
        assert!(matches!(result, Err(Error::Reject(_))), "{result:?}");
        assert_eq!(
            ["count", "max_ts", "recent"].map(|name| h.state("c1", name)),
            before
        );
        assert!(h.emitted().is_empty());
    }

    #[test]
    fn corrupt_state_is_rejected_and_kept() {
        let mut h = Harness::new().with_state("c1", "recent", b"[1, 2,");
        let result = txn(&mut h, "c1", 5_000, 1);
        let Err(Error::Reject(reason)) = result else {
            panic!("expected a reject, got {result:?}");
        };
        assert!(reason.contains("\"recent\""), "{reason}");
        assert_eq!(h.state("c1", "recent"), Some(b"[1, 2,".to_vec()));
        assert_eq!(h.state("c1", "count"), None);
    }
}
