//! Notices a consumer that crawls: pulls that keep coming back empty while
//! the server says messages are pending (seen with nats-server 2.9 after
//! crashes), reported as a metric and a warning instead of going unseen.

use std::time::{Duration, Instant};

/// Empty pulls in a row, with messages pending, before it counts as a
/// stall.
const EMPTY_PULLS_TO_STALL: u32 = 6;
/// How often a continuing stall is logged again.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The stall state of one consumer.
#[derive(Debug)]
pub(super) struct StallWatch {
    function: String,
    /// Pending messages after the last delivery, as the server reported.
    pending: u64,
    empty_in_a_row: u32,
    warned_at: Option<Instant>,
    stalled: metrics::Gauge,
    stalls: metrics::Counter,
}

impl StallWatch {
    pub(super) fn new(function: &str) -> Self {
        Self {
            function: function.to_string(),
            pending: 0,
            empty_in_a_row: 0,
            warned_at: None,
            stalled: metrics::gauge!("weir_consumer_stalled", "function" => function.to_string()),
            stalls: metrics::counter!("weir_consumer_stalled_pulls_total", "function" => function.to_string()),
        }
    }

    /// A pull delivered messages; `pending` were left after the last.
    pub(super) fn delivered(&mut self, pending: u64) {
        self.pending = pending;
        if self.empty_in_a_row >= EMPTY_PULLS_TO_STALL {
            tracing::info!(function = %self.function, "the consumer delivers again");
        }
        self.empty_in_a_row = 0;
        self.stalled.set(0.0);
    }

    /// A pull waited its full time and got nothing.
    pub(super) fn empty_pull(&mut self) {
        if self.pending == 0 {
            return;
        }
        self.empty_in_a_row = self.empty_in_a_row.saturating_add(1);
        if self.empty_in_a_row < EMPTY_PULLS_TO_STALL {
            return;
        }
        self.stalls.increment(1);
        self.stalled.set(1.0);
        if self.warned_at.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            self.warned_at = Some(Instant::now());
            tracing::warn!(
                function = %self.function, pending = self.pending, empty_pulls = self.empty_in_a_row,
                "pulls keep coming back empty while messages are pending: the NATS server is not delivering (nats-server older than 2.10 is known to crawl after crashes)"
            );
        }
    }

    /// Whether the consumer counts as stalled now.
    #[cfg(test)]
    fn is_stalled(&self) -> bool {
        self.empty_in_a_row >= EMPTY_PULLS_TO_STALL && self.pending > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_pulls_with_pending_messages_are_a_stall() {
        let mut watch = StallWatch::new("f");
        for _ in 0..20 {
            watch.empty_pull();
        }
        assert!(!watch.is_stalled(), "nothing pending: idle, not stalled");
        watch.delivered(500);
        for _ in 0..EMPTY_PULLS_TO_STALL - 1 {
            watch.empty_pull();
        }
        assert!(!watch.is_stalled());
        watch.empty_pull();
        assert!(watch.is_stalled());
        watch.delivered(499);
        assert!(!watch.is_stalled());
    }
}
