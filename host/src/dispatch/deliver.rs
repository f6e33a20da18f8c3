//! A batch's results as records to publish: outputs under their message
//! ids, dead letters with the reason in their headers, and a publish that
//! no single record can wedge (a record JetStream refuses for good is
//! dead-lettered or trimmed, never sent again and again).

use async_nats::jetstream::Message;
use opentelemetry::Context;

use super::FunctionWorker;
use super::batch::{Outcome, Record};
use crate::output::{
    OutputRecord, PublishError, SendTraces, dead_letter_headers as dlq, dead_letter_msg_id,
    header_text, output_msg_id, publish_all,
};
use crate::sandbox::PendingOutput;
use crate::traces::{EventTrace, is_trace_header, trace_headers};

/// Set on a dead letter whose payload or headers were cut to fit.
pub const TRIMMED_HEADER: &str = "Weir-Trimmed";

/// Whether a header is one JetStream interprets on publish (`Nats-*`):
/// only Weir sets those on what it publishes.
pub fn is_broker_header(name: &str) -> bool {
    name.get(..5)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case("nats-"))
}

impl FunctionWorker {
    /// The output records of one applied event, in the order it published
    /// them, each with its trace parent.
    pub(super) fn event_outputs(
        &self,
        record: &Record,
        message: &Message,
        trace: Option<&EventTrace>,
        outputs: Vec<PendingOutput>,
        into: &mut (Vec<OutputRecord>, Vec<Option<Context>>),
    ) {
        for (index, output) in outputs.into_iter().enumerate() {
            let mut headers: Vec<(String, String)> = output
                .headers
                .into_iter()
                .filter(|(name, _)| !is_broker_header(name))
                .collect();
            self.carry_trace(message, trace, &mut headers);
            into.0.push(OutputRecord {
                msg_id: output_msg_id(&self.msg_scope, record.sequence, index),
                subject: output.subject,
                payload: output.payload,
                headers,
            });
            into.1.push(trace.map(|t| t.context().clone()));
        }
    }

    /// Puts the trace context on an output: the event's own when traced,
    /// else the input's as it came (unless the guest set one).
    fn carry_trace(
        &self,
        message: &Message,
        trace: Option<&EventTrace>,
        headers: &mut Vec<(String, String)>,
    ) {
        match trace {
            Some(trace) => self.tracing.inject(trace.context(), headers),
            None => {
                if !headers.iter().any(|(name, _)| is_trace_header(name)) {
                    headers.extend(trace_headers(message.headers.as_ref()));
                }
            }
        }
    }

    /// The dead letter of a failed event: its payload, its headers less the
    /// ones JetStream would interpret, and why.
    pub(super) fn dead_letter(
        &self,
        record: &Record,
        message: &Message,
        trace: Option<&EventTrace>,
    ) -> OutputRecord {
        let (kind, reason) = match &record.outcome {
            Outcome::Failed(failure) => (failure.kind.as_str(), failure.message.as_str()),
            _ => ("trap", "no outcome"),
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
            .filter(|(name, _)| !is_broker_header(name))
            .collect();
        if let Some(trace) = trace {
            self.tracing.inject(trace.context(), &mut headers);
        }
        headers.extend([
            (dlq::FUNCTION.to_string(), self.name.to_string()),
            (
                dlq::VERSION.to_string(),
                self.lanes[record.lane].version.clone(),
            ),
            (dlq::KIND.to_string(), kind.to_string()),
            (dlq::REASON.to_string(), header_text(reason)),
            (dlq::ATTEMPTS.to_string(), record.attempt.to_string()),
            (dlq::SUBJECT.to_string(), message.subject.to_string()),
            (dlq::SEQUENCE.to_string(), record.sequence.to_string()),
        ]);
        OutputRecord {
            subject: self.dead_letter_subject.clone(),
            payload: message.payload.clone(),
            headers,
            msg_id: dead_letter_msg_id(&self.msg_scope, record.sequence),
        }
    }

    /// Publishes `records`, replacing each one JetStream refuses for good:
    /// an output becomes a dead letter saying why, a dead letter is
    /// trimmed to Weir's headers and a cut payload, and a trimmed one that
    /// is still refused is logged and dropped. Returns a transient failure
    /// for the caller to hold or hand back on.
    pub(super) async fn publish_records(
        &mut self,
        records: &mut Vec<OutputRecord>,
        parents: Vec<Option<Context>>,
    ) -> Result<(), PublishError> {
        let mut traces = SendTraces::new(&self.tracing, parents);
        loop {
            let error = match publish_all(&self.js, records, &traces).await {
                Ok(()) => return Ok(()),
                Err(error) if !error.permanent => return Err(error),
                Err(error) => error,
            };
            metrics::counter!("weir_publish_refused_total", "function" => self.name.to_string())
                .increment(1);
            let refused = records.remove(error.index);
            match self.replacement(refused, &error.reason) {
                Some(replacement) => {
                    tracing::warn!(function = %self.name, subject = %error.subject, error = %error.reason, "JetStream refused a record for good; publishing a trimmed dead letter in its place");
                    records.insert(error.index, replacement);
                }
                None => {
                    tracing::error!(function = %self.name, subject = %error.subject, error = %error.reason, "JetStream refused even the trimmed dead letter; dropping it")
                }
            }
            // Spans are by position, which just changed.
            traces = SendTraces::none();
        }
    }

    /// What to publish instead of a record JetStream refused for good.
    fn replacement(&self, refused: OutputRecord, reason: &str) -> Option<OutputRecord> {
        if refused.headers.iter().any(|(n, _)| n == TRIMMED_HEADER) {
            return None;
        }
        let is_dead_letter = refused.subject == self.dead_letter_subject;
        let mut headers: Vec<(String, String)> = if is_dead_letter {
            refused
                .headers
                .into_iter()
                .filter(|(name, _)| name.starts_with("Weir-"))
                .collect()
        } else {
            vec![
                (dlq::FUNCTION.to_string(), self.name.to_string()),
                (dlq::KIND.to_string(), "refused".to_string()),
                (
                    dlq::REASON.to_string(),
                    header_text(&format!("JetStream refused the output: {reason}")),
                ),
                (dlq::SUBJECT.to_string(), refused.subject.clone()),
            ]
        };
        headers.push((TRIMMED_HEADER.to_string(), "true".to_string()));
        let keep = (self.max_payload / 2).min(refused.payload.len());
        Some(OutputRecord {
            subject: self.dead_letter_subject.clone(),
            payload: refused.payload.slice(..keep),
            headers,
            msg_id: format!("{}:refused", refused.msg_id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_headers_are_recognised() {
        assert!(is_broker_header("Nats-Expected-Last-Subject-Sequence"));
        assert!(is_broker_header("nats-msg-id"));
        assert!(is_broker_header("NATS-Rollup"));
        assert!(!is_broker_header("traceparent"));
        assert!(!is_broker_header("Nats"));
        assert!(!is_broker_header("Weir-Error"));
    }
}
