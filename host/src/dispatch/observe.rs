//! What a worker reports about a batch, beside the protocol: spans of each
//! event, guest log lines, metrics, breaker transitions and log lines of
//! outcomes. Nothing here decides anything.

use std::time::SystemTime;

use super::FunctionWorker;
use super::batch::{Batch, Outcome};
use crate::ack::AckDecision;
use crate::breaker::Transition;
use crate::guest_logs::LineOrigin;
use crate::health::FunctionStatus;
use crate::ingest::Delivery;
use crate::sandbox::Invocation;
use crate::traces::EventTrace;

impl FunctionWorker {
    /// Opens the `process` span of one delivery; `None` when tracing is off.
    pub(super) fn start_trace(
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
    pub(super) fn record_step(
        &self,
        traces: &[Option<EventTrace>],
        batch: &Batch,
        name: &str,
        started: SystemTime,
        concerns: impl Fn(&Outcome) -> bool,
    ) {
        if !self.tracing.is_enabled() {
            return;
        }
        let times = (started, SystemTime::now());
        for (trace, record) in traces.iter().zip(batch.records()) {
            if let Some(trace) = trace
                && concerns(&record.outcome)
            {
                trace.record_step(&self.tracing, name, times);
            }
        }
    }

    /// Counts, traces and writes out the log lines of one invocation.
    pub(super) async fn observe_invocation(
        &mut self,
        lane: usize,
        sequence: u64,
        key: &str,
        trace: Option<&EventTrace>,
        invocation: &Invocation,
    ) {
        let lane = &mut self.lanes[lane];
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
        if let Some(trace) = trace {
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
        let trace_id = trace.map(EventTrace::trace_id);
        let origin = LineOrigin {
            key,
            sequence,
            trace_id: trace_id.as_deref(),
            time: invocation.started,
        };
        self.logs.write(origin, diagnostics).await;
    }

    /// Logs a breaker transition and updates its metrics.
    pub(super) fn observe_transition(&self, lane: usize, transition: &Transition) {
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

    /// Adds the batch's outcomes to the per-function counters, once per
    /// outcome kind rather than once per event, and logs failures.
    pub(super) fn count_outcomes(&self, batch: &Batch) {
        let mut outcomes: std::collections::BTreeMap<(usize, &'static str), u64> =
            Default::default();
        for (index, record) in batch.records().iter().enumerate() {
            *outcomes
                .entry((record.lane, outcome_label(&record.outcome).0))
                .or_default() += 1;
            let metrics = &self.lanes[record.lane].metrics;
            let decision = batch.decision(index);
            match decision {
                AckDecision::DeadLetter => metrics.dead_letters.increment(1),
                AckDecision::Nak { .. } if !batch.is_deferral(index) => {
                    metrics.retries.increment(1)
                }
                _ => {}
            }
            self.log_outcome(&record.outcome, record.sequence, decision);
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
    }

    fn log_outcome(&self, outcome: &Outcome, sequence: u64, decision: AckDecision) {
        let Outcome::Failed(failure) = outcome else {
            return;
        };
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

    /// Publishes the function's status for `/status`.
    pub(super) fn report_status(&self) {
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
}

/// The outcome label of metrics and spans, and the error, if any.
pub(super) fn outcome_label(outcome: &Outcome) -> (&'static str, Option<&str>) {
    match outcome {
        Outcome::Applied { .. } => ("applied", None),
        Outcome::AlreadyApplied | Outcome::Duplicate { .. } => ("already-applied", None),
        Outcome::Deferred { reason, .. } => (reason.as_str(), None),
        Outcome::Failed(failure) => (failure.kind.as_str(), Some(&failure.message)),
        Outcome::ToRun => ("unfinished", None),
    }
}
