//! A deployed function's guest log lines and dead letters, read from
//! JetStream by the API on a caller's behalf: with a token for the
//! function's namespace, not with NATS credentials that could read every
//! tenant's. Each call returns what is kept after a stream sequence (or a
//! time), up to a limit, and the last sequence read, so a client follows by
//! asking again from there.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::api::{ApiError, ApiState, caller};
use super::auth::Role;
use super::openapi::Refused;

/// Most records one call returns.
const MAX_LIMIT: usize = 10_000;
/// How long a read waits for the next record before taking what it has as
/// everything kept.
const CAUGHT_UP_WAIT: Duration = Duration::from_millis(500);

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ReadQuery {
    /// Only records after this stream sequence.
    after_seq: Option<u64>,
    /// Only records stored at or after this time (ms since the Unix epoch).
    since_ms: Option<i64>,
    /// At most this many (default 1,000, at most 10,000).
    #[param(minimum = 1, maximum = 10_000)]
    limit: Option<usize>,
}

/// One kept record.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Record {
    /// Its sequence in the stream: ask again with `after_seq` to follow.
    seq: u64,
    headers: BTreeMap<String, String>,
    /// The payload as text when it is UTF-8 (log lines, most dead letters)…
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    /// …else as hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_hex: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Records {
    records: Vec<Record>,
    /// The last sequence read (`after_seq` when nothing was).
    last_seq: u64,
}

/// `GET .../functions/{name}/logs`: the function's guest log lines.
#[utoipa::path(get, path = "/v1/namespaces/{namespace}/functions/{name}/logs", tag = "functions",
    summary = "The function's guest log lines kept; ask again from `last_seq` to follow",
    description = "Needs a token with the `read` role in the namespace.",
    params(super::openapi::FunctionPath, ReadQuery),
    responses(
        (status = 200, description = "Log lines", body = Records),
        (status = 404, description = "No such function", body = super::openapi::ErrorBody),
        Refused,
    ),
    security(("bearer" = [])))]
pub(super) async fn logs(
    state: State<ApiState>,
    headers: HeaderMap,
    path: Path<(String, String)>,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Records>, ApiError> {
    let prefix = state.log_prefix.clone();
    read(
        state,
        headers,
        path,
        query,
        crate::guest_logs::LOG_STREAM,
        &prefix,
    )
    .await
}

/// `GET .../functions/{name}/dead-letters`: the function's dead letters,
/// with the headers saying why.
#[utoipa::path(get, path = "/v1/namespaces/{namespace}/functions/{name}/dead-letters", tag = "functions",
    summary = "The function's dead letters kept, with the headers saying why",
    description = "Needs a token with the `read` role in the namespace.",
    params(super::openapi::FunctionPath, ReadQuery),
    responses(
        (status = 200, description = "Dead letters", body = Records),
        (status = 404, description = "No such function", body = super::openapi::ErrorBody),
        Refused,
    ),
    security(("bearer" = [])))]
pub(super) async fn dead_letters(
    state: State<ApiState>,
    headers: HeaderMap,
    path: Path<(String, String)>,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Records>, ApiError> {
    let prefix = state.dead_letter_prefix.clone();
    read(
        state,
        headers,
        path,
        query,
        crate::serve::DEAD_LETTER_STREAM,
        &prefix,
    )
    .await
}

async fn read(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
    stream: &str,
    prefix: &str,
) -> Result<Json<Records>, ApiError> {
    caller(&state, &headers)
        .await?
        .require(&namespace, Role::Read)?;
    super::api::names(&namespace, &name)?;
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_query",
            e.body_text(),
        )
    })?;
    // Only deployed functions of the namespace: a configured function
    // whose name happens to read `<namespace>_<name>` is not the
    // namespace's.
    if state.store.get_function(&namespace, &name).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no function `{name}` in namespace `{namespace}`"),
        ));
    }
    let limit = query.limit.unwrap_or(1_000).clamp(1, MAX_LIMIT);
    let subject = crate::config::deployed_record_subject(prefix, &namespace, &name);
    let deliver_policy = match (query.after_seq, query.since_ms) {
        (Some(after), _) => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: after.saturating_add(1),
        },
        (None, Some(ms)) => consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_query",
                        "since_ms is out of range",
                    )
                })?,
        },
        (None, None) => consumer::DeliverPolicy::All,
    };
    let unavailable = |error: &dyn std::fmt::Display| ApiError::unavailable("NATS", error);
    let records = match state.js.get_stream(stream).await {
        Ok(stream) => collect(&stream, subject, deliver_policy, limit)
            .await
            .map_err(|e| unavailable(&e))?,
        // Nothing was ever kept: no host has made the stream yet.
        Err(error) if error.to_string().contains("not found") => Vec::new(),
        Err(error) => return Err(unavailable(&error)),
    };
    let last_seq = records
        .last()
        .map_or(query.after_seq.unwrap_or(0), |r| r.seq);
    Ok(Json(Records { records, last_seq }))
}

/// Up to `limit` records of `subject` from `stream`, read with an ordered
/// consumer that goes away with the call.
async fn collect(
    stream: &jetstream::stream::Stream,
    subject: String,
    deliver_policy: consumer::DeliverPolicy,
    limit: usize,
) -> Result<Vec<Record>, String> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let mut records = Vec::new();
    while records.len() < limit {
        let Ok(Some(message)) = tokio::time::timeout(CAUGHT_UP_WAIT, messages.next()).await else {
            break;
        };
        let message = message.map_err(|e| e.to_string())?;
        let Ok(info) = message.info() else { continue };
        let (seq, pending) = (info.stream_sequence, info.pending);
        let headers = message
            .headers
            .iter()
            .flat_map(|headers| headers.iter())
            .map(|(name, values)| {
                let value = values
                    .iter()
                    .map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                (name.to_string(), value)
            })
            .collect();
        let (payload, payload_hex) = match std::str::from_utf8(&message.payload) {
            Ok(text) => (Some(text.to_string()), None),
            Err(_) => (None, Some(hex::encode(&message.payload))),
        };
        records.push(Record {
            seq,
            headers,
            payload,
            payload_hex,
        });
        if pending == 0 {
            break;
        }
    }
    Ok(records)
}
