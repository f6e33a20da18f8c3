//! Ingest: one durable JetStream pull consumer per function, read in
//! batches.
//!
//! A batch is every message available now, up to the function's batch size,
//! or, when none is, the first one to arrive plus what came with it: low
//! latency when traffic is light, large batches when it is heavy. Nothing is
//! prefetched: the host holds only the batch it works on, so a function that
//! falls behind leaves its backlog in JetStream instead of in memory.

mod extract;
mod stall;

use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, Message};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

pub use extract::{Extractor, MAX_KEY_BYTES, RawMessage};
use stall::StallWatch;

use crate::config::FunctionSpec;
use crate::outcome::Failure;
use crate::sandbox::Event;

/// Longest a pull request waits for a message when the consumer is idle;
/// also the longest a graceful shutdown waits for the request in flight.
pub const IDLE_WAIT: Duration = Duration::from_millis(500);

/// How much longer than its expiry a pull request may take to be answered.
const PULL_GRACE: Duration = Duration::from_secs(2);

/// Why the consumer could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("stream `{stream}` of function `{function}` is not available: {reason}")]
    Stream {
        function: String,
        stream: String,
        reason: String,
    },
    #[error("consumer of function `{function}`: {reason}")]
    Consumer { function: String, reason: String },
    #[error(
        "stream `{stream}` of function `{function}` cannot be looked up now (NATS unreachable or restarting): {reason}"
    )]
    Unreachable {
        function: String,
        stream: String,
        reason: String,
    },
}

impl IngestError {
    /// Whether waiting could help: the broker did not answer, as opposed to
    /// answering no.
    pub fn is_outage(&self) -> bool {
        matches!(self, IngestError::Unreachable { .. })
    }
}

/// One delivered message and what extraction made of it.
#[derive(Debug)]
pub struct Delivery {
    pub message: Message,
    pub sequence: u64,
    /// 1 on first delivery.
    pub delivered: u64,
    /// Messages the consumer still had to deliver after this one.
    pub pending: u64,
    pub event: Result<Event, Failure>,
}

/// The consumer of one function.
pub struct Ingest {
    function: String,
    consumer: PullConsumer,
    batch_size: usize,
    extractor: Extractor,
    stall: StallWatch,
    stream: jetstream::stream::Stream,
    filter: String,
    /// The consumer was found deleted: the owner opens it again.
    lost: bool,
    /// Empty pulls since the consumer's existence was last checked.
    idle_pulls: u32,
}

/// Empty pulls (of [`IDLE_WAIT`]) between checks that the consumer still
/// exists.
const CHECK_CONSUMER_EVERY: u32 = 20;

/// The stream a function reads, and which incarnation of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamIdentity {
    pub name: String,
    /// When the stream was created, in ns since the Unix epoch: a stream
    /// deleted and made again under the same name has another.
    pub created_ns: i64,
}

fn stream_error(spec: &FunctionSpec, reason: String) -> IngestError {
    IngestError::Stream {
        function: spec.name.clone(),
        stream: spec.stream.clone(),
        reason,
    }
}

fn consumer_error(spec: &FunctionSpec, error: &dyn std::fmt::Display) -> IngestError {
    IngestError::Consumer {
        function: spec.name.clone(),
        reason: error.to_string(),
    }
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("function", &self.function)
            .finish_non_exhaustive()
    }
}

/// The durable consumer name of a function.
pub fn consumer_name(function: &str) -> String {
    format!("weir-{function}")
}

impl Ingest {
    /// Checks that the function's stream exists: a binding to a stream
    /// that is not there is refused at start, not waited for.
    pub async fn check_stream(
        js: &jetstream::Context,
        spec: &FunctionSpec,
    ) -> Result<(), IngestError> {
        use async_nats::jetstream::context::GetStreamErrorKind;
        let Err(error) = js.get_stream(&spec.stream).await else {
            return Ok(());
        };
        let outage = match error.kind() {
            GetStreamErrorKind::Request => true,
            GetStreamErrorKind::JetStream(api) => {
                api.error_code() == jetstream::ErrorCode::CLUSTER_NOT_AVAILABLE
            }
            _ => false,
        };
        if outage {
            Err(IngestError::Unreachable {
                function: spec.name.clone(),
                stream: spec.stream.clone(),
                reason: error.to_string(),
            })
        } else {
            Err(stream_error(spec, error.to_string()))
        }
    }

