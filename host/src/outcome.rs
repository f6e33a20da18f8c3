//! The typed result of handling one event, shared by the stages that produce
//! it (ingest, sandbox) and the one that acts on it (ack).

use std::fmt;

/// Why an event was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The key or event time could not be extracted.
    BadEvent,
    /// The guest returned `error::retry`.
    GuestRetry,
    /// The guest returned `error::reject`.
    GuestReject,
    /// The guest trapped (panic, unreachable, bad memory access, ...).
    Trap,
    /// The invocation ran past its deadline.
    Timeout,
    /// The guest tried to grow its memory past the limit.
    OutOfMemory,
    /// The guest overflowed its stack.
    StackOverflow,
    /// The guest used a capability it was not granted (an undeclared output
    /// subject, an invalid header).
    Denied,
    /// The guest published more records or bytes in one call than its
    /// limits allow.
    OutputLimit,
    /// The guest stored a value, or a number of entries under one key, past
    /// its limits.
    StateLimit,
    /// The database or the broker refused the event's effects for good
    /// (data Postgres will not store, an output JetStream will not take).
    Refused,
    /// The event came past the allowed lateness of every window it falls
    /// in, and the function has no late-data subject.
    TooLate,
}

impl FailureKind {
    /// Whether delivering the event again may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            FailureKind::GuestRetry | FailureKind::Trap | FailureKind::Timeout
        )
    }

    /// Whether it says something about the function rather than the event:
    /// such failures feed the circuit breaker. A reject or an unreadable
    /// event is the event's fault.
    pub fn counts_against_function(self) -> bool {
        !matches!(
            self,
            FailureKind::GuestReject
                | FailureKind::BadEvent
                | FailureKind::Refused
                | FailureKind::TooLate
        )
    }

    /// The stable name used in headers, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::BadEvent => "bad-event",
            FailureKind::GuestRetry => "retry",
            FailureKind::GuestReject => "reject",
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::OutOfMemory => "out-of-memory",
            FailureKind::StackOverflow => "stack-overflow",
            FailureKind::Denied => "denied",
            FailureKind::OutputLimit => "output-limit",
            FailureKind::StateLimit => "state-limit",
            FailureKind::Refused => "refused",
            FailureKind::TooLate => "too-late",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event that was not applied, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// What became of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    /// The handler succeeded; its writes and outputs are part of the batch.
    Applied,
    /// A redelivery of an event whose effect is already committed.
    AlreadyApplied,
    /// The handler (or the host, before it) did not apply the event.
    Failed(Failure),
    /// Not run: the function's circuit breaker is open. Delivered again
    /// after `retry_after`, without spending an attempt.
    Deferred { retry_after: std::time::Duration },
}
