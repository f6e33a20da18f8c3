//! The start-up steps that talk to NATS and Postgres before any function
//! runs, and how each one fails: an outage (the broker restarting or
//! unreachable, the database down) is waited out, saying what the host
//! waits for; a misconfiguration (a stream bound to subjects another stream
//! has, an output no stream captures, a function bound to a stream that is
//! not there) stops the start at once with an error that says what to fix.

use std::time::Duration;

use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamByNameErrorKind};
use async_nats::jetstream::{self, ErrorCode, stream};
use tokio_util::sync::CancellationToken;

use super::ServeError;
use crate::config::{FunctionSpec, StreamSpec};
use crate::ingest::Ingest;

/// How a start-up step failed.
#[derive(Debug)]
pub enum StepFailure {
    /// The broker or database cannot answer now; the step is tried again.
    Outage(String),
    /// Trying again would not help.
    Refused(ServeError),
}

impl From<StepFailure> for ServeError {
    fn from(failure: StepFailure) -> Self {
        match failure {
            StepFailure::Outage(reason) => ServeError::Unavailable { reason },
            StepFailure::Refused(error) => error,
        }
    }
}

/// First wait between attempts of a step that met an outage; it doubles up
/// to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Runs `step` until it succeeds or is refused, waiting out outages with a
/// warning that names `what`. `Ok(None)`: shut down while waiting.
pub(super) async fn retry_outages<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    step: F,
) -> Result<Option<T>, ServeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StepFailure>>,
{
    retry(&format!("NATS to {what}"), shutdown, step).await
}