    /// Opens the function's durable consumer for a worker that owns the
    /// function. An existing consumer is used as it is (its settings brought
    /// up to date); a missing one is created just above `resume_at`, the
    /// ack floor last recorded with the function's progress (0: from the
    /// start of the stream), never from the start of a stream the function
    /// has already read. Also returns the stream's identity.
    pub async fn open(
        js: &jetstream::Context,
        spec: &FunctionSpec,
        resume_at: u64,
    ) -> Result<(Self, StreamIdentity), IngestError> {
        let stream = js
            .get_stream(&spec.stream)
            .await
            .map_err(|e| stream_error(spec, e.to_string()))?;
        let created = stream.cached_info().created;
        let identity = StreamIdentity {
            name: spec.stream.clone(),
            created_ns: i64::try_from(created.unix_timestamp_nanos()).unwrap_or(i64::MAX),
        };
        let exists = match stream.consumer_info(consumer_name(&spec.name)).await {
            Ok(_) => true,
            Err(error) if error.kind() == ConsumerInfoErrorKind::NotFound => false,
            Err(error) => return Err(consumer_error(spec, &error)),
        };
        let start = match (exists, resume_at) {
            (true, _) | (false, 0) => DeliverPolicy::All,
            (false, floor) => {
                tracing::warn!(function = %spec.name, resume_at = floor + 1, "the function's consumer was missing; recreated above its last recorded ack floor");
                metrics::counter!("weir_consumer_recreated_total", "function" => spec.name.clone())
                    .increment(1);
                DeliverPolicy::ByStartSequence {
                    start_sequence: floor + 1,
                }
            }
        };
        let ingest = Self::bind_at(js, spec, start).await?;
        Ok((ingest, identity))
    }

    /// Creates the function's durable consumer reading from `start` (an
    /// existing one keeps its own position).
    pub async fn bind_at(
        js: &jetstream::Context,
        spec: &FunctionSpec,
        start: DeliverPolicy,
    ) -> Result<Self, IngestError> {
        let stream = js
            .get_stream(&spec.stream)
            .await
            .map_err(|e| stream_error(spec, e.to_string()))?;
        let name = consumer_name(&spec.name);
        let max_ack_pending = i64::try_from(spec.batch_size * 4).unwrap_or(i64::MAX);
        let wanted = PullConfig {
            durable_name: Some(name.clone()),
            filter_subject: spec.subject.clone(),
            deliver_policy: start,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_millis(spec.ack_wait_ms),
            // Weir counts attempts itself and dead-letters after the last
            // one; a server-side limit would drop events silently.
            max_deliver: -1,
            max_ack_pending,
            ..Default::default()
        };
        let mut consumer: PullConsumer = stream
            .get_or_create_consumer(&name, wanted.clone())
            .await
            .map_err(|e| consumer_error(spec, &e))?;
        // An existing consumer keeps the settings it was made with; bring
        // the ones a binding can change up to date (its position stays).
        let current = &consumer.cached_info().config;
        if current.filter_subject != wanted.filter_subject
            || current.ack_wait != wanted.ack_wait
            || current.max_ack_pending != wanted.max_ack_pending
        {
            let updated = PullConfig {
                deliver_policy: current.deliver_policy,
                ..wanted
            };
            tracing::info!(function = %spec.name, subject = %spec.subject, "updating the function's consumer to its binding");
            // Creating an existing durable with a new configuration edits it
            // where the server allows; where it does not, say so and run on
            // the consumer as it is.
            match stream.create_consumer(updated).await {
                Ok(updated) => consumer = updated,
                Err(error) => {
                    tracing::warn!(function = %spec.name, %error, "the consumer keeps its old settings")
                }
            }
        }
        Ok(Self {
            function: spec.name.clone(),
            consumer,
            batch_size: spec.batch_size,
            extractor: Extractor::new(spec.key.clone(), spec.event_time.clone()),
            stall: StallWatch::new(&spec.name),
            stream,
            filter: spec.subject.clone(),
            lost: false,
            idle_pulls: 0,
        })
    }

