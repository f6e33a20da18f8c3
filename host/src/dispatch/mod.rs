//! Dispatch: runs one function over its consumer, a batch at a time.
//!
//! One batch reads in one direction: drop redeliveries whose effect is
//! already committed → load the state of the batch's keys → run every event
//! in stream order on a warm instance (on a blocking thread) → commit the
//! state changes, their sequences and the outputs in one transaction →
//! publish outputs and dead letters → ack, nak or terminate each input.
//! While Postgres fails, the batch is held (ack deadlines extended) and the
//! failing step retried; if a publish fails after the commit, the outputs
//! stay in the outbox and are published again before anything else.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use tokio_util::sync::CancellationToken;

use crate::ack::{AckDecision, decide};
use crate::config::FunctionSpec;
use crate::crash::{self, CrashPoint};
use crate::ingest::{Delivery, Ingest};
use crate::outcome::{EventOutcome, Failure, FailureKind};
use crate::output::{
    OutputRecord, dead_letter_headers as dlq, dead_letter_msg_id, header_text, output_msg_id,
    publish_all,
};
use crate::sandbox::{Event, FunctionCode, FunctionInstance, Handled, InstanceSettings};
use crate::state::{BatchCommit, BatchView, StateStore};

/// Delay before a batch handed back to JetStream is delivered again, and
/// between attempts to publish committed outputs.
const BATCH_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Applied sequences are considered for pruning after this many batches.
const PRUNE_EVERY_BATCHES: u64 = 200;
/// How old an ack floor must be before the sequences below it are pruned.
const PRUNE_LAG: Duration = Duration::from_secs(60);

/// Everything one function's worker needs.
pub struct FunctionWorker {
    name: Arc<str>,
    /// The module digest's first 12 hex digits: the `version` metric label.
    version: String,
    metrics: WorkerMetrics,
    spec: FunctionSpec,
    ingest: Ingest,
    code: FunctionCode,
    settings: InstanceSettings,
    instance: Option<FunctionInstance>,
    state: StateStore,
    js: jetstream::Context,
    dead_letter_subject: String,
    /// Outputs of the last committed batch are published but still in the
    /// outbox table.
    outbox_dirty: bool,
    /// The highest committed stream sequence, as of start-up and every
    /// commit since: a message at or below it may have been applied.
    highest_applied: u64,
    /// An ack floor and when it was read: the next prune's bound.
    prune_floor: Option<(std::time::Instant, u64)>,
    batches: u64,
}

impl std::fmt::Debug for FunctionWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionWorker")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The function's metric handles, registered once at start-up.
struct WorkerMetrics {
    invocations: metrics::Counter,
    invocation_seconds: metrics::Histogram,
    dead_letters: metrics::Counter,
    retries: metrics::Counter,
    commit_seconds: metrics::Histogram,
    batch_size: metrics::Histogram,
    in_flight: metrics::Gauge,
    consumer_pending: metrics::Gauge,
}

impl WorkerMetrics {
    fn new(function: &str, version: &str) -> Self {
        let (f, v) = (function.to_string(), version.to_string());
        Self {
            invocations: metrics::counter!("weir_invocations_total", "function" => f.clone(), "version" => v.clone()),
            invocation_seconds: metrics::histogram!("weir_invocation_seconds", "function" => f.clone(), "version" => v),
            dead_letters: metrics::counter!("weir_dead_letters_total", "function" => f.clone()),
            retries: metrics::counter!("weir_retries_total", "function" => f.clone()),
            commit_seconds: metrics::histogram!("weir_commit_seconds", "function" => f.clone()),
            batch_size: metrics::histogram!("weir_batch_size", "function" => f.clone()),
            in_flight: metrics::gauge!("weir_in_flight", "function" => f.clone()),
            consumer_pending: metrics::gauge!("weir_consumer_pending", "function" => f),
        }
    }
}

/// One input message of a batch and what became of it.
struct Slot {
    message: async_nats::jetstream::Message,
    sequence: u64,
    delivered: u64,
    outcome: Option<EventOutcome>,
    handled: Option<Handled>,
}

