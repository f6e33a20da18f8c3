//! [`Error`]: how a handler says it did not finish an event.
//!
//! The two cases mirror the WIT `error` variant: the host redelivers a `Retry` after a
//! back-off and sends a `Reject` straight to the dead-letter subject.

use std::fmt;

/// Why a handler did not finish an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A passing failure: the host backs off and delivers the event again.
    Retry(String),
    /// The event can never succeed: the host dead-letters it with this reason.
    Reject(String),
}

impl Error {
    /// A passing failure; the host delivers the event again later.
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry(reason.into())
    }

    /// A permanent failure; the host dead-letters the event.
    pub fn reject(reason: impl Into<String>) -> Self {
        Self::Reject(reason.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retry(reason) => write!(f, "retry: {reason}"),
            Self::Reject(reason) => write!(f, "reject: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn constructors_and_display() {
        assert_eq!(Error::retry("busy"), Error::Retry("busy".to_owned()));
        assert_eq!(Error::reject("bad").to_string(), "reject: bad");
        assert_eq!(
            Error::retry(String::from("busy")).to_string(),
            "retry: busy"
        );
    }
}
