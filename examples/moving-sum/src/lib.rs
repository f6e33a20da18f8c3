//! `moving-sum`: each account's payments over the last five minutes,
//! every minute — a sliding window, kept as one-minute panes so that an
//! event is folded once however many windows it falls in.
//!
//! Bind it with `key = { json_pointer = "/account" }`, `event_time =
//! { json_pointer = "/ts" }` and `window.kind = { sliding = { size_ms =
//! 300000, slide_ms = 60000 } }`. Input `{"account": "a1", "ts": ...,
//! "cents": 1250}`; each window publishes a [`MovingSum`] to
//! [`SUM_SUBJECT`].

use serde::{Deserialize, Serialize};
use weir_sdk::window::{Firing, IncrementalWindow};
use weir_sdk::{Error, Event, emit};

/// Where sums go.
pub const SUM_SUBJECT: &str = "payments.moving-sum";

#[derive(Deserialize)]
struct Payment {
    cents: i64,
}

/// The record published per account and window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovingSum {
    pub account: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub payments: u64,
    pub cents: i64,
    pub firing: u32,
}

/// Payments so far: how many, and their total.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Total {
    payments: u64,
    cents: i64,
}

pub struct MovingSumWindow;

impl IncrementalWindow for MovingSumWindow {
    type Accumulator = Total;

    fn fold(total: &mut Total, event: &Event) -> Result<(), Error> {
        let payment: Payment = event.json()?;
        total.payments += 1;
        total.cents = total
            .cents
            .checked_add(payment.cents)
            .ok_or_else(|| Error::reject("the sum overflows"))?;
        Ok(())
    }

    fn merge(earlier: Total, later: Total) -> Total {
        Total {
            payments: earlier.payments + later.payments,
            cents: earlier.cents.saturating_add(later.cents),
        }
    }

    fn fire(firing: &Firing, total: Total) -> Result<(), Error> {
        emit::publish_json(
            SUM_SUBJECT,
            &MovingSum {
                account: firing.key.clone(),
                start_ms: firing.start_ms,
                end_ms: firing.end_ms,
                payments: total.payments,
                cents: total.cents,
                firing: firing.number,
            },
        )
    }
}

weir_sdk::incremental_window!(MovingSumWindow);

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use weir_sdk::testing::{Incremental, WindowHarness, WindowKind, WindowSettings, event};

    const MINUTE: i64 = 60_000;

    #[test]
    fn every_minute_sums_the_last_five() {
        let settings = WindowSettings {
            kind: WindowKind::Sliding {
                size_ms: 5 * MINUTE,
                slide_ms: MINUTE,
            },
            out_of_orderness_ms: 0,
            allowed_lateness_ms: 0,
            idle_timeout_ms: MINUTE,
            late_subject: None,
        };
        let mut h = WindowHarness::<Incremental<MovingSumWindow>>::incremental(settings);
        // One payment of 100 cents in each of the first ten minutes.
        for minute in 0..10 {
            let payload = r#"{"account":"a1","cents":100}"#;
            let payment = event("payments", "a1", payload).with_time(minute * MINUTE + 1);
            h.event(payment).expect("folds");
        }
        h.advance_watermark_to(20 * MINUTE);
        let sums: Vec<MovingSum> = h.emitted().iter().map(|e| e.json()).collect();
        // Windows start every minute from 4 minutes before the first
        // payment to the last one: 14 windows.
        assert_eq!(sums.len(), 14);
        let full = sums
            .iter()
            .find(|s| s.start_ms == 2 * MINUTE)
            .expect("the window [2, 7) minutes");
        assert_eq!((full.payments, full.cents), (5, 500));
        let edge = sums
            .iter()
            .find(|s| s.start_ms == -4 * MINUTE)
            .expect("first");
        assert_eq!((edge.payments, edge.cents), (1, 100));
    }
}