/// The one backoff loop of start-up: `step` until it succeeds or is
/// refused, saying while it waits what for (`waiting for {waits_for}`).
async fn retry<T, F, Fut>(
    waits_for: &str,
    shutdown: &CancellationToken,
    mut step: F,
) -> Result<Option<T>, ServeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StepFailure>>,
{
    let mut delay = FIRST_RETRY_DELAY;
    loop {
        match step().await {
            Ok(done) => return Ok(Some(done)),
            Err(StepFailure::Refused(error)) => return Err(error),
            Err(StepFailure::Outage(reason)) => {
                tracing::warn!(error = %reason, "waiting for {waits_for}");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Whether a JetStream API error is the server saying "not now" (its
/// JetStream still starting after a restart) rather than "no".
fn is_unavailable(error: &jetstream::Error) -> bool {
    error.error_code() == ErrorCode::CLUSTER_NOT_AVAILABLE
}

fn classify_create(name: &str, error: jetstream::context::CreateStreamError) -> StepFailure {
    let outage = match error.kind() {
        CreateStreamErrorKind::TimedOut
        | CreateStreamErrorKind::JetStreamUnavailable
        | CreateStreamErrorKind::Response
        | CreateStreamErrorKind::ResponseParse => true,
        CreateStreamErrorKind::JetStream(api) => is_unavailable(&api),
        _ => false,
    };
    if outage {
        StepFailure::Outage(format!("stream `{name}`: {error}"))
    } else {
        StepFailure::Refused(ServeError::Stream {
            stream: name.to_string(),
            reason: error.to_string(),
        })
    }
}

/// Makes sure a configured stream exists (made if missing).
pub(super) async fn ensure_stream(
    js: &jetstream::Context,
    spec: &StreamSpec,
) -> Result<(), StepFailure> {
    js.get_or_create_stream(stream::Config {
        name: spec.name.clone(),
        subjects: spec.subjects.clone(),
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(spec.duplicate_window_secs),
        ..Default::default()
    })
    .await
    .map(|_| ())
    .map_err(|e| classify_create(&spec.name, e))
}

/// The stream that keeps guest log lines for `weir fn logs`: bounded by age
/// and size, oldest lines dropped first.
pub(super) async fn ensure_log_stream(
    js: &jetstream::Context,
    config: &crate::config::GuestLogConfig,
) -> Result<(), StepFailure> {
    let name = crate::guest_logs::LOG_STREAM;
    js.get_or_create_stream(stream::Config {
        name: name.to_string(),
        subjects: vec![format!("{}.>", config.subject_prefix)],
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(config.retention_secs),
        max_bytes: config.max_bytes,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    })
    .await
    .map(|_| ())
    .map_err(|e| classify_create(name, e))
}

/// Checks that every subject `spec` publishes to (its outputs and its
/// late-data subject) is captured by a stream (a wildcard one whole, by one
/// stream), and that the stream it reads exists: outputs that could never
/// be stored, or a binding to a stream that is not there, are refused.
pub async fn check_bindings(
    js: &jetstream::Context,
    spec: &FunctionSpec,
) -> Result<(), StepFailure> {
    let publishes = spec.publishes();
    for subject in publishes.iter().filter(|s| !s.contains(['*', '>'])) {
        if let Err(error) = js.stream_by_subject(subject.as_str()).await {
            return Err(match error.kind() {
                GetStreamByNameErrorKind::NotFound => {
                    StepFailure::Refused(ServeError::OutputNotCaptured {
                        function: spec.name.clone(),
                        subject: subject.clone(),
                    })
                }
                GetStreamByNameErrorKind::JetStream(api) if !is_unavailable(&api) => {
                    StepFailure::Refused(ServeError::Stream {
                        stream: subject.clone(),
                        reason: error.to_string(),
                    })
                }
                _ => StepFailure::Outage(format!("output `{subject}`: {error}")),
            });
        }
    }
    // Wildcard outputs: captured whole by one stream's subjects.
    let wildcards: Vec<String> = publishes
        .iter()
        .filter(|s| s.contains(['*', '>']))
        .cloned()
        .collect();
    if !wildcards.is_empty() {
        let captured = crate::output::stream_subjects(js)
            .await
            .map_err(|reason| StepFailure::Outage(format!("listing streams: {reason}")))?;
        if let Some(output) = crate::output::uncaptured(&wildcards, &captured) {
            return Err(StepFailure::Refused(ServeError::OutputNotCaptured {
                function: spec.name.clone(),
                subject: output.clone(),
            }));
        }
    }
    Ingest::check_stream(js, spec).await.map_err(|error| {
        if error.is_outage() {
            StepFailure::Outage(error.to_string())
        } else {
            StepFailure::Refused(error.into())
        }
    })
}

/// Calls `connect` until it succeeds, saying what it waits for; `None` if
/// shut down first. Every failure to connect is an outage here.
pub(super) async fn wait_for<T, E, F, Fut>(
    what: &str,
    url: &str,
    shutdown: &CancellationToken,
    mut connect: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let waits_for = format!("{what} at {}", redact(url));
    let connected = retry(&waits_for, shutdown, || {
        let attempt = connect();
        async move {
            attempt
                .await
                .map_err(|e| StepFailure::Outage(e.to_string()))
        }
    });
    connected.await.ok().flatten()
}

/// Whether connecting failed because the database does not exist.
pub(super) fn is_missing_database(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("3D000"))
}

/// Creates the database `url` names, from the server's `postgres` database.
pub(super) async fn create_database(url: &str) -> Result<(), sqlx::Error> {
    use sqlx::ConnectOptions;
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let name = options.get_database().unwrap_or_default().to_string();
    let mut admin = options.database("postgres").connect().await?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
        .execute(&mut admin)
        .await?;
    tracing::info!(database = %name, "created the database, which did not exist");
    Ok(())
}

/// `url` without a password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_logged() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }

    #[tokio::test]
    async fn outages_are_waited_out_and_refusals_are_not() {
        let shutdown = CancellationToken::new();
        let mut attempts = 0;
        let done = retry_outages("test", &shutdown, || {
            attempts += 1;
            let attempt = attempts;
            async move {
                if attempt < 3 {
                    Err(StepFailure::Outage("restarting".into()))
                } else {
                    Ok(attempt)
                }
            }
        })
        .await;
        assert!(matches!(done, Ok(Some(3))));

        let mut attempts = 0;
        let refused = retry_outages("test", &shutdown, || {
            attempts += 1;
            async {
                Err::<(), _>(StepFailure::Refused(ServeError::Stream {
                    stream: "S".into(),
                    reason: "subjects overlap".into(),
                }))
            }
        })
        .await;
        assert!(matches!(refused, Err(ServeError::Stream { .. })));
        assert_eq!(attempts, 1, "a refusal is not tried again");

        shutdown.cancel();
        let stopped = retry_outages("test", &shutdown, || async {
            Err::<(), _>(StepFailure::Outage("down".into()))
        })
        .await;
        assert!(matches!(stopped, Ok(None)));
    }
}
