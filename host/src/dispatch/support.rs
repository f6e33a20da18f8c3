//! Small pieces the driver leans on: holding a batch while a step fails for
//! a reason that passes, pausing unless cancelled, when to prune applied
//! sequences, and counting deliveries that were not attempts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, Message};
use tokio_util::sync::CancellationToken;

/// How old an ack floor must be before the sequences below it are pruned.
pub(super) const PRUNE_LAG: Duration = Duration::from_secs(60);
/// Deferral counts kept for events in flight; past it the oldest counts go
/// (an event handed to another host never comes back to clear its own).
pub(super) const MAX_TRACKED_DEFERRALS: usize = 100_000;

/// Longest one held step (a query, a commit) may take before it is tried
/// again.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a held step ended without its result.
#[derive(Debug)]
pub(super) enum Held<E> {
    /// The worker is stopping.
    Cancelled,
    /// The step failed for good.
    Permanent(E),
}

/// Runs `op` until it succeeds or fails for good (`permanent`). Meanwhile
/// the batch is held, its ack deadlines extended, rather than handed back:
/// an outage must not use up the events' retry budgets.
pub(super) async fn hold_until_done<T, E, F, Fut>(
    function: &str,
    what: &str,
    messages: &[Message],
    ack_wait: Duration,
    cancel: &CancellationToken,
    permanent: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, Held<E>>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(100);
    let mut extended = Instant::now();
    loop {
        // A call that hangs (a connection blackholed mid-query) counts as a
        // failure that passes: the batch is held and a stop is still seen.
        match tokio::time::timeout(STEP_TIMEOUT, op()).await {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err(error)) if permanent(&error) => return Err(Held::Permanent(error)),
            Ok(Err(error)) => {
                tracing::warn!(function, %error, "{what} failed; holding the batch and retrying")
            }
            Err(_) => tracing::warn!(
                function,
                timeout_s = STEP_TIMEOUT.as_secs(),
                "{what} did not answer in time; holding the batch and retrying"
            ),
        }
        if extended.elapsed() >= ack_wait / 3 {
            extend_deadlines(messages).await;
            extended = Instant::now();
        }
        if !pause(cancel, delay).await {
            return Err(Held::Cancelled);
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Tells JetStream the messages are still being worked on.
pub(super) async fn extend_deadlines(messages: &[Message]) {
    for message in messages {
        let _ = message.ack_with(AckKind::Progress).await;
    }
}

/// Sleeps for `delay` unless cancelled first; returns false if cancelled.
pub(super) async fn pause(cancel: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Which ack floor may be pruned now, given the floor read earlier
/// (`pending`, with when it was read) and the one just read: the earlier one
/// once it is [`PRUNE_LAG`] old. A floor that went back (a server that lost
/// acks) makes the earlier reading worthless. Returns it and the floor to
/// remember.
pub(super) fn prune_bound(
    pending: Option<(Instant, u64)>,
    now: Instant,
    floor: u64,
) -> (Option<u64>, Option<(Instant, u64)>) {
    match pending {
        Some((_, old_floor)) if floor < old_floor => (None, Some((now, floor))),
        Some((seen, old_floor)) if now.duration_since(seen) >= PRUNE_LAG => {
            (Some(old_floor), Some((now, floor)))
        }
        Some(_) => (None, pending),
        None => (None, Some((now, floor))),
    }
}

/// What a batch did to an event's deferral count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeferralChange {
    /// Handed back without a decision: one more delivery that is no attempt.
    Deferred,
    /// Naked for another attempt: keep counting.
    Retried,
    /// Acked or dead-lettered: forget it.
    Done,
}

/// What each ack of a batch does to its event's deferral count.
pub(super) fn deferral_changes(
    batch: &super::batch::Batch,
    acks: &[(usize, crate::ack::AckDecision)],
) -> Vec<(u64, DeferralChange)> {
    use crate::ack::AckDecision;
    acks.iter()
        .map(|&(index, decision)| {
            let change = match decision {
                _ if batch.is_deferral(index) => DeferralChange::Deferred,
                AckDecision::Nak { .. } => DeferralChange::Retried,
                _ => DeferralChange::Done,
            };
            (batch.records()[index].sequence, change)
        })
        .collect()
}

/// Applies one batch's changes to the deferral counts, keeping at most
/// [`MAX_TRACKED_DEFERRALS`] (the oldest sequences go first).
pub(super) fn note_deferrals(
    deferrals: &mut HashMap<u64, u64>,
    changes: impl IntoIterator<Item = (u64, DeferralChange)>,
) {
    for (sequence, change) in changes {
        match change {
            DeferralChange::Deferred => *deferrals.entry(sequence).or_default() += 1,
            DeferralChange::Retried => {}
            // Nearly every event is done and nothing is tracked: skip
            // hashing its sequence then.
            DeferralChange::Done if !deferrals.is_empty() => {
                deferrals.remove(&sequence);
            }
            DeferralChange::Done => {}
        }
    }
    if deferrals.len() > MAX_TRACKED_DEFERRALS {
        let mut sequences: Vec<u64> = deferrals.keys().copied().collect();
        sequences.sort_unstable();
        for sequence in &sequences[..sequences.len() - MAX_TRACKED_DEFERRALS] {
            deferrals.remove(sequence);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferrals_are_counted_and_bounded() {
        let mut deferrals = HashMap::new();
        note_deferrals(&mut deferrals, [(7, DeferralChange::Deferred)]);
        note_deferrals(&mut deferrals, [(7, DeferralChange::Deferred)]);
        note_deferrals(&mut deferrals, [(7, DeferralChange::Retried)]);
        assert_eq!(deferrals[&7], 2);
        note_deferrals(&mut deferrals, [(7, DeferralChange::Done)]);
        assert!(deferrals.is_empty());
        let many = (0..MAX_TRACKED_DEFERRALS as u64 + 10).map(|s| (s, DeferralChange::Deferred));
        note_deferrals(&mut deferrals, many);
        assert_eq!(deferrals.len(), MAX_TRACKED_DEFERRALS);
        assert!(!deferrals.contains_key(&9) && deferrals.contains_key(&10));
    }

    #[test]
    fn pruning_waits_for_an_ack_floor_to_age() {
        let start = Instant::now();
        let later = |secs| start + Duration::from_secs(secs);
        let (due, pending) = prune_bound(None, start, 100);
        assert_eq!((due, pending), (None, Some((start, 100))));
        let (due, pending) = prune_bound(pending, later(59), 500);
        assert_eq!((due, pending), (None, Some((start, 100))));
        let (due, pending) = prune_bound(pending, later(60), 900);
        assert_eq!((due, pending), (Some(100), Some((later(60), 900))));
        // The server lost acks: the floor went back; start over from it.
        let (due, pending) = prune_bound(pending, later(200), 850);
        assert_eq!((due, pending), (None, Some((later(200), 850))));
    }
}
