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
//!
//! Along the way each event gets its trace (see [`crate::traces`]) and the
//! guest's log lines go to the function's [`GuestLogSink`].
//!
//! The function's circuit breaker is asked before every invocation. An event
//! it refuses is handed back (naked until the breaker lets probes through)
//! without spending an attempt, and while it is open no events are fetched
//! at all: the backlog waits in JetStream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, AckKind};
use tokio_util::sync::CancellationToken;

use crate::ack::{AckDecision, decide};
use crate::breaker::{Breaker, CallResult, Permit, SystemClock, Transition};
use crate::config::{FunctionSpec, GuestLogConfig};
use crate::crash::{self, CrashPoint};
use crate::guest_logs::{GuestLogSink, LineOrigin};
use crate::health::{FunctionStatus, Readiness};
use crate::ingest::{Delivery, Ingest};
use crate::outcome::{EventOutcome, Failure, FailureKind};
use crate::output::{
    OutputRecord, SendTraces, dead_letter_headers as dlq, dead_letter_msg_id, header_text,
    output_msg_id, publish_all,
};
use crate::sandbox::{
    Event, FunctionCode, FunctionInstance, Handled, InstanceSettings, Invocation,
    InvocationDiagnostics,
};
use crate::state::{BatchCommit, BatchView, StateStore};
use crate::traces::{EventTrace, Tracing, is_trace_header, trace_headers};

/// Delay before a batch handed back to JetStream is delivered again, and
/// between attempts to publish committed outputs.
const BATCH_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Applied sequences are considered for pruning after this many batches.
const PRUNE_EVERY_BATCHES: u64 = 200;
/// How old an ack floor must be before the sequences below it are pruned.
const PRUNE_LAG: Duration = Duration::from_secs(60);
/// Deferral counts kept for events in flight; past it the oldest counts go
/// (an event handed to another host never comes back to clear its own).
const MAX_TRACKED_DEFERRALS: usize = 100_000;

/// What every function's worker shares with the others.
#[derive(Clone)]
pub struct WorkerEnv {
    pub state: StateStore,
    pub js: jetstream::Context,
    pub dead_letter_prefix: String,
    pub tracing: Tracing,
    pub guest_logs: GuestLogConfig,
    /// Where the worker reports its status for `/status`.
    pub readiness: Arc<Readiness>,
}

impl WorkerEnv {
    /// The largest message the NATS server takes.
    pub fn max_payload(&self) -> usize {
        match self.js.client().server_info().max_payload {
            // Not known yet: the server default.
            0 => 1024 * 1024,
            known => known,
        }
    }
}

impl std::fmt::Debug for WorkerEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerEnv").finish_non_exhaustive()
    }
}

/// Everything one function's worker needs.
pub struct FunctionWorker {
    name: Arc<str>,
    /// The stable version first, then the canary if there is one.
    lanes: Vec<Lane>,
    /// Share of keys, in percent, the canary lane takes.
    canary_weight: u8,
    /// Where the function was deployed from, for rollbacks and statistics.
    deployment: Option<DeploymentLink>,
    spec: FunctionSpec,
    ingest: Ingest,
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
    tracing: Tracing,
    logs: GuestLogSink,
    /// How many times the breaker handed back each event in flight; those
    /// deliveries are not attempts.
    deferrals: HashMap<u64, u64>,
    readiness: Arc<Readiness>,
    pending: u64,
    last_stats: std::time::Instant,
    /// This worker already rolled its canary back; the host replaces it.
    rolled_back: bool,
}

impl std::fmt::Debug for FunctionWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionWorker")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// One version a worker runs: its code, warm instance, circuit breaker and
/// metrics.
struct Lane {
    /// The module digest's first 12 hex digits: the `version` metric label.
    version: String,
    /// The deployed version number, for functions deployed through the API.
    number: Option<i32>,
    /// What its output message ids are scoped by: the function, and for a
    /// deployed version its number, so a version that replays the stream
    /// publishes anew instead of being dropped as a duplicate.
    msg_scope: String,
    code: FunctionCode,
    settings: InstanceSettings,
    /// Taken while a batch runs on the blocking thread.
    instance: Option<FunctionInstance>,
    /// Taken while a batch runs on the blocking thread.
    breaker: Option<Breaker>,
    metrics: WorkerMetrics,
    /// Calls, failures and microseconds not yet added to the shared
    /// statistics.
    unreported: (i64, i64, i64),
    /// Calls and failures since this worker started: the auto-rollback
    /// compares them.
    seen: (u64, u64),
}

