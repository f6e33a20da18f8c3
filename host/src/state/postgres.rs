//! The Postgres side of state: every SQL statement of the data path.
//!
//! Arrays go in through `UNNEST`, so a batch costs a fixed number of round
//! trips whatever its size, and one transaction (one fsync) per batch.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use sqlx::{PgPool, Row};

use super::{BatchCommit, KeyEntries, OutboxBatch, Progress, StateError};
use crate::output::OutputRecord;

pub(super) async fn load_keys(
    pool: &PgPool,
    function: &str,
    keys: &[String],
) -> Result<HashMap<String, KeyEntries>, StateError> {
    let rows = sqlx::query(
        "SELECT key, name, value FROM weir_state WHERE function_name = $1 AND key = ANY($2)",
    )
    .bind(function)
    .bind(keys)
    .fetch_all(pool)
    .await?;
    let mut loaded: HashMap<String, KeyEntries> = HashMap::new();
    for row in rows {
        let key: String = row.try_get(0)?;
        let name: String = row.try_get(1)?;
        let value: Vec<u8> = row.try_get(2)?;
        loaded
            .entry(key)
            .or_default()
            .insert(name, Bytes::from(value));
    }
    Ok(loaded)
}

pub(super) async fn commit_batch(
    pool: &PgPool,
    function: &str,
    commit: &BatchCommit,
    lease_ms: i64,
) -> Result<(), StateError> {
    let highest = to_i64(commit.highest_applied());
    let mut upsert_keys = Vec::new();
    let mut upsert_names = Vec::new();
    let mut upsert_values: Vec<&[u8]> = Vec::new();
    let mut delete_keys = Vec::new();
    let mut delete_names = Vec::new();
    for delta in &commit.deltas {
        for (name, change) in &delta.changes {
            match change {
                Some(value) => {
                    upsert_keys.push(delta.key.as_str());
                    upsert_names.push(name.as_str());
                    upsert_values.push(value.as_ref());
                }
                None => {
                    delete_keys.push(delta.key.as_str());
                    delete_names.push(name.as_str());
                }
            }
        }
    }
    let applied: Vec<i64> = commit.applied.iter().map(|s| to_i64(*s)).collect();

    let positions: Vec<i32> = (0..commit.outbox.len())
        .map(|i| i32::try_from(i).unwrap_or(i32::MAX))
        .collect();
    let subjects: Vec<&str> = commit.outbox.iter().map(|o| o.subject.as_str()).collect();
    let payloads: Vec<&[u8]> = commit.outbox.iter().map(|o| o.payload.as_ref()).collect();
    let headers: Vec<String> = commit
        .outbox
        .iter()
        .map(|o| serde_json::to_string(&o.headers).unwrap_or_else(|_| "[]".into()))
        .collect();
    let msg_ids: Vec<&str> = commit.outbox.iter().map(|o| o.msg_id.as_str()).collect();
    let published: Vec<i64> = commit.published.iter().map(|b| to_i64(*b)).collect();

    let owned: i64 = sqlx::query_scalar(COMMIT_BATCH)
        .bind(function)
        .bind(super::owner::PARTITION)
        .bind(to_i64(commit.epoch))
        .bind(lease_ms)
        .bind(&published)
        .bind(&upsert_keys)
        .bind(&upsert_names)
        .bind(&upsert_values)
        .bind(highest)
        .bind(&delete_keys)
        .bind(&delete_names)
        .bind(&applied)
        .bind(to_i64(commit.batch_id))
        .bind(to_i64(commit.through_seq))
        .bind(&positions)
        .bind(&subjects)
        .bind(&payloads)
        .bind(&headers)
        .bind(&msg_ids)
        .fetch_one(pool)
        .await?;
    if owned == 1 {
        Ok(())
    } else {
        Err(StateError::Fenced {
            function: function.to_string(),
            epoch: commit.epoch,
        })
    }
}

