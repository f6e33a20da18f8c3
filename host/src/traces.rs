//! Distributed traces of the data path, exported over OTLP/HTTP.
//!
//! Every input event gets a consumer span (`process <subject>`) whose parent
//! is the W3C `traceparent`/`tracestate` of the input message, with children
//! for the state load, the guest call (`invoke <function>`, holding the
//! guest's own spans), the state commit and one producer span per output
//! (`send <subject>`), whose context is written into that output's
//! `traceparent`. So a chain of functions is one trace. Batch-wide steps
//! (load, commit) appear under every traced event of the batch with the
//! batch's timing.
//!
//! Off (no endpoint), [`Tracing::disabled`] is a `None` and the data path
//! skips all of it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanBuilder, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};

use crate::config::{OtlpProtocol, TracingConfig};
use crate::sandbox::GuestSpan;

/// The W3C trace context headers.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Why the trace exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot export traces to {endpoint}: {reason}")]
pub struct TracingError {
    endpoint: String,
    reason: String,
}

/// The process's tracer, or nothing when tracing is off. Cheap to clone.
#[derive(Clone, Default)]
pub struct Tracing {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

impl Tracing {
    /// Tracing off.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts exporting as `config` says; off when it names no endpoint.
    pub fn start(config: &TracingConfig) -> Result<Self, TracingError> {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(Self::disabled());
        };
        let failed = |reason: String| TracingError {
            endpoint: endpoint.clone(),
            reason,
        };
        let protocol = match config.protocol {
            OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
            OtlpProtocol::HttpJson => Protocol::HttpJson,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .with_protocol(protocol)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| failed(e.to_string()))?;
        // A larger queue than the default 2048 rides out bursts at full
        // sampling; past it spans are dropped, never the events.
        let batching = BatchConfigBuilder::default()
            .with_max_queue_size(65_536)
            .with_max_export_batch_size(2_048)
            .with_scheduled_delay(Duration::from_millis(500))
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batching)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("weir");
        tracing::info!(%endpoint, ratio = config.sample_ratio, "exporting traces over OTLP");
        Ok(Self {
            inner: Some(Arc::new(Inner {
                provider,
                tracer,
                propagator: TraceContextPropagator::new(),
            })),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Opens the consumer span of one input message. `None` when tracing is
    /// off. Attributes are added afterwards, and only to sampled spans
    /// ([`EventTrace::set_attributes`]): most events are not sampled.
    pub fn start_process(
        &self,
        headers: Option<&async_nats::HeaderMap>,
        start: SystemTime,
        subject: &str,
    ) -> Option<EventTrace> {
        let inner = self.inner.as_ref()?;
        let parent = match headers {
            Some(headers) => inner.propagator.extract(&NatsHeaders(headers)),
            None => Context::new(),
        };
        let builder = SpanBuilder::from_name(format!("process {subject}"))
            .with_kind(SpanKind::Consumer)
            .with_start_time(start);
        let span = inner.tracer.build_with_context(builder, &parent);
        let context = parent.with_span(span);
        let sampled = context.span().span_context().is_sampled();
        Some(EventTrace { context, sampled })
    }

    /// Opens the root span of a window firing, which no input message's
    /// context leads to (the watermark fires it). `None` when tracing is
    /// off; sampled at the configured ratio like a new trace.
    pub fn start_firing(&self, function: &str, start: SystemTime) -> Option<EventTrace> {
        let inner = self.inner.as_ref()?;
        let parent = Context::new();
        let builder = SpanBuilder::from_name(format!("fire {function}"))
            .with_kind(SpanKind::Internal)
            .with_start_time(start);
        let span = inner.tracer.build_with_context(builder, &parent);
        let context = parent.with_span(span);
        let sampled = context.span().span_context().is_sampled();
        Some(EventTrace { context, sampled })
    }

    /// Writes `trace`'s context as `traceparent`/`tracestate` into `headers`,
    /// replacing any there.
    pub fn inject(&self, trace: &Context, headers: &mut Vec<(String, String)>) {
        let Some(inner) = &self.inner else {
            return;
        };
        headers.retain(|(name, _)| !is_trace_header(name));
        inner
            .propagator
            .inject_context(trace, &mut HeaderPairs(headers));
    }

    /// Opens a span under `parent` that ends later; `None` unless `parent`
    /// is sampled.
    pub fn start_child(
        &self,
        parent: &Context,
        name: String,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Option<Context> {
        let inner = self.inner.as_ref()?;
        if !parent.span().span_context().is_sampled() {
            return None;
        }
        let builder = SpanBuilder::from_name(name)
            .with_kind(kind)
            .with_attributes(attributes);
        Some(parent.with_span(inner.tracer.build_with_context(builder, parent)))
    }

    /// Records a finished span under `parent`; returns its context, for
    /// spans to nest under it.
    fn record(
        &self,
        parent: &Context,
        name: String,
        (start, end): (SystemTime, SystemTime),
        attributes: Vec<KeyValue>,
    ) -> Option<Context> {
        let inner = self.inner.as_ref()?;
        let builder = SpanBuilder::from_name(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(attributes);
        let context = parent.with_span(inner.tracer.build_with_context(builder, parent));
        context.span().end_with_timestamp(end);
        Some(context)
    }

    /// Flushes and stops the exporter; spans recorded after this are dropped.
    pub fn shutdown(&self) {
        if let Some(inner) = &self.inner
            && let Err(error) = inner.provider.shutdown()
        {
            tracing::warn!(%error, "flushing traces at shutdown failed");
        }
    }
}

/// The trace of one input event.
#[derive(Debug)]
pub struct EventTrace {
    /// Holds the `process` span.
    context: Context,
    sampled: bool,
}

impl EventTrace {
    /// The context outputs descend from.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// Whether this event's spans are recorded and exported.
    pub fn is_sampled(&self) -> bool {
        self.sampled
    }

    /// Sets attributes on the `process` span.
    pub fn set_attributes(&self, attributes: Vec<KeyValue>) {
        self.context.span().set_attributes(attributes);
    }

    /// The trace id, hex-encoded, for log lines.
    pub fn trace_id(&self) -> String {
        self.context.span().span_context().trace_id().to_string()
    }

    /// Records a batch-wide step (state load, commit) under this event.
    pub fn record_step(&self, tracing: &Tracing, name: &str, times: (SystemTime, SystemTime)) {
        if self.sampled {
            tracing.record(&self.context, name.to_string(), times, Vec::new());
        }
    }

    /// Records the guest call and the guest's own spans under it.
    pub fn record_invocation(
        &self,
        tracing: &Tracing,
        function: &str,
        times: (SystemTime, SystemTime),
        guest_spans: &[GuestSpan],
    ) {
        if !self.sampled {
            return;
        }
        let Some(invoke) = tracing.record(
            &self.context,
            format!("invoke {function}"),
            times,
            vec![KeyValue::new("weir.function", function.to_string())],
        ) else {
            return;
        };
        // Parents come before their children in the list.
        let mut contexts: Vec<Context> = Vec::with_capacity(guest_spans.len());
        for span in guest_spans {
            let parent = span.parent.and_then(|p| contexts.get(p)).unwrap_or(&invoke);
            let attributes = span
                .attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                .chain([KeyValue::new("weir.guest", true)])
                .collect();
            let recorded = tracing.record(
                parent,
                span.name.clone(),
                (span.start, span.end),
                attributes,
            );
            contexts.push(recorded.unwrap_or_else(|| invoke.clone()));
        }
    }

    /// Ends the `process` span with the event's outcome.
    pub fn finish(self, outcome: &str, error: Option<&str>, end: SystemTime) {
        let span = self.context.span();
        span.set_attribute(KeyValue::new("weir.outcome", outcome.to_string()));
        if let Some(error) = error {
            span.set_status(Status::error(error.to_string()));
        }
        span.end_with_timestamp(end);
    }
}

/// Whether `name` is a W3C trace context header.
pub fn is_trace_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(TRACEPARENT) || name.eq_ignore_ascii_case(TRACESTATE)
}

/// The trace context headers of `headers`, as they are.
pub fn trace_headers(headers: Option<&async_nats::HeaderMap>) -> Vec<(String, String)> {
    let Some(headers) = headers else {
        return Vec::new();
    };
    [TRACEPARENT, TRACESTATE]
        .into_iter()
        .filter_map(|name| {
            headers
                .get(name)
                .map(|value| (name.to_string(), value.as_str().to_string()))
        })
        .collect()
}

struct NatsHeaders<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

struct HeaderPairs<'a>(&'a mut Vec<(String, String)>);

impl Injector for HeaderPairs<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_string(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_headers_are_recognised_and_carried() {
        assert!(is_trace_header("traceparent"));
        assert!(is_trace_header("TraceState"));
        assert!(!is_trace_header("trace"));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        headers.insert("x-other", "1");
        assert_eq!(
            trace_headers(Some(&headers)),
            [(
                "traceparent".to_string(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string()
            )]
        );
        assert!(trace_headers(None).is_empty());
    }

    #[test]
    fn disabled_tracing_does_nothing() {
        let tracing = Tracing::disabled();
        assert!(!tracing.is_enabled());
        assert!(
            tracing
                .start_process(None, SystemTime::now(), "s")
                .is_none()
        );
        let mut headers = vec![("traceparent".to_string(), "kept".to_string())];
        tracing.inject(&Context::new(), &mut headers);
        assert_eq!(headers.len(), 1);
    }
}
