//! Ownership of a function's state: one owner per (function, partition),
//! fenced by an epoch.
//!
//! A host claims the row when no live owner holds it (its lease has lapsed,
//! or it is the same host) and gets a new epoch. Every commit updates the
//! row only if the epoch is still its own ([`super::postgres::commit_batch`]),
//! in the same statement, so a paused or partitioned owner's commit fails
//! once another host has claimed, and that owner stops.

use sqlx::PgPool;

use super::StateError;

/// The only partition until functions are partitioned across hosts.
pub const PARTITION: i32 = 0;

/// A claim that succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub epoch: u64,
    /// The previous owner released the function (a graceful stop: it handed
    /// its events back), or there was none. Otherwise it stopped renewing
    /// with events in hand (killed, paused, cut off).
    pub clean: bool,
}

/// A released lease: lapsed, and marks a clean hand-over.
const RELEASED: &str = "-infinity";

/// Claims `function` for `owner` for `lease_ms`; `None` while another
/// owner's lease is live.
pub(super) async fn claim(
    pool: &PgPool,
    function: &str,
    owner: &str,
    lease_ms: i64,
) -> Result<Option<Claim>, StateError> {
    // The CTE reads the row as it was before this statement changed it.
    let claimed: Option<(i64, bool)> = sqlx::query_as(
        "WITH previous AS (
             SELECT lease_until = '-infinity'::timestamptz AS released FROM weir_owners
             WHERE function_name = $1 AND partition = $2)
         INSERT INTO weir_owners (function_name, partition, epoch, owner, lease_until)
         VALUES ($1, $2, 1, $3, now() + $4 * interval '1 millisecond')
         ON CONFLICT (function_name, partition) DO UPDATE
         SET epoch = weir_owners.epoch + 1, owner = EXCLUDED.owner,
             lease_until = EXCLUDED.lease_until
         WHERE weir_owners.lease_until < now() OR weir_owners.owner = EXCLUDED.owner
         RETURNING epoch, COALESCE((SELECT released FROM previous), true)",
    )
    .bind(function)
    .bind(PARTITION)
    .bind(owner)
    .bind(lease_ms)
    .fetch_optional(pool)
    .await?;
    Ok(claimed.map(|(epoch, clean)| Claim {
        epoch: epoch.max(0) as u64,
        clean,
    }))
}

/// Extends the lease of `epoch`; false if another owner has claimed since.
pub(super) async fn renew(
    pool: &PgPool,
    function: &str,
    epoch: u64,
    lease_ms: i64,
) -> Result<bool, StateError> {
    let done = sqlx::query(
        "UPDATE weir_owners SET lease_until = now() + $4 * interval '1 millisecond'
         WHERE function_name = $1 AND partition = $2 AND epoch = $3",
    )
    .bind(function)
    .bind(PARTITION)
    .bind(super::postgres::to_i64(epoch))
    .bind(lease_ms)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives the function up at a graceful stop, so a standby takes over at
/// once instead of after the lease, and knows the events were handed back.
pub(super) async fn release(pool: &PgPool, function: &str, epoch: u64) -> Result<(), StateError> {
    sqlx::query(
        "UPDATE weir_owners SET lease_until = $4::timestamptz
         WHERE function_name = $1 AND partition = $2 AND epoch = $3",
    )
    .bind(function)
    .bind(PARTITION)
    .bind(super::postgres::to_i64(epoch))
    .bind(RELEASED)
    .execute(pool)
    .await?;
    Ok(())
}