/// A batch's commit as one statement, so one round trip (and one fsync):
/// every write is conditional on the owner epoch (`fence`), whose row lock
/// orders the commit against a concurrent claim. Under a lost epoch nothing
/// is written and the statement returns 0. A commit retried after an
/// ambiguous failure writes the same rows (the inserts do nothing twice).
/// The sub-statements touch disjoint rows: one delta per (key, name), and
/// the outbox rows deleted are of earlier batches than the ones inserted.
const COMMIT_BATCH: &str = "
WITH fence AS (
    UPDATE weir_owners
    SET lease_until = GREATEST(lease_until, now() + $4::int8 * interval '1 millisecond')
    WHERE function_name = $1::text AND partition = $2::int4 AND epoch = $3::int8
    RETURNING 1
), published AS (
    DELETE FROM weir_outbox
    WHERE function_name = $1 AND batch = ANY($5::int8[]) AND EXISTS (SELECT 1 FROM fence)
), upserted AS (
    INSERT INTO weir_state (function_name, key, name, value, updated_seq)
    SELECT $1, k, n, v, $9::int8 FROM UNNEST($6::text[], $7::text[], $8::bytea[]) AS t(k, n, v)
    WHERE EXISTS (SELECT 1 FROM fence)
    ON CONFLICT (function_name, key, name)
    DO UPDATE SET value = EXCLUDED.value, updated_seq = EXCLUDED.updated_seq
), deleted AS (
    DELETE FROM weir_state
    WHERE function_name = $1
      AND (key, name) IN (SELECT * FROM UNNEST($10::text[], $11::text[]))
      AND EXISTS (SELECT 1 FROM fence)
), applied AS (
    INSERT INTO weir_applied (function_name, seq)
    SELECT $1, s FROM UNNEST($12::int8[]) AS s
    WHERE EXISTS (SELECT 1 FROM fence)
    ON CONFLICT DO NOTHING
), progress AS (
    INSERT INTO weir_progress (function_name, applied_seq, batches)
    SELECT $1, $9::int8, 1 WHERE cardinality($12::int8[]) > 0 AND EXISTS (SELECT 1 FROM fence)
    ON CONFLICT (function_name) DO UPDATE
    SET applied_seq = GREATEST(weir_progress.applied_seq, EXCLUDED.applied_seq),
        batches = weir_progress.batches + 1,
        updated_at = now()
), outbox AS (
    INSERT INTO weir_outbox
        (function_name, batch, through_seq, position, subject, payload, headers, msg_id)
    SELECT $1, $13::int8, $14::int8, p, s, pl, h, m
    FROM UNNEST($15::int4[], $16::text[], $17::bytea[], $18::text[], $19::text[]) AS t(p, s, pl, h, m)
    WHERE EXISTS (SELECT 1 FROM fence)
    ON CONFLICT DO NOTHING
)
SELECT count(*) FROM fence";

pub(super) async fn applied_among(
    pool: &PgPool,
    function: &str,
    sequences: &[u64],
) -> Result<HashSet<u64>, StateError> {
    let sequences: Vec<i64> = sequences.iter().map(|s| to_i64(*s)).collect();
    let rows =
        sqlx::query("SELECT seq FROM weir_applied WHERE function_name = $1 AND seq = ANY($2)")
            .bind(function)
            .bind(&sequences)
            .fetch_all(pool)
            .await?;
    rows.iter()
        .map(|row| Ok(row.try_get::<i64, _>(0)?.max(0) as u64))
        .collect()
}

pub(super) async fn outbox(pool: &PgPool, function: &str) -> Result<Vec<OutboxBatch>, StateError> {
    let rows = sqlx::query(
        "SELECT batch, position, subject, payload, headers, msg_id, through_seq FROM weir_outbox
         WHERE function_name = $1 ORDER BY batch, position",
    )
    .bind(function)
    .fetch_all(pool)
    .await?;
    let mut batches: Vec<OutboxBatch> = Vec::new();
    for row in &rows {
        let batch = row.try_get::<i64, _>(0)?.max(0) as u64;
        let through_seq = row.try_get::<i64, _>(6)?.max(0) as u64;
        let position: i32 = row.try_get(1)?;
        let headers: String = row.try_get(4)?;
        let headers = serde_json::from_str(&headers).map_err(|e| StateError::CorruptOutbox {
            function: function.to_string(),
            position,
            reason: e.to_string(),
        })?;
        let record = OutputRecord {
            subject: row.try_get(2)?,
            payload: Bytes::from(row.try_get::<Vec<u8>, _>(3)?),
            headers,
            msg_id: row.try_get(5)?,
        };
        match batches.last_mut() {
            Some(last) if last.batch == batch => last.records.push(record),
            _ => batches.push(OutboxBatch {
                batch,
                through_seq,
                records: vec![record],
            }),
        }
    }
    Ok(batches)
}

