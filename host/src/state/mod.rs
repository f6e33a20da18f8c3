//! Keyed state: what a guest reads and writes, cached with moka in front of
//! Postgres.
//!
//! A batch loads the committed entries of its keys ([`StateStore::view`]:
//! cache first, one query for the misses), runs against a [`BatchView`], and
//! commits the changes of its applied events in one transaction together with
//! their stream sequences and outputs ([`StateStore::commit`]). The cache holds
//! committed values only: it is updated after a commit succeeds and
//! invalidated for the batch's keys when one fails.

mod owner;
mod postgres;
mod view;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use moka::future::Cache;
use sqlx::PgPool;

pub use owner::Claim;
pub use view::{BatchView, EntryChange, KeyDelta, KeyEntries};

/// What the names of the host's own entries in a window function's state
/// (and the key of its window bookkeeping) start with: its guests cannot
/// read, write or delete them, and they do not count against the guest's
/// entry limit.
pub const HOST_ENTRY_PREFIX: char = '\u{1}';

use crate::output::OutputRecord;

/// Why state could not be read or committed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
    #[error("applying migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "function `{function}` is owned by another host now (epoch {epoch} was fenced): this host stopped committing for it"
    )]
    Fenced { function: String, epoch: u64 },
    #[error("outbox row {position} of `{function}` is corrupt: {reason}")]
    CorruptOutbox {
        function: String,
        position: i32,
        reason: String,
    },
}

impl StateError {
    /// Whether trying again cannot help: the database refuses the data
    /// itself (a data exception such as U+0000 in text, or a value past a
    /// size limit), as opposed to an outage, a timeout or a conflict.
    pub fn is_permanent(&self) -> bool {
        match self {
            StateError::Database(sqlx::Error::Database(error)) => error
                .code()
                .is_some_and(|code| code.starts_with("22") || code.starts_with("54")),
            StateError::CorruptOutbox { .. } => true,
            _ => false,
        }
    }
}

/// A function's progress: what it has applied, in which stream, and the
/// incarnation that scopes its output ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub highest_applied: u64,
    /// The stream and its creation time (ns since the epoch), once known.
    pub stream: Option<(String, i64)>,
    /// Random per progress row; empty for rows older than incarnations.
    pub incarnation: String,
    /// The consumer's ack floor as last read.
    pub resume_seq: u64,
}

/// The outbox rows of one committed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxBatch {
    pub batch: u64,
    /// Its highest input sequence: once the ack floor passes it, the batch
    /// was published (inputs are acked only after their outputs).
    pub through_seq: u64,
    pub records: Vec<OutputRecord>,
}

/// Everything one batch commits at once.
#[derive(Debug, Default)]
pub struct BatchCommit {
    /// The owner epoch the commit is made under.
    pub epoch: u64,
    /// The outbox rows' batch id.
    pub batch_id: u64,
    /// The highest input sequence whose outputs are in the outbox rows.
    pub through_seq: u64,
    /// Earlier batches whose publish is acknowledged: their rows go.
    pub published: Vec<u64>,
    pub deltas: Vec<KeyDelta>,
    /// Stream sequences of the events whose writes are in `deltas`.
    pub applied: Vec<u64>,
    /// Outputs of the batch, published after the commit.
    pub outbox: Vec<OutputRecord>,
}

impl BatchCommit {
    /// The highest sequence this commit applies; 0 if none.
    pub fn highest_applied(&self) -> u64 {
        self.applied.iter().copied().max().unwrap_or(0)
    }
}

/// Cached entries are scoped to the owner epoch they were read or written
/// under: a host that regains a function after another owned it reads
/// Postgres again.
type CacheKey = (Arc<str>, u64, String);

/// The state backend shared by every function of a host.
#[derive(Clone)]
pub struct StateStore {
    pool: PgPool,
    cache: Cache<CacheKey, Arc<KeyEntries>>,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("cached_keys", &self.cache.entry_count())
            .finish_non_exhaustive()
    }
}

impl StateStore {
    /// Uses `pool`, after bringing its schema up to date.
    pub async fn open(pool: PgPool, cache_bytes: u64) -> Result<Self, StateError> {
        sqlx::migrate!("../migrations").run(&pool).await?;
        let cache = Cache::builder()
            .max_capacity(cache_bytes)
            .weigher(|(function, _, key): &CacheKey, entries: &Arc<KeyEntries>| {
                let size = function.len()
                    + key.len()
                    + entries
                        .iter()
                        .map(|(name, value)| name.len() + value.len() + 32)
                        .sum::<usize>();
                u32::try_from(size).unwrap_or(u32::MAX)
            })
            .build();
        Ok(Self { pool, cache })
    }

    /// Forgets every cached entry: after state was cleared behind the
    /// cache's back (a replay).
    pub fn forget_cached(&self) {
        self.cache.invalidate_all();
    }