impl FunctionWorker {
    pub fn new(
        spec: FunctionSpec,
        ingest: Ingest,
        code: FunctionCode,
        state: StateStore,
        js: jetstream::Context,
        dead_letter_prefix: &str,
    ) -> Self {
        let name: Arc<str> = Arc::from(spec.name.as_str());
        let settings = InstanceSettings {
            function: name.clone(),
            allowed_outputs: spec.outputs.clone().into(),
            deadline: Duration::from_millis(spec.limits.deadline_ms),
            memory_bytes: spec.limits.memory_bytes,
        };
        let version: String = code.digest().chars().take(12).collect();
        Self {
            metrics: WorkerMetrics::new(&spec.name, &version),
            version,
            dead_letter_subject: format!("{dead_letter_prefix}.{}", spec.name),
            name,
            spec,
            ingest,
            code,
            settings,
            instance: None,
            state,
            js,
            outbox_dirty: false,
            highest_applied: 0,
            prune_floor: None,
            batches: 0,
        }
    }

    /// Runs until `cancel` fires, then returns after the batch in hand is
    /// committed, published and acked.
    pub async fn run(mut self, cancel: CancellationToken) {
        tracing::info!(function = %self.name, digest = %self.code.digest(), "function started");
        if !self.flush_outbox(&cancel).await {
            return;
        }
        let Some(highest) = hold_until_done(
            &self.name,
            "reading progress",
            &[],
            Duration::MAX,
            &cancel,
            || self.state.highest_applied(&self.name),
        )
        .await
        else {
            return;
        };
        self.highest_applied = highest;
        while let Some(batch) = self.ingest.next_batch(&cancel).await {
            self.process(batch, &cancel).await;
            self.batches += 1;
            if self.batches.is_multiple_of(PRUNE_EVERY_BATCHES) {
                self.prune_applied().await;
            }
        }
        if self.outbox_dirty {
            self.clear_outbox().await;
        }
        tracing::info!(function = %self.name, "function stopped");
    }