/// Deletes the outbox rows of `batches`: their publish is acknowledged.
/// Only while `epoch` owns the function.
pub(super) async fn delete_outbox(
    pool: &PgPool,
    function: &str,
    epoch: u64,
    batches: &[u64],
) -> Result<(), StateError> {
    let batches: Vec<i64> = batches.iter().map(|b| to_i64(*b)).collect();
    sqlx::query(
        "DELETE FROM weir_outbox WHERE function_name = $1 AND batch = ANY($2)
         AND EXISTS (SELECT 1 FROM weir_owners
                     WHERE function_name = $1 AND partition = $3 AND epoch = $4)",
    )
    .bind(function)
    .bind(&batches)
    .bind(super::owner::PARTITION)
    .bind(to_i64(epoch))
    .execute(pool)
    .await?;
    Ok(())
}

/// A function's progress row: where its applied sequences count, and
/// under which incarnation. Created (with a new incarnation) if missing;
/// the bool says whether it was.
pub(super) async fn progress(
    pool: &PgPool,
    function: &str,
    incarnation: &str,
) -> Result<(Progress, bool), StateError> {
    let created = sqlx::query(
        "INSERT INTO weir_progress (function_name, applied_seq, batches, incarnation)
         VALUES ($1, 0, 0, $2) ON CONFLICT DO NOTHING",
    )
    .bind(function)
    .bind(incarnation)
    .execute(pool)
    .await?
    .rows_affected()
        == 1;
    let row = sqlx::query(
        "SELECT applied_seq, stream, stream_created_ns, incarnation, resume_seq
         FROM weir_progress WHERE function_name = $1",
    )
    .bind(function)
    .fetch_one(pool)
    .await?;
    let stream: Option<String> = row.try_get(1)?;
    let created_ns: Option<i64> = row.try_get(2)?;
    let progress = Progress {
        highest_applied: row.try_get::<i64, _>(0)?.max(0) as u64,
        stream: stream.zip(created_ns),
        incarnation: row.try_get(3)?,
        resume_seq: row.try_get::<i64, _>(4)?.max(0) as u64,
    };
    Ok((progress, created))
}

/// Records which stream incarnation the progress counts in.
pub(super) async fn record_stream(
    pool: &PgPool,
    function: &str,
    stream: &str,
    created_ns: i64,
) -> Result<(), StateError> {
    sqlx::query(
        "UPDATE weir_progress SET stream = $2, stream_created_ns = $3 WHERE function_name = $1",
    )
    .bind(function)
    .bind(stream)
    .bind(created_ns)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records an ack floor: a lost consumer is recreated just above it.
pub(super) async fn record_resume(
    pool: &PgPool,
    function: &str,
    ack_floor: u64,
) -> Result<(), StateError> {
    sqlx::query(
        "UPDATE weir_progress SET resume_seq = GREATEST(resume_seq, $2) WHERE function_name = $1",
    )
    .bind(function)
    .bind(to_i64(ack_floor))
    .execute(pool)
    .await?;
    Ok(())
}

pub(super) async fn prune_applied(
    pool: &PgPool,
    function: &str,
    ack_floor: u64,
) -> Result<u64, StateError> {
    let done = sqlx::query("DELETE FROM weir_applied WHERE function_name = $1 AND seq <= $2")
        .bind(function)
        .bind(to_i64(ack_floor))
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// Stream sequences are u64 on the wire and BIGINT in Postgres; a stream
/// would need 2^63 messages to overflow.
pub(super) fn to_i64(sequence: u64) -> i64 {
    i64::try_from(sequence).unwrap_or(i64::MAX)
}