    /// The next batch of at most `max` events (and never more than the
    /// batch size), or `None` once `cancel` fires. Takes whatever is
    /// available now; when nothing is, waits up to [`IDLE_WAIT`] for the
    /// first message and returns an empty batch if none came (the caller
    /// renews its lease and tidies up while idle). A pull request is never abandoned
    /// half-way, so no delivered message is stranded until the ack wait:
    /// shutdown waits for the request in flight instead.
    pub async fn next_batch(
        &mut self,
        cancel: &CancellationToken,
        max: usize,
    ) -> Option<Vec<Delivery>> {
        let max = max.clamp(1, self.batch_size);
        if cancel.is_cancelled() {
            return None;
        }
        let pulled = match self.fetch_available(max).await {
            Ok(batch) if batch.is_empty() => self.wait_for_first(max).await,
            other => other,
        };
        match pulled {
            Ok(batch) if batch.is_empty() => {
                self.stall.empty_pull();
                self.idle_pulls += 1;
                if self.idle_pulls >= CHECK_CONSUMER_EVERY {
                    self.idle_pulls = 0;
                    self.check_consumer().await;
                }
                Some(batch)
            }
            Ok(batch) => {
                self.stall.delivered(batch.last().map_or(0, |d| d.pending));
                Some(batch)
            }
            Err(error) => {
                tracing::warn!(function = %self.function, %error, "cannot pull messages; retrying");
                self.check_consumer().await;
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                // Back to the worker, which renews its lease (or finds it
                // cannot) before pulling again.
                Some(Vec::new())
            }
        }
    }

    /// Whether the consumer was found deleted (it is then recreated by
    /// opening again, at the recorded position).
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// Checks the consumer still exists; true (and remembered) if it was
    /// deleted.
    async fn check_consumer(&mut self) -> bool {
        let name = consumer_name(&self.function);
        if let Err(error) = self.stream.consumer_info(&name).await
            && error.kind() == ConsumerInfoErrorKind::NotFound
        {
            tracing::warn!(function = %self.function, consumer = %name, "the function's consumer was deleted");
            self.lost = true;
        }
        self.lost
    }

    /// Up to `max` messages that are available now, without waiting.
    async fn fetch_available(&self, max: usize) -> Result<Vec<Delivery>, String> {
        let messages = self
            .consumer
            .fetch()
            .max_messages(max)
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        self.collect(messages).await
    }

    /// Waits up to [`IDLE_WAIT`] for one message, then takes what else is
    /// available up to `max`.
    async fn wait_for_first(&self, max: usize) -> Result<Vec<Delivery>, String> {
        let messages = self
            .consumer
            .batch()
            .max_messages(1)
            .expires(IDLE_WAIT)
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        let mut batch = self.collect(messages).await?;
        if !batch.is_empty() && max > 1 {
            batch.extend(self.fetch_available(max - 1).await?);
        }
        Ok(batch)
    }

