//! The Postgres side of state: every SQL statement of the data path.
//!
//! Arrays go in through `UNNEST`, so a batch costs a fixed number of round
//! trips whatever its size, and one transaction (one fsync) per batch.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use sqlx::{PgPool, Row};

use super::{BatchCommit, KeyEntries, StateError};
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

    let mut tx = pool.begin().await?;
    // The previous batch's outputs were published before this batch began.
    sqlx::query("DELETE FROM weir_outbox WHERE function_name = $1")
        .bind(function)
        .execute(&mut *tx)
        .await?;
    if !upsert_keys.is_empty() {
        sqlx::query(
            "INSERT INTO weir_state (function_name, key, name, value, updated_seq)
             SELECT $1, k, n, v, $5 FROM UNNEST($2::text[], $3::text[], $4::bytea[]) AS t(k, n, v)
             ON CONFLICT (function_name, key, name)
             DO UPDATE SET value = EXCLUDED.value, updated_seq = EXCLUDED.updated_seq",
        )
        .bind(function)
        .bind(&upsert_keys)
        .bind(&upsert_names)
        .bind(&upsert_values)
        .bind(highest)
        .execute(&mut *tx)
        .await?;
    }
    if !delete_keys.is_empty() {
        sqlx::query(
            "DELETE FROM weir_state WHERE function_name = $1
             AND (key, name) IN (SELECT * FROM UNNEST($2::text[], $3::text[]))",
        )
        .bind(function)
        .bind(&delete_keys)
        .bind(&delete_names)
        .execute(&mut *tx)
        .await?;
    }
    if !applied.is_empty() {
        sqlx::query(
            "INSERT INTO weir_applied (function_name, seq) SELECT $1, UNNEST($2::int8[])
             ON CONFLICT DO NOTHING",
        )
        .bind(function)
        .bind(&applied)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO weir_progress (function_name, applied_seq, batches) VALUES ($1, $2, 1)
             ON CONFLICT (function_name) DO UPDATE
             SET applied_seq = GREATEST(weir_progress.applied_seq, EXCLUDED.applied_seq),
                 batches = weir_progress.batches + 1,
                 updated_at = now()",
        )
        .bind(function)
        .bind(highest)
        .execute(&mut *tx)
        .await?;
    }
    if !commit.outbox.is_empty() {
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
        sqlx::query(
            "INSERT INTO weir_outbox (function_name, position, subject, payload, headers, msg_id)
             SELECT $1, * FROM UNNEST($2::int4[], $3::text[], $4::bytea[], $5::text[], $6::text[])",
        )
        .bind(function)
        .bind(&positions)
        .bind(&subjects)
        .bind(&payloads)
        .bind(&headers)
        .bind(&msg_ids)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

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

pub(super) async fn highest_applied(pool: &PgPool, function: &str) -> Result<u64, StateError> {
    let highest: Option<i64> =
        sqlx::query_scalar("SELECT applied_seq FROM weir_progress WHERE function_name = $1")
            .bind(function)
            .fetch_optional(pool)
            .await?;
    Ok(highest.unwrap_or(0).max(0) as u64)
}

pub(super) async fn outbox(pool: &PgPool, function: &str) -> Result<Vec<OutputRecord>, StateError> {
    let rows = sqlx::query(
        "SELECT position, subject, payload, headers, msg_id FROM weir_outbox
         WHERE function_name = $1 ORDER BY position",
    )
    .bind(function)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            let position: i32 = row.try_get(0)?;
            let headers: String = row.try_get(3)?;
            let headers =
                serde_json::from_str(&headers).map_err(|e| StateError::CorruptOutbox {
                    function: function.to_string(),
                    position,
                    reason: e.to_string(),
                })?;
            Ok(OutputRecord {
                subject: row.try_get(1)?,
                payload: Bytes::from(row.try_get::<Vec<u8>, _>(2)?),
                headers,
                msg_id: row.try_get(4)?,
            })
        })
        .collect()
}

pub(super) async fn clear_outbox(pool: &PgPool, function: &str) -> Result<(), StateError> {
    sqlx::query("DELETE FROM weir_outbox WHERE function_name = $1")
        .bind(function)
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
fn to_i64(sequence: u64) -> i64 {
    i64::try_from(sequence).unwrap_or(i64::MAX)
}