    /// A view of the committed entries of `keys`.
    pub async fn view(
        &self,
        function: &Arc<str>,
        epoch: u64,
        keys: &[&str],
    ) -> Result<BatchView, StateError> {
        let mut committed = HashMap::new();
        let mut missing = Vec::new();
        for &key in keys {
            if committed.contains_key(key) {
                continue;
            }
            match self
                .cache
                .get(&(function.clone(), epoch, key.to_string()))
                .await
            {
                Some(entries) => {
                    committed.insert(key.to_string(), entries);
                }
                None => {
                    committed.insert(key.to_string(), Arc::new(KeyEntries::new()));
                    missing.push(key.to_string());
                }
            }
        }
        let hits = committed.len() - missing.len();
        metrics::counter!("weir_state_cache_hits_total", "function" => function.to_string())
            .increment(hits as u64);
        metrics::counter!("weir_state_cache_misses_total", "function" => function.to_string())
            .increment(missing.len() as u64);
        if !missing.is_empty() {
            let mut loaded = postgres::load_keys(&self.pool, function, &missing).await?;
            for key in missing {
                let entries = Arc::new(loaded.remove(&key).unwrap_or_default());
                self.cache
                    .insert((function.clone(), epoch, key.clone()), entries.clone())
                    .await;
                committed.insert(key, entries);
            }
        }
        Ok(BatchView::new(committed))
    }

    /// Commits a batch in one statement (one transaction) if `commit.epoch` still owns the
    /// function (extending its lease to `lease`); the cache follows the
    /// outcome.
    pub async fn commit(
        &self,
        function: &Arc<str>,
        commit: &BatchCommit,
        lease: std::time::Duration,
    ) -> Result<(), StateError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        match postgres::commit_batch(&self.pool, function, commit, lease_ms).await {
            Ok(()) => {
                for delta in &commit.deltas {
                    let key = (function.clone(), commit.epoch, delta.key.clone());
                    self.cache.insert(key, delta.entries.clone()).await;
                }
                Ok(())
            }
            Err(error) => {
                // The transaction may or may not have reached the disk; only
                // Postgres knows now.
                for delta in &commit.deltas {
                    self.cache
                        .invalidate(&(function.clone(), commit.epoch, delta.key.clone()))
                        .await;
                }
                Err(error)
            }
        }
    }

    /// Which of `sequences` already have their effect committed.
    pub async fn already_applied(
        &self,
        function: &str,
        sequences: &[u64],
    ) -> Result<HashSet<u64>, StateError> {
        if sequences.is_empty() {
            return Ok(HashSet::new());
        }
        postgres::applied_among(&self.pool, function, sequences).await
    }

    /// Claims `function` for `owner` for `lease`: the new owner epoch, or
    /// `None` while another owner's lease is live.
    pub async fn claim(
        &self,
        function: &str,
        owner: &str,
        lease: std::time::Duration,
    ) -> Result<Option<Claim>, StateError> {
        owner::claim(&self.pool, function, owner, millis(lease)).await
    }

    /// Extends the lease of `epoch`; false once another owner claimed.
    pub async fn renew(
        &self,
        function: &str,
        epoch: u64,
        lease: std::time::Duration,
    ) -> Result<bool, StateError> {
        owner::renew(&self.pool, function, epoch, millis(lease)).await
    }

    /// Gives up `epoch`'s ownership at a graceful stop.
    pub async fn release(&self, function: &str, epoch: u64) -> Result<(), StateError> {
        owner::release(&self.pool, function, epoch).await
    }

    /// The function's progress; a missing row is created with the new
    /// `incarnation` (the bool says so).
    pub async fn progress(
        &self,
        function: &str,
        incarnation: &str,
    ) -> Result<(Progress, bool), StateError> {
        postgres::progress(&self.pool, function, incarnation).await
    }

    /// Records the stream incarnation the function's progress counts in.
    pub async fn record_stream(
        &self,
        function: &str,
        stream: &str,
        created_ns: i64,
    ) -> Result<(), StateError> {
        postgres::record_stream(&self.pool, function, stream, created_ns).await
    }

    /// Records an ack floor read from the consumer.
    pub async fn record_resume(&self, function: &str, ack_floor: u64) -> Result<(), StateError> {
        postgres::record_resume(&self.pool, function, ack_floor).await
    }

    /// Committed outputs by batch, oldest first, that may not be published.
    pub async fn outbox(&self, function: &str) -> Result<Vec<OutboxBatch>, StateError> {
        postgres::outbox(&self.pool, function).await
    }

    /// Forgets the outbox rows of published `batches` (while `epoch` owns
    /// the function).
    pub async fn delete_outbox(
        &self,
        function: &str,
        epoch: u64,
        batches: &[u64],
    ) -> Result<(), StateError> {
        if batches.is_empty() {
            return Ok(());
        }
        postgres::delete_outbox(&self.pool, function, epoch, batches).await
    }

    /// Forgets applied sequences at or below `ack_floor`: JetStream never
    /// redelivers those.
    pub async fn prune_applied(&self, function: &str, ack_floor: u64) -> Result<u64, StateError> {
        postgres::prune_applied(&self.pool, function, ack_floor).await
    }
}

fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
