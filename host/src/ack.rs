//! The ack decision: a pure function from an event's outcome and attempt
//! number to what the host tells JetStream.
//!
//! Nothing is dropped: an event is acked only once applied (or already
//! applied), naked with a backoff while it may still succeed, and otherwise
//! dead-lettered (published to the dead-letter subject, then terminated).

use std::time::Duration;

use crate::config::RetryPolicy;
use crate::outcome::EventOutcome;

/// What to tell JetStream about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckDecision {
    Ack,
    /// Deliver again after `delay`.
    Nak {
        delay: Duration,
    },
    /// Publish to the dead-letter subject, then terminate the message.
    DeadLetter,
}

/// Decides for an event on its `attempt`th run (1 the first time; deliveries
/// deferred by the circuit breaker do not count).
pub fn decide(outcome: &EventOutcome, attempt: u64, policy: &RetryPolicy) -> AckDecision {
    match outcome {
        EventOutcome::Applied | EventOutcome::AlreadyApplied => AckDecision::Ack,
        EventOutcome::Deferred { retry_after } => AckDecision::Nak {
            delay: *retry_after,
        },
        EventOutcome::Failed(failure) => {
            if failure.kind.is_retryable() && attempt < u64::from(policy.max_attempts) {
                AckDecision::Nak {
                    delay: backoff(attempt, policy),
                }
            } else {
                AckDecision::DeadLetter
            }
        }
    }
}

/// Delay before attempt `delivered + 1`: doubling from the initial backoff,
/// capped.
pub fn backoff(delivered: u64, policy: &RetryPolicy) -> Duration {
    let doublings = delivered.saturating_sub(1).min(32) as u32;
    let millis = policy
        .initial_backoff_ms
        .saturating_mul(1u64 << doublings)
        .min(policy.max_backoff_ms);
    Duration::from_millis(millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{Failure, FailureKind};

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff_ms: 100,
            max_backoff_ms: 250,
        }
    }

    fn failed(kind: FailureKind) -> EventOutcome {
        EventOutcome::Failed(Failure::new(kind, "x"))
    }

    #[test]
    fn decision_table() {
        let nak = |ms| AckDecision::Nak {
            delay: Duration::from_millis(ms),
        };
        let cases = [
            (EventOutcome::Applied, 1, AckDecision::Ack),
            (EventOutcome::Applied, 9, AckDecision::Ack),
            (EventOutcome::AlreadyApplied, 2, AckDecision::Ack),
            (failed(FailureKind::GuestRetry), 1, nak(100)),
            (failed(FailureKind::GuestRetry), 2, nak(200)),
            (failed(FailureKind::GuestRetry), 3, AckDecision::DeadLetter),
            (failed(FailureKind::Trap), 1, nak(100)),
            (failed(FailureKind::Timeout), 2, nak(200)),
            (failed(FailureKind::Timeout), 4, AckDecision::DeadLetter),
            (failed(FailureKind::GuestReject), 1, AckDecision::DeadLetter),
            (failed(FailureKind::BadEvent), 1, AckDecision::DeadLetter),
            (failed(FailureKind::OutOfMemory), 1, AckDecision::DeadLetter),
            (
                failed(FailureKind::StackOverflow),
                1,
                AckDecision::DeadLetter,
            ),
            (failed(FailureKind::Denied), 1, AckDecision::DeadLetter),
            (failed(FailureKind::OutputLimit), 1, AckDecision::DeadLetter),
            (failed(FailureKind::StateLimit), 1, AckDecision::DeadLetter),
            // Deferred by an open breaker: never dead-lettered, whatever the count.
            (
                EventOutcome::Deferred {
                    retry_after: Duration::from_millis(700),
                },
                99,
                nak(700),
            ),
        ];
        for (outcome, delivered, expected) in cases {
            assert_eq!(
                decide(&outcome, delivered, &policy()),
                expected,
                "{outcome:?} delivered {delivered}"
            );
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = policy();
        assert_eq!(backoff(1, &p), Duration::from_millis(100));
        assert_eq!(backoff(2, &p), Duration::from_millis(200));
        assert_eq!(backoff(3, &p), Duration::from_millis(250));
        assert_eq!(backoff(200, &p), Duration::from_millis(250));
    }
}