/// A version for a worker to run.
#[derive(Debug)]
pub struct VersionCode {
    pub code: FunctionCode,
    pub settings: InstanceSettings,
    pub instance: Option<FunctionInstance>,
    pub number: Option<i32>,
    /// A deployed version made to replay the stream.
    pub replayed: bool,
}

/// The deployment a worker runs, so it can roll a failing canary back and
/// report each version's calls.
#[derive(Debug, Clone)]
pub struct DeploymentLink {
    pub store: crate::control::store::ControlStore,
    pub namespace: String,
    pub name: String,
    pub rollout: crate::control::store::Rollout,
}

/// How often a worker adds its calls to the shared version statistics.
const STATS_EVERY: Duration = Duration::from_secs(1);

/// Which lane a key goes to: the canary (1) when the key's stable hash
/// falls below `weight` percent, else the stable version (0). The hash is
/// FNV-1a, the same on every host and across restarts, so a key stays on
/// one version for as long as the weight does not change.
pub fn lane_for(key: &str, weight: u8) -> usize {
    if weight == 0 {
        return 0;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    usize::from(hash % 100 < u64::from(weight))
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
    breaker_state: metrics::Gauge,
    labels: [(&'static str, String); 2],
}

impl WorkerMetrics {
    fn new(function: &str, version: &str) -> Self {
        let labels = [
            ("function", function.to_string()),
            ("version", version.to_string()),
        ];
        Self {
            invocations: metrics::counter!("weir_invocations_total", &labels),
            invocation_seconds: metrics::histogram!("weir_invocation_seconds", &labels),
            dead_letters: metrics::counter!("weir_dead_letters_total", &labels),
            retries: metrics::counter!("weir_retries_total", &labels),
            commit_seconds: metrics::histogram!("weir_commit_seconds", &labels),
            batch_size: metrics::histogram!("weir_batch_size", &labels),
            in_flight: metrics::gauge!("weir_in_flight", &labels),
            consumer_pending: metrics::gauge!("weir_consumer_pending", &labels),
            breaker_state: metrics::gauge!("weir_breaker_state", &labels),
            labels,
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
    /// `None` when tracing is off.
    trace: Option<EventTrace>,
    /// The lane (version) that handles it.
    lane: usize,
}

impl FunctionWorker {
    /// A worker of `spec` running `stable`, and `canary` for `weight`
    /// percent of the keys.
    pub fn new(
        spec: FunctionSpec,
        ingest: Ingest,
        stable: VersionCode,
        canary: Option<(VersionCode, u8)>,
        deployment: Option<DeploymentLink>,
        env: &WorkerEnv,
    ) -> Self {
        let name: Arc<str> = Arc::from(spec.name.as_str());
        let canary_weight = canary.as_ref().map_or(0, |(_, weight)| *weight);
        let lanes: Vec<Lane> = std::iter::once(stable)
            .chain(canary.map(|(code, _)| code))
            .map(|version| {
                // Deployed versions by number (two may share a module);
                // configured functions by module digest.
                let label = match version.number {
                    Some(number) => format!("v{number}"),
                    None => version_of(&version.code),
                };
                let metrics = WorkerMetrics::new(&spec.name, &label);
                metrics.breaker_state.set(0.0);
                Lane {
                    breaker: Some(Breaker::new(
                        version.settings.breaker.clone(),
                        Arc::new(SystemClock),
                    )),
                    msg_scope: match (version.number, version.replayed) {
                        (Some(number), false) => format!("{}.v{number}", spec.name),
                        // Its replay publishes the same sequences again,
                        // maybe within the duplicate window of its earlier
                        // outputs.
                        (Some(number), true) => format!("{}.v{number}.replay", spec.name),
                        (None, _) => spec.name.clone(),
                    },
                    version: label,
                    number: version.number,
                    code: version.code,
                    settings: version.settings,
                    instance: version.instance,
                    metrics,
                    unreported: (0, 0, 0),
                    seen: (0, 0),
                }
            })
            .collect();
        Self {
            logs: GuestLogSink::new(
                &env.guest_logs,
                name.clone(),
                lanes[0].version.clone(),
                env.js.client(),
            ),
            lanes,
            canary_weight,
            deployment,
            tracing: env.tracing.clone(),
            deferrals: HashMap::new(),
            readiness: env.readiness.clone(),
            pending: 0,
            last_stats: std::time::Instant::now(),
            rolled_back: false,
            dead_letter_subject: format!("{}.{}", env.dead_letter_prefix, spec.name),
            name,
            spec,
            ingest,
            state: env.state.clone(),
            js: env.js.clone(),
            outbox_dirty: false,
            highest_applied: 0,
            prune_floor: None,
            batches: 0,
        }
    }

    /// Runs until `cancel` fires, then returns after the batch in hand is
    /// committed, published and acked.
    pub async fn run(mut self, cancel: CancellationToken) {
        tracing::info!(function = %self.name, digest = %self.lanes[0].code.digest(), canary = ?self.lanes.get(1).map(|l| l.code.digest()), weight = self.canary_weight, "function started");
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
        self.report_status();
        loop {
            // An open breaker: leave the backlog in JetStream until probes
            // may go through.
            // (The stable version's breaker: a canary's holds only its keys.)
            if let Some(wait) = self.lanes[0].breaker.as_ref().and_then(Breaker::open_for) {
                if !pause(&cancel, wait).await {
                    break;
                }
                continue;
            }
            // The stable version's breaker sizes the batch; a canary's open
            // breaker defers only the canary's keys.
            let budget = self.lanes[0]
                .breaker
                .as_ref()
                .map_or(usize::MAX, Breaker::call_budget);
            let Some(batch) = self.ingest.next_batch(&cancel, budget).await else {
                break;
            };
            self.process(batch, &cancel).await;
            self.report_status();
            // A worker being replaced must not judge a rollout that may
            // already have changed.
            if !cancel.is_cancelled() {
                self.watch_canary().await;
            }
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
                publish_all(&self.js, &records, &SendTraces::none())
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
        let metrics = &self.lanes[0].metrics;
        metrics.in_flight.set(batch.len() as f64);
        metrics.batch_size.record(batch.len() as f64);
        if let Some(last) = batch.last() {
            self.pending = last.pending;
            metrics.consumer_pending.set(last.pending as f64);
        }
        self.process_batch(batch, cancel).await;
        self.lanes[0].metrics.in_flight.set(0.0);
    }

    async fn process_batch(&mut self, batch: Vec<Delivery>, cancel: &CancellationToken) {
        let batch_started = SystemTime::now();
        let mut slots = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for (index, delivery) in batch.into_iter().enumerate() {
            let lane = match &delivery.event {
                Ok(event) => lane_for(&event.key, self.canary_weight),
                Err(_) => 0,
            };
            let trace = self.start_trace(&delivery, lane, batch_started);
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
                trace,
                lane,
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
        let to_run: Vec<(usize, usize, Event, bool)> = events
            .into_iter()
            .filter_map(|(index, event)| {
                let slot = &mut slots[index];
                if applied.contains(&slot.sequence) {
                    slot.outcome = Some(EventOutcome::AlreadyApplied);
                    return None;
                }
                let traced = slot.trace.as_ref().is_some_and(EventTrace::is_sampled);
                Some((index, slot.lane, event, traced))
            })
            .collect();
        let keys: Vec<&str> = to_run.iter().map(|(_, _, e, _)| e.key.as_str()).collect();
        let load_started = SystemTime::now();
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
        // The events about to run: the others need no state.
        self.record_step(&slots, "state.load", load_started, |slot| {
            slot.outcome.is_none()
        });

        let keys: Vec<(usize, String)> = to_run
            .iter()
            .map(|(index, _, event, _)| (*index, event.key.clone()))
            .collect();
        let ran = self.invoke(view, to_run).await;
        for (lane, transition) in &ran.transitions {
            self.observe_transition(*lane, transition);
        }
        let view = ran.view;
        for ((index, run), (_, key)) in ran.results.into_iter().zip(&keys) {
            let slot = &mut slots[index];
            let invocation = match run {
                Run::Invoked(invocation) => invocation,
                Run::Deferred { retry_after } => {
                    slot.outcome = Some(EventOutcome::Deferred { retry_after });
                    continue;
                }
            };
            let lane = &mut self.lanes[slot.lane];
            lane.metrics.invocations.increment(1);
            lane.metrics
                .invocation_seconds
                .record(invocation.took.as_secs_f64());
            let failed = matches!(&invocation.result, Err(f) if f.kind.counts_against_function());
            let micros = i64::try_from(invocation.took.as_micros()).unwrap_or(i64::MAX);
            lane.unreported.0 += 1;
            lane.unreported.1 += i64::from(failed);
            lane.unreported.2 += micros;
            lane.seen.0 += 1;
            lane.seen.1 += u64::from(failed);
            self.observe_invocation(slot, key, &invocation).await;
            match invocation.result {
                Ok(handled) => {
                    slot.outcome = Some(EventOutcome::Applied);
                    slot.handled = Some(handled);
                }
                Err(failure) => slot.outcome = Some(EventOutcome::Failed(failure)),
            }
        }

        let mut outputs = Vec::new();
        let mut output_traces = Vec::new();
        let mut applied_sequences = Vec::new();
        for slot in &mut slots {
            let Some(handled) = slot.handled.take() else {
                continue;
            };
            let sequence = slot.sequence;
            if handled.wrote {
                applied_sequences.push(sequence);
            }
            for (i, output) in handled.outputs.into_iter().enumerate() {
                let mut headers = output.headers;
                self.carry_trace(slot, &mut headers);
                outputs.push(OutputRecord {
                    msg_id: output_msg_id(&self.lanes[slot.lane].msg_scope, sequence, i),
                    subject: output.subject,
                    payload: output.payload,
                    headers,
                });
                output_traces.push(slot.trace.as_ref().map(|t| t.context().clone()));
            }
        }
        let decisions: Vec<AckDecision> = slots
            .iter()
            .map(|s| match &s.outcome {
                Some(outcome) => decide(outcome, self.attempt(s), &self.spec.retry),
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
            let commit_started = SystemTime::now();
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
            self.lanes[0]
                .metrics
                .commit_seconds
                .record(started.elapsed().as_secs_f64());
            self.record_step(&slots, "state.commit", commit_started, |slot| {
                matches!(slot.outcome, Some(EventOutcome::Applied))
            });
            self.highest_applied = self.highest_applied.max(commit.highest_applied());
            crash::reached(CrashPoint::AfterCommit);
        } else {
            crash::reached(CrashPoint::AfterInvoke);
        }

        let mut to_publish = outputs;
        for (slot, decision) in slots.iter().zip(&decisions) {
            if *decision == AckDecision::DeadLetter {
                to_publish.push(self.dead_letter(slot));
                output_traces.push(slot.trace.as_ref().map(|t| t.context().clone()));
            }
        }
        let send_traces = SendTraces::new(&self.tracing, output_traces);
        while let Err(error) = publish_all(&self.js, &to_publish, &send_traces).await {
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
        self.track_deferrals(&slots, &decisions);
        for (slot, decision) in slots.into_iter().zip(decisions) {
            self.log_outcome(&slot, decision);
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
            if let Some(trace) = slot.trace {
                let (outcome, error) = outcome_label(slot.outcome.as_ref());
                trace.finish(outcome, error, SystemTime::now());
            }
        }
    }

    /// Opens the `process` span of one delivery; `None` when tracing is off.
    fn start_trace(
        &self,
        delivery: &Delivery,
        lane: usize,
        start: SystemTime,
    ) -> Option<EventTrace> {
        use opentelemetry::KeyValue;
        let message = &delivery.message;
        let trace =
            self.tracing
                .start_process(message.headers.as_ref(), start, &message.subject)?;
        if !trace.is_sampled() {
            return Some(trace);
        }
        let mut attributes = vec![
            KeyValue::new("messaging.system", "nats"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.operation.name", "process"),
            KeyValue::new("messaging.destination.name", message.subject.to_string()),
            KeyValue::new(
                "messaging.consumer.group.name",
                crate::ingest::consumer_name(&self.name),
            ),
            KeyValue::new("messaging.message.body.size", message.payload.len() as i64),
            KeyValue::new("weir.function", self.name.to_string()),
            KeyValue::new("weir.function.version", self.lanes[lane].version.clone()),
            KeyValue::new("weir.stream", self.spec.stream.clone()),
            KeyValue::new(
                "weir.stream.sequence",
                i64::try_from(delivery.sequence).unwrap_or(i64::MAX),
            ),
            KeyValue::new(
                "weir.delivery.count",
                i64::try_from(delivery.delivered).unwrap_or(i64::MAX),
            ),
        ];
        if let Ok(event) = &delivery.event {
            attributes.push(KeyValue::new("weir.key", event.key.clone()));
        }
        trace.set_attributes(attributes);
        Some(trace)
    }

    /// Records a batch-wide step from `started` until now under every
    /// traced event of the batch it concerns.
    fn record_step(
        &self,
        slots: &[Slot],
        name: &str,
        started: SystemTime,
        concerns: impl Fn(&Slot) -> bool,
    ) {
        if !self.tracing.is_enabled() {
            return;
        }
        let times = (started, SystemTime::now());
        let traces = slots
            .iter()
            .filter(|slot| concerns(slot))
            .filter_map(|slot| slot.trace.as_ref());
        for trace in traces {
            trace.record_step(&self.tracing, name, times);
        }
    }

    /// Traces one invocation and writes out its log lines.
    async fn observe_invocation(&mut self, slot: &Slot, key: &str, invocation: &Invocation) {
        if let Some(trace) = &slot.trace {
            let end = invocation.started + invocation.took;
            trace.record_invocation(
                &self.tracing,
                &self.name,
                (invocation.started, end),
                &invocation.diagnostics.spans,
            );
        }
        let diagnostics = &invocation.diagnostics;
        if diagnostics.logs.is_empty() && diagnostics.dropped_logs == 0 {
            return;
        }
        let trace_id = slot.trace.as_ref().map(EventTrace::trace_id);
        let origin = LineOrigin {
            key,
            sequence: slot.sequence,
            trace_id: trace_id.as_deref(),
            time: invocation.started,
        };
        self.logs.write(origin, diagnostics).await;
    }

    /// Puts the trace context on an output: the event's own when traced,
    /// else the input's as it came (unless the guest set one).
    fn carry_trace(&self, slot: &Slot, headers: &mut Vec<(String, String)>) {
        match &slot.trace {
            Some(trace) => self.tracing.inject(trace.context(), headers),
            None => {
                if !headers.iter().any(|(name, _)| is_trace_header(name)) {
                    headers.extend(trace_headers(slot.message.headers.as_ref()));
                }
            }
        }
    }

    /// Runs `events` in order on a blocking thread, replacing the instance
    /// after a trap. The breaker is asked before each call and told how it
    /// went; events it refuses are not run.
    async fn invoke(&mut self, view: BatchView, events: Vec<(usize, usize, Event, bool)>) -> Ran {
        let lanes: Vec<LaneRun> = self
            .lanes
            .iter_mut()
            .map(|lane| LaneRun {
                code: lane.code.clone(),
                settings: lane.settings.clone(),
                instance: lane.instance.take(),
                breaker: lane.breaker.take(),
            })
            .collect();
        let ran = tokio::task::spawn_blocking(move || {
            let mut ran = Ran {
                lanes,
                view,
                results: Vec::with_capacity(events.len()),
                transitions: Vec::new(),
            };
            for (index, lane, event, traced) in events {
                if let Some(breaker) = &mut ran.lanes[lane].breaker {
                    let (permit, transition) = breaker.try_acquire();
                    ran.transitions.extend(transition.map(|t| (lane, t)));
                    if let Permit::Refused { retry_after } = permit {
                        ran.results.push((index, Run::Deferred { retry_after }));
                        continue;
                    }
                }
                let invocation = ran.run_one(lane, &event, traced);
                if let Some(breaker) = &mut ran.lanes[lane].breaker {
                    let failed = match &invocation.result {
                        Ok(_) => Some(false),
                        Err(failure) if failure.kind.counts_against_function() => Some(true),
                        Err(_) => None,
                    };
                    match failed {
                        Some(failed) => {
                            let transition = breaker.record(CallResult {
                                failed,
                                duration: invocation.took,
                            });
                            ran.transitions.extend(transition.map(|t| (lane, t)));
                        }
                        None => breaker.release(),
                    }
                }
                ran.results.push((index, Run::Invoked(invocation)));
            }
            ran
        })
        .await;
        match ran {
            Ok(mut ran) => {
                for (lane, run) in self.lanes.iter_mut().zip(&mut ran.lanes) {
                    lane.instance = run.instance.take();
                    lane.breaker = run.breaker.take();
                }
                ran
            }
            Err(error) => {
                // The blocking task panicked: a host bug, not the guest's.
                // Nothing ran to completion; the batch is handed back.
                tracing::error!(function = %self.name, %error, "invocation task failed; its circuit breakers start again closed");
                for lane in &mut self.lanes {
                    lane.breaker = Some(Breaker::new(
                        lane.settings.breaker.clone(),
                        Arc::new(SystemClock),
                    ));
                    lane.metrics.breaker_state.set(0.0);
                }
                Ran::default()
            }
        }
    }

    /// Logs a breaker transition and updates its metrics.
    fn observe_transition(&self, lane: usize, transition: &Transition) {
        let lane = &self.lanes[lane];
        let version = &lane.version;
        let (from, to) = (transition.from.as_str(), transition.to.as_str());
        let (failure_rate, slow_call_rate) = (transition.failure_rate, transition.slow_call_rate);
        match transition.to {
            crate::breaker::BreakerState::Open => tracing::warn!(
                function = %self.name, %version, from, to, failure_rate, slow_call_rate,
                wait_ms = lane.settings.breaker.wait_in_open_ms,
                "circuit breaker opened: events are held in the stream until it lets probes through"
            ),
            _ => tracing::info!(
                function = %self.name, %version, from, to, failure_rate, slow_call_rate,
                "circuit breaker changed state"
            ),
        }
        lane.metrics.breaker_state.set(transition.to.gauge());
        let mut labels = lane.metrics.labels.to_vec();
        labels.push(("to", to.to_string()));
        metrics::counter!("weir_breaker_transitions_total", &labels).increment(1);
    }

    /// The attempt a slot's delivery is: deliveries the breaker handed back
    /// do not count.
    fn attempt(&self, slot: &Slot) -> u64 {
        let deferred = self.deferrals.get(&slot.sequence).copied().unwrap_or(0);
        attempt_of(slot.delivered, deferred)
    }

    /// Counts this batch's deferrals and forgets the events that are done.
    fn track_deferrals(&mut self, slots: &[Slot], decisions: &[AckDecision]) {
        let changes = slots.iter().zip(decisions).map(|(slot, decision)| {
            let change = match (&slot.outcome, decision) {
                (Some(EventOutcome::Deferred { .. }), _) => DeferralChange::Deferred,
                (_, AckDecision::Nak { .. }) => DeferralChange::Retried,
                _ => DeferralChange::Done,
            };
            (slot.sequence, change)
        });
        note_deferrals(&mut self.deferrals, changes);
    }

    /// Adds the lanes' calls to the shared statistics (at most every
    /// [`STATS_EVERY`]) and rolls the canary back when it fails more than the
    /// rollout allows compared with the stable version.
    async fn watch_canary(&mut self) {
        let Some(link) = self.deployment.clone() else {
            return;
        };
        if self.last_stats.elapsed() >= STATS_EVERY {
            self.last_stats = std::time::Instant::now();
            for lane in &mut self.lanes {
                let (Some(number), delta) = (lane.number, lane.unreported) else {
                    continue;
                };
                if delta.0 == 0 {
                    continue;
                }
                match link
                    .store
                    .add_stats(&link.namespace, &link.name, number, delta)
                    .await
                {
                    Ok(()) => lane.unreported = (0, 0, 0),
                    Err(error) => tracing::debug!(%error, "version statistics not recorded"),
                }
            }
        }
        let (Some(stable), Some(canary)) = (self.lanes.first(), self.lanes.get(1)) else {
            return;
        };
        if self.rolled_back || canary.seen.0 < u64::from(link.rollout.rollback_min_calls) {
            return;
        }
        let rate = |(calls, failures): (u64, u64)| {
            if calls == 0 {
                0.0
            } else {
                failures as f64 * 100.0 / calls as f64
            }
        };
        let (canary_rate, stable_rate) = (rate(canary.seen), rate(stable.seen));
        if canary_rate <= stable_rate + link.rollout.rollback_margin {
            return;
        }
        let reason = format!(
            "version {} failed {canary_rate:.1} % of {} calls; version {} failed {stable_rate:.1} %; the margin is {} points",
            canary.number.unwrap_or_default(),
            canary.seen.0,
            stable.number.unwrap_or_default(),
            link.rollout.rollback_margin
        );
        tracing::warn!(function = %self.name, %reason, "rolling the canary back");
        let expected = (
            stable.number.unwrap_or_default(),
            canary.number.unwrap_or_default(),
        );
        match link
            .store
            .rollback_if(&link.namespace, &link.name, expected, &reason)
            .await
        {
            // Not ours to roll back any more: the rollout has changed.
            Ok(_) | Err(crate::control::store::StoreError::NoCanary(_)) => self.rolled_back = true,
            Err(error) => {
                tracing::warn!(function = %self.name, %error, "cannot roll the canary back yet")
            }
        }
    }

    /// Publishes the function's status for `/status`.
    fn report_status(&self) {
        let stable = &self.lanes[0];
        let Some(breaker) = &stable.breaker else {
            return;
        };
        self.readiness.report(FunctionStatus {
            name: self.name.to_string(),
            version: stable.version.clone(),
            breaker: breaker.snapshot(),
            pending: self.pending,
            deferred: self.deferrals.len(),
        });
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
        if let Some(trace) = &slot.trace {
            self.tracing.inject(trace.context(), &mut headers);
        }
        headers.extend([
            (dlq::FUNCTION.to_string(), self.name.to_string()),
            (
                dlq::VERSION.to_string(),
                self.lanes[slot.lane].version.clone(),
            ),
            (dlq::KIND.to_string(), failure.kind.as_str().to_string()),
            (dlq::REASON.to_string(), header_text(&failure.message)),
            (dlq::ATTEMPTS.to_string(), self.attempt(slot).to_string()),
            (dlq::SUBJECT.to_string(), message.subject.to_string()),
            (dlq::SEQUENCE.to_string(), slot.sequence.to_string()),
        ]);
        OutputRecord {
            subject: self.dead_letter_subject.clone(),
            payload: message.payload.clone(),
            headers,
            msg_id: dead_letter_msg_id(&self.lanes[slot.lane].msg_scope, slot.sequence),
        }
    }

    /// Adds the batch's outcomes to the per-function counters, once per
    /// outcome kind rather than once per event.
    fn count_outcomes(&self, slots: &[Slot], decisions: &[AckDecision]) {
        let mut outcomes: std::collections::BTreeMap<(usize, &'static str), u64> =
            Default::default();
        for slot in slots {
            *outcomes
                .entry((slot.lane, outcome_label(slot.outcome.as_ref()).0))
                .or_default() += 1;
        }
        for ((lane, outcome), count) in outcomes {
            metrics::counter!(
                "weir_events_total",
                "function" => self.name.to_string(),
                "version" => self.lanes[lane].version.clone(),
                "outcome" => outcome
            )
            .increment(count);
        }
        for (slot, decision) in slots.iter().zip(decisions) {
            let metrics = &self.lanes[slot.lane].metrics;
            match decision {
                AckDecision::DeadLetter => metrics.dead_letters.increment(1),
                AckDecision::Nak { .. }
                    if !matches!(slot.outcome, Some(EventOutcome::Deferred { .. })) =>
                {
                    metrics.retries.increment(1)
                }
                _ => {}
            }
        }
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
    /// No event got a decision, so these deliveries are not attempts.
    async fn give_back(&mut self, slots: Vec<Slot>, reason: &str, cancel: &CancellationToken) {
        tracing::warn!(function = %self.name, events = slots.len(), error = reason, "batch not committed; it will be delivered again");
        let changes = slots.iter().map(|s| (s.sequence, DeferralChange::Deferred));
        note_deferrals(&mut self.deferrals, changes);
        for slot in slots {
            let _ = slot
                .message
                .ack_with(AckKind::Nak(Some(BATCH_RETRY_DELAY)))
                .await;
            if let Some(trace) = slot.trace {
                trace.finish("given-back", Some(reason), SystemTime::now());
            }
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

/// Room kept in every output for the headers Weir adds (message id, trace
/// context) on top of what the guest publishes.
const WEIR_HEADER_ROOM: usize = 1024;

/// The sandbox settings of a function's instances, for a NATS server that
/// takes messages of up to `max_payload` bytes.
pub fn instance_settings(spec: &FunctionSpec, max_payload: usize) -> InstanceSettings {
    InstanceSettings {
        function: Arc::from(spec.name.as_str()),
        allowed_outputs: spec.outputs.clone().into(),
        deadline: Duration::from_millis(spec.limits.deadline_ms),
        limits: spec.limits.clone(),
        max_record_bytes: max_payload.saturating_sub(WEIR_HEADER_ROOM),
        breaker: spec.breaker.clone(),
    }
}

/// The `version` label of a function: its module digest's first 12 hex
/// digits.
pub fn version_of(code: &FunctionCode) -> String {
    code.digest().chars().take(12).collect()
}

/// One lane's code and taken state, on the blocking thread.
struct LaneRun {
    code: FunctionCode,
    settings: InstanceSettings,
    instance: Option<FunctionInstance>,
    breaker: Option<Breaker>,
}

/// What one batch's run on the blocking thread gives back.
#[derive(Default)]
struct Ran {
    lanes: Vec<LaneRun>,
    view: BatchView,
    results: Vec<(usize, Run)>,
    /// Breaker transitions, with the lane they happened in.
    transitions: Vec<(usize, Transition)>,
}

impl Ran {
    /// Runs one event on the lane's warm instance, or a new one if there is
    /// none or the last one trapped.
    fn run_one(&mut self, lane: usize, event: &Event, traced: bool) -> Invocation {
        let run = &mut self.lanes[lane];
        let live = match run.instance.take() {
            Some(live) if !live.is_poisoned() => Ok(live),
            _ => FunctionInstance::new(&run.code, &run.settings),
        };
        let mut live = match live {
            Ok(live) => live,
            Err(error) => {
                return Invocation {
                    result: Err(Failure::new(FailureKind::Trap, error.to_string())),
                    started: SystemTime::now(),
                    took: Duration::ZERO,
                    diagnostics: InvocationDiagnostics::default(),
                };
            }
        };
        live.begin_batch(std::mem::take(&mut self.view));
        let invocation = live.handle(event, traced);
        self.view = live.end_batch();
        self.lanes[lane].instance = Some(live);
        invocation
    }
}

/// What became of one event on the blocking thread.
enum Run {
    Invoked(Invocation),
    /// The breaker refused the call.
    Deferred {
        retry_after: Duration,
    },
}

/// The attempt a delivery is: `deferred` of the event's deliveries ended
/// without a decision (the breaker handed it back, or the whole batch was)
/// and do not count.
fn attempt_of(delivered: u64, deferred: u64) -> u64 {
    delivered.saturating_sub(deferred).max(1)
}

/// What a batch did to an event's deferral count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeferralChange {
    /// Handed back without a decision: one more delivery that is no attempt.
    Deferred,
    /// Naked for another attempt: keep counting.
    Retried,
    /// Acked or dead-lettered: forget it.
    Done,
}

/// Applies one batch's changes to the deferral counts, keeping at most
/// [`MAX_TRACKED_DEFERRALS`] (the oldest sequences go first).
fn note_deferrals(
    deferrals: &mut HashMap<u64, u64>,
    changes: impl IntoIterator<Item = (u64, DeferralChange)>,
) {
    for (sequence, change) in changes {
        match change {
            DeferralChange::Deferred => *deferrals.entry(sequence).or_default() += 1,
            DeferralChange::Retried => {}
            DeferralChange::Done => {
                deferrals.remove(&sequence);
            }
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

/// The outcome label of metrics and spans, and the error, if any.
fn outcome_label(outcome: Option<&EventOutcome>) -> (&'static str, Option<&str>) {
    match outcome {
        Some(EventOutcome::Applied) => ("applied", None),
        Some(EventOutcome::AlreadyApplied) => ("already-applied", None),
        Some(EventOutcome::Deferred { .. }) => ("deferred", None),
        Some(EventOutcome::Failed(failure)) => (failure.kind.as_str(), Some(&failure.message)),
        None => ("unfinished", None),
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
    fn deferred_deliveries_are_not_attempts() {
        let mut deferrals = HashMap::new();
        // Event 7: deferred twice, then run and naked, then run again.
        note_deferrals(&mut deferrals, [(7, DeferralChange::Deferred)]);
        note_deferrals(&mut deferrals, [(7, DeferralChange::Deferred)]);
        assert_eq!(attempt_of(3, deferrals[&7]), 1, "third delivery, first run");
        note_deferrals(&mut deferrals, [(7, DeferralChange::Retried)]);
        assert_eq!(attempt_of(4, deferrals[&7]), 2);
        note_deferrals(&mut deferrals, [(7, DeferralChange::Done)]);
        assert!(deferrals.is_empty());
        // A count that outlived its deliveries never makes attempt 0.
        assert_eq!(attempt_of(1, 5), 1);

        let many = (0..MAX_TRACKED_DEFERRALS as u64 + 10).map(|s| (s, DeferralChange::Deferred));
        note_deferrals(&mut deferrals, many);
        assert_eq!(deferrals.len(), MAX_TRACKED_DEFERRALS);
        assert!(!deferrals.contains_key(&9) && deferrals.contains_key(&10));
    }

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