    /// Publishes what a previous run committed but may not have published.
    /// Returns false if cancelled first.
    async fn flush_outbox(&mut self, cancel: &CancellationToken) -> bool {
        let flush = || async {
            let records = self
                .state
                .outbox(&self.name)
                .await
                .map_err(|e| e.to_string())?;
            if !records.is_empty() {
                tracing::info!(function = %self.name, outputs = records.len(), "publishing outputs left by the previous run");
                publish_all(&self.js, &records)
                    .await
                    .map_err(|e| e.to_string())?;
                self.state
                    .clear_outbox(&self.name)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        };
        hold_until_done(
            &self.name,
            "flushing the outbox",
            &[],
            Duration::MAX,
            cancel,
            flush,
        )
        .await
        .is_some()
    }

    async fn process(&mut self, batch: Vec<Delivery>, cancel: &CancellationToken) {
        self.metrics.in_flight.set(batch.len() as f64);
        self.metrics.batch_size.record(batch.len() as f64);
        if let Some(last) = batch.last() {
            self.metrics.consumer_pending.set(last.pending as f64);
        }
        self.process_batch(batch, cancel).await;
        self.metrics.in_flight.set(0.0);
    }

    async fn process_batch(&mut self, batch: Vec<Delivery>, cancel: &CancellationToken) {
        let mut slots = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for (index, delivery) in batch.into_iter().enumerate() {
            let outcome = match delivery.event {
                Ok(event) => {
                    events.push((index, event));
                    None
                }
                Err(failure) => Some(EventOutcome::Failed(failure)),
            };
            slots.push(Slot {
                message: delivery.message,
                sequence: delivery.sequence,
                delivered: delivery.delivered,
                outcome,
                handled: None,
            });
        }

        // A redelivery may be an event whose batch committed but was not
        // acked before a crash: its effect is already in Postgres. The
        // delivery count alone cannot tell: a nats-server killed before it
        // persisted the consumer's state delivers again with a count of 1.
        let highest_applied = self.highest_applied;
        let redelivered: Vec<u64> = events
            .iter()
            .map(|(index, _)| &slots[*index])
            .filter(|slot| slot.delivered > 1 || slot.sequence <= highest_applied)
            .map(|slot| slot.sequence)
            .collect();
        let ack_wait = Duration::from_millis(self.spec.ack_wait_ms);
        let applied = hold_until_done(
            &self.name,
            "reading applied sequences",
            &slots,
            ack_wait,
            cancel,
            || self.state.already_applied(&self.name, &redelivered),
        )
        .await;
        let Some(applied) = applied else {
            return self.give_back(slots, "shutting down", cancel).await;
        };
        let to_run: Vec<(usize, Event)> = events
            .into_iter()
            .filter(|(index, _)| {
                let slot = &mut slots[*index];
                let done = applied.contains(&slot.sequence);
                if done {
                    slot.outcome = Some(EventOutcome::AlreadyApplied);
                }
                !done
            })
            .collect();
        let keys: Vec<&str> = to_run.iter().map(|(_, e)| e.key.as_str()).collect();
        let view = hold_until_done(
            &self.name,
            "loading state",
            &slots,
            ack_wait,
            cancel,
            || self.state.view(&self.name, &keys),
        )
        .await;
        let Some(view) = view else {
            return self.give_back(slots, "shutting down", cancel).await;
        };

        let (instance, view, results) = self.invoke(view, to_run).await;
        self.instance = instance;
        self.metrics.invocations.increment(results.len() as u64);
        for (index, result, took) in results {
            self.metrics.invocation_seconds.record(took.as_secs_f64());
            let slot = &mut slots[index];
            match result {
                Ok(handled) => {
                    slot.outcome = Some(EventOutcome::Applied);
                    slot.handled = Some(handled);
                }
                Err(failure) => slot.outcome = Some(EventOutcome::Failed(failure)),
            }
        }

        let mut outputs = Vec::new();
        let mut applied_sequences = Vec::new();
        for slot in &mut slots {
            let Some(handled) = slot.handled.take() else {
                continue;
            };
            let sequence = slot.sequence;
            if handled.wrote {
                applied_sequences.push(sequence);
            }
            outputs.extend(
                handled
                    .outputs
                    .into_iter()
                    .enumerate()
                    .map(|(i, o)| OutputRecord {
                        msg_id: output_msg_id(&self.name, sequence, i),
                        subject: o.subject,
                        payload: o.payload,
                        headers: o.headers,
                    }),
            );
        }
        let decisions: Vec<AckDecision> = slots
            .iter()
            .map(|s| match &s.outcome {
                Some(outcome) => decide(outcome, s.delivered, &self.spec.retry),
                // Every slot has an outcome by now; treat a gap as retryable.
                None => AckDecision::Nak {
                    delay: BATCH_RETRY_DELAY,
                },
            })
            .collect();

        let deltas = view.into_deltas();
        let committed = !deltas.is_empty();
        if committed {
            let commit = BatchCommit {
                deltas,
                applied: applied_sequences,
                outbox: outputs.clone(),
            };
            crash::reached(CrashPoint::AfterInvoke);
            // Re-running the same commit is harmless: every statement in it
            // sets values or ignores conflicts.
            let started = std::time::Instant::now();
            let done = hold_until_done(
                &self.name,
                "committing state",
                &slots,
                ack_wait,
                cancel,
                || self.state.commit(&self.name, &commit),
            )
            .await;
            if done.is_none() {
                return self.give_back(slots, "shutting down", cancel).await;
            }
            self.metrics
                .commit_seconds
                .record(started.elapsed().as_secs_f64());
            self.highest_applied = self.highest_applied.max(commit.highest_applied());
            crash::reached(CrashPoint::AfterCommit);
        } else {
            crash::reached(CrashPoint::AfterInvoke);
        }

        let mut to_publish = outputs;
        for (slot, decision) in slots.iter().zip(&decisions) {
            if *decision == AckDecision::DeadLetter {
                to_publish.push(self.dead_letter(slot));
            }
        }
        while let Err(error) = publish_all(&self.js, &to_publish).await {
            if !committed {
                // Nothing is committed: redelivery runs the events again and
                // the message ids drop what did get through.
                return self.give_back(slots, &error.to_string(), cancel).await;
            }
            tracing::warn!(function = %self.name, %error, "publishing committed outputs failed; retrying");
            if !pause(cancel, BATCH_RETRY_DELAY).await {
                // Shutting down: the outbox keeps the outputs, the inputs
                // stay unacked, and the next start publishes them first.
                return;
            }
        }
        crash::reached(CrashPoint::AfterPublish);
        if committed {
            self.outbox_dirty = true;
        } else if self.outbox_dirty {
            self.clear_outbox().await;
        }

        self.count_outcomes(&slots, &decisions);
        for (slot, decision) in slots.iter().zip(decisions) {
            self.log_outcome(slot, decision);
            let kind = match decision {
                AckDecision::Ack => AckKind::Ack,
                AckDecision::Nak { delay } => AckKind::Nak(Some(delay)),
                AckDecision::DeadLetter => AckKind::Term,
            };
            if let Err(error) = slot.message.ack_with(kind).await {
                // JetStream delivers it again; the applied set or the
                // message ids keep that from doubling anything.
                tracing::warn!(function = %self.name, sequence = slot.sequence, %error, "ack failed");
            }
        }
    }

    /// Runs `events` in order on a blocking thread, replacing the instance
    /// after a trap.
    async fn invoke(
        &mut self,
        view: BatchView,
        events: Vec<(usize, Event)>,
    ) -> (
        Option<FunctionInstance>,
        BatchView,
        Vec<(usize, Result<Handled, Failure>, Duration)>,
    ) {
        let code = self.code.clone();
        let settings = self.settings.clone();
        let instance = self.instance.take();
        let ran = tokio::task::spawn_blocking(move || {
            let mut instance = instance;
            let mut view = view;
            let mut results = Vec::with_capacity(events.len());
            for (index, event) in events {
                let live = match instance.take() {
                    Some(live) if !live.is_poisoned() => Ok(live),
                    _ => FunctionInstance::new(&code, &settings),
                };
                let mut live = match live {
                    Ok(live) => live,
                    Err(error) => {
                        results.push((
                            index,
                            Err(Failure::new(FailureKind::Trap, error.to_string())),
                            Duration::ZERO,
                        ));
                        continue;
                    }
                };
                live.begin_batch(view);
                let started = std::time::Instant::now();
                let result = live.handle(&event);
                results.push((index, result, started.elapsed()));
                view = live.end_batch();
                instance = Some(live);
            }
            (instance, view, results)
        })
        .await;
        match ran {
            Ok(ran) => ran,
            Err(error) => {
                // The blocking task panicked: a host bug, not the guest's.
                tracing::error!(function = %self.name, %error, "invocation task failed");
                (None, BatchView::default(), Vec::new())
            }
        }
    }

    fn dead_letter(&self, slot: &Slot) -> OutputRecord {
        let message = &slot.message;
        let failure = match &slot.outcome {
            Some(EventOutcome::Failed(failure)) => failure.clone(),
            _ => Failure::new(FailureKind::Trap, "no outcome"),
        };
        let mut headers: Vec<(String, String)> = message
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .flat_map(|(name, values)| {
                values
                    .iter()
                    .map(move |v| (name.to_string(), v.as_str().to_string()))
            })
            .filter(|(name, _)| !name.eq_ignore_ascii_case("Nats-Msg-Id"))
            .collect();
        headers.extend([
            (dlq::FUNCTION.to_string(), self.name.to_string()),
            (dlq::KIND.to_string(), failure.kind.as_str().to_string()),
            (dlq::REASON.to_string(), header_text(&failure.message)),
            (dlq::ATTEMPTS.to_string(), slot.delivered.to_string()),
            (dlq::SUBJECT.to_string(), message.subject.to_string()),
            (dlq::SEQUENCE.to_string(), slot.sequence.to_string()),
        ]);
        OutputRecord {
            subject: self.dead_letter_subject.clone(),
            payload: message.payload.clone(),
            headers,
            msg_id: dead_letter_msg_id(&self.name, slot.sequence),
        }
    }

    /// Adds the batch's outcomes to the per-function counters, once per
    /// outcome kind rather than once per event.
    fn count_outcomes(&self, slots: &[Slot], decisions: &[AckDecision]) {
        let mut outcomes: std::collections::BTreeMap<&'static str, u64> = Default::default();
        for slot in slots {
            let outcome = match &slot.outcome {
                Some(EventOutcome::Applied) => "applied",
                Some(EventOutcome::AlreadyApplied) => "already-applied",
                Some(EventOutcome::Failed(failure)) => failure.kind.as_str(),
                None => "unfinished",
            };
            *outcomes.entry(outcome).or_default() += 1;
        }
        for (outcome, count) in outcomes {
            metrics::counter!(
                "weir_events_total",
                "function" => self.name.to_string(),
                "version" => self.version.clone(),
                "outcome" => outcome
            )
            .increment(count);
        }
        let dead = decisions
            .iter()
            .filter(|d| **d == AckDecision::DeadLetter)
            .count();
        let retried = decisions
            .iter()
            .filter(|d| matches!(d, AckDecision::Nak { .. }))
            .count();
        self.metrics.dead_letters.increment(dead as u64);
        self.metrics.retries.increment(retried as u64);
    }

    fn log_outcome(&self, slot: &Slot, decision: AckDecision) {
        let Some(EventOutcome::Failed(failure)) = &slot.outcome else {
            return;
        };
        let sequence = slot.sequence;
        match decision {
            AckDecision::DeadLetter => tracing::warn!(
                function = %self.name, sequence, kind = %failure.kind, error = %failure.message,
                subject = %self.dead_letter_subject, "event dead-lettered"
            ),
            AckDecision::Nak { delay } => tracing::info!(
                function = %self.name, sequence, kind = %failure.kind, error = %failure.message,
                delay_ms = delay.as_millis() as u64, "event will be retried"
            ),
            AckDecision::Ack => {}
        }
    }

    /// Hands a batch back to JetStream untouched: nothing was committed.
    async fn give_back(&mut self, slots: Vec<Slot>, reason: &str, cancel: &CancellationToken) {
        tracing::warn!(function = %self.name, events = slots.len(), error = reason, "batch not committed; it will be delivered again");
        for slot in &slots {
            let _ = slot
                .message
                .ack_with(AckKind::Nak(Some(BATCH_RETRY_DELAY)))
                .await;
        }
        pause(cancel, BATCH_RETRY_DELAY).await;
    }

    async fn clear_outbox(&mut self) {
        match self.state.clear_outbox(&self.name).await {
            Ok(()) => self.outbox_dirty = false,
            Err(error) => {
                tracing::warn!(function = %self.name, %error, "cannot clear the published outbox yet")
            }
        }
    }

    /// Forgets applied sequences at or below an ack floor read at least
    /// [`PRUNE_LAG`] ago. A nats-server that crashes can come back with an
    /// older ack floor and deliver those messages again; the lag keeps their
    /// rows until that can no longer happen.
    async fn prune_applied(&mut self) {
        let floor = match self.ingest.ack_floor().await {
            Ok(floor) => floor,
            Err(error) => {
                tracing::warn!(function = %self.name, %error, "reading the ack floor failed");
                return;
            }
        };
        let (due, next) = prune_bound(self.prune_floor, std::time::Instant::now(), floor);
        self.prune_floor = next;
        if let Some(old_floor) = due
            && let Err(error) = self.state.prune_applied(&self.name, old_floor).await
        {
            tracing::warn!(function = %self.name, %error, "pruning applied sequences failed");
        }
    }
}

/// Which ack floor may be pruned now, given the floor read earlier
/// (`pending`, with when it was read) and the one just read: the earlier one
/// once it is [`PRUNE_LAG`] old. Returns it and the floor to remember.
fn prune_bound(
    pending: Option<(std::time::Instant, u64)>,
    now: std::time::Instant,
    floor: u64,
) -> (Option<u64>, Option<(std::time::Instant, u64)>) {
    match pending {
        Some((seen, old_floor)) if now.duration_since(seen) >= PRUNE_LAG => {
            (Some(old_floor), Some((now, floor)))
        }
        Some(_) => (None, pending),
        None => (None, Some((now, floor))),
    }
}

/// Runs `op` until it succeeds. Meanwhile the batch is held, its ack
/// deadlines extended, rather than handed back: a Postgres outage must not
/// use up the events' retry budgets. `None` if cancelled first.
async fn hold_until_done<T, E, F, Fut>(
    function: &str,
    what: &str,
    slots: &[Slot],
    ack_wait: Duration,
    cancel: &CancellationToken,
    mut op: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(100);
    let mut extended = std::time::Instant::now();
    loop {
        match op().await {
            Ok(done) => return Some(done),
            Err(error) => {
                tracing::warn!(function, %error, "{what} failed; holding the batch and retrying")
            }
        }
        if extended.elapsed() >= ack_wait / 3 {
            for slot in slots {
                let _ = slot.message.ack_with(AckKind::Progress).await;
            }
            extended = std::time::Instant::now();
        }
        if !pause(cancel, delay).await {
            return None;
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Sleeps for `delay` unless cancelled first; returns false if cancelled.
async fn pause(cancel: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn pruning_waits_for_an_ack_floor_to_age() {
        let start = Instant::now();
        let later = |secs| start + Duration::from_secs(secs);
        // The first floor is only remembered.
        let (due, pending) = prune_bound(None, start, 100);
        assert_eq!((due, pending), (None, Some((start, 100))));
        // Too young: keep the remembered floor, prune nothing.
        let (due, pending) = prune_bound(pending, later(59), 500);
        assert_eq!((due, pending), (None, Some((start, 100))));
        // Old enough: prune up to the remembered floor, never the new one.
        let (due, pending) = prune_bound(pending, later(60), 900);
        assert_eq!((due, pending), (Some(100), Some((later(60), 900))));
    }
}