    async fn collect(
        &self,
        mut messages: impl futures::Stream<Item = Result<Message, impl std::fmt::Display>> + Unpin,
    ) -> Result<Vec<Delivery>, String> {
        let mut batch = Vec::new();
        // A pull request whose server died never gets its closing status;
        // do not wait for it past its own expiry.
        let deadline = tokio::time::Instant::now() + IDLE_WAIT + PULL_GRACE;
        loop {
            let next = match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(next)) => next,
                Ok(None) => break,
                Err(_) if !batch.is_empty() => break,
                Err(_) => return Err("the pull request got no answer".into()),
            };
            match next {
                Ok(message) => batch.extend(self.delivery(message)),
                // Keep what arrived; the error shows again on the next pull.
                Err(_) if !batch.is_empty() => break,
                Err(error) => return Err(error.to_string()),
            }
        }
        Ok(batch)
    }

    fn delivery(&self, message: Message) -> Option<Delivery> {
        let info = match message.info() {
            Ok(info) => info,
            Err(error) => {
                // Only JetStream sets the reply subject it parses; without
                // it the message can be neither acked nor sequenced.
                tracing::error!(function = %self.function, %error, "message without JetStream metadata");
                return None;
            }
        };
        let sequence = info.stream_sequence;
        let pending = info.pending;
        let delivered = u64::try_from(info.delivered).unwrap_or(1).max(1);
        let stored_at_ms =
            i64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or_default();
        let event = self.extractor.event(&RawMessage {
            subject: message.subject.as_str(),
            headers: message.headers.as_ref(),
            payload: &message.payload,
            sequence,
            stored_at_ms,
        });
        Some(Delivery {
            message,
            sequence,
            delivered,
            pending,
            event,
        })
    }

    /// Deletes the function's durable consumer, if there is one: a replay
    /// binds a new one at its start position.
    pub async fn remove_consumer(
        js: &jetstream::Context,
        spec: &FunctionSpec,
    ) -> Result<(), IngestError> {
        let stream = js
            .get_stream(&spec.stream)
            .await
            .map_err(|e| stream_error(spec, e.to_string()))?;
        match stream.delete_consumer(&consumer_name(&spec.name)).await {
            Ok(_) => Ok(()),
            Err(error) if error.to_string().contains("not found") => Ok(()),
            Err(error) => Err(consumer_error(spec, &error)),
        }
    }

    /// Takes back the events a previous owner left out (it stopped renewing
    /// with events in hand: killed, paused or cut off): the consumer is made
    /// again just above its ack floor, so everything not acked is delivered
    /// again at once and in stream order, instead of after the ack wait and
    /// after later events. Returns the consumer and how many sequences lay
    /// between the floor and the last delivery.
    pub async fn reopen_above_floor(
        mut self,
        js: &jetstream::Context,
        spec: &FunctionSpec,
    ) -> Result<(Self, u64), IngestError> {
        let (floor, delivered) = self.floor_and_delivered().await?;
        if delivered <= floor {
            return Ok((self, 0));
        }
        Self::remove_consumer(js, spec).await?;
        let start = DeliverPolicy::ByStartSequence {
            start_sequence: floor + 1,
        };
        Ok((Self::bind_at(js, spec, start).await?, delivered - floor))
    }

    /// The consumer's ack floor and the last sequence it delivered.
    async fn floor_and_delivered(&mut self) -> Result<(u64, u64), IngestError> {
        let info = self
            .consumer
            .info()
            .await
            .map_err(|e| IngestError::Consumer {
                function: self.function.clone(),
                reason: e.to_string(),
            })?;
        Ok((
            info.ack_floor.stream_sequence,
            info.delivered.stream_sequence,
        ))
    }

    /// The events another host may still hold: (sequence, key) of each
    /// message between the consumer's ack floor and its last delivery, at
    /// most `limit` of them, read from the stream. A new owner keeps their
    /// keys' later events waiting until they are decided.
    pub async fn outstanding(&mut self, limit: usize) -> Result<Vec<(u64, String)>, IngestError> {
        let (floor, delivered) = self.floor_and_delivered().await?;
        if delivered.saturating_sub(floor) > limit as u64 {
            tracing::warn!(function = %self.function, floor, delivered, limit, "more events are out than a new owner reads back; order per key is kept for the first ones only");
        }
        let mut outstanding = Vec::new();
        // Both ends of the range when it is longer than the limit: the
        // oldest events out (retries) and the newest (the batch in hand).
        let range = floor + 1..=delivered;
        let half = (limit / 2) as u64;
        let wanted = move |s: &u64| {
            delivered.saturating_sub(floor) <= limit as u64
                || *s <= floor + half
                || *s > delivered.saturating_sub(half)
        };
        for sequence in range.filter(wanted) {
            // Deleted or purged messages are gone for every owner.
            let Ok(message) = self.stream.get_raw_message(sequence).await else {
                continue;
            };
            if !crate::output::subject_matches(&self.filter, &message.subject) {
                continue;
            }
            let event = self.extractor.event(&RawMessage {
                subject: message.subject.as_str(),
                headers: Some(&message.headers),
                payload: &message.payload,
                sequence,
                stored_at_ms: 0,
            });
            if let Ok(event) = event {
                outstanding.push((sequence, event.key));
            }
        }
        Ok(outstanding)
    }

    /// The highest stream sequence at or below which every message of this
    /// consumer is acknowledged.
    pub async fn ack_floor(&mut self) -> Result<u64, IngestError> {
        Ok(self.floor_and_delivered().await?.0)
    }
}
