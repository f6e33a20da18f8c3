//! Keyed state: what a guest reads and writes, cached with moka in front of
//! Postgres.
//!
//! A batch loads the committed entries of its keys ([`StateStore::view`]:
//! cache first, one query for the misses), runs against a [`BatchView`], and
//! commits the changes of its applied events in one transaction together with
//! their stream sequences and outputs ([`StateStore::commit`]). The cache holds
//! committed values only: it is updated after a commit succeeds and
//! invalidated for the batch's keys when one fails.

mod postgres;
mod view;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use moka::future::Cache;
use sqlx::PgPool;

pub use view::{BatchView, EntryChange, KeyDelta, KeyEntries};

use crate::output::OutputRecord;

/// Why state could not be read or committed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
    #[error("applying migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("outbox row {position} of `{function}` is corrupt: {reason}")]
    CorruptOutbox {
        function: String,
        position: i32,
        reason: String,
    },
}

/// Everything one batch commits at once.
#[derive(Debug, Default)]
pub struct BatchCommit {
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

type CacheKey = (Arc<str>, String);

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
            .weigher(|(function, key): &CacheKey, entries: &Arc<KeyEntries>| {
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
    pub async fn view(&self, function: &Arc<str>, keys: &[&str]) -> Result<BatchView, StateError> {
        let mut committed = HashMap::new();
        let mut missing = Vec::new();
        for &key in keys {
            if committed.contains_key(key) {
                continue;
            }
            match self.cache.get(&(function.clone(), key.to_string())).await {
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
                    .insert((function.clone(), key.clone()), entries.clone())
                    .await;
                committed.insert(key, entries);
            }
        }
        Ok(BatchView::new(committed))
    }

    /// Commits a batch in one transaction; the cache follows the outcome.
    pub async fn commit(
        &self,
        function: &Arc<str>,
        commit: &BatchCommit,
    ) -> Result<(), StateError> {
        match postgres::commit_batch(&self.pool, function, commit).await {
            Ok(()) => {
                for delta in &commit.deltas {
                    self.cache
                        .insert((function.clone(), delta.key.clone()), delta.entries.clone())
                        .await;
                }
                Ok(())
            }
            Err(error) => {
                // The transaction may or may not have reached the disk; only
                // Postgres knows now.
                for delta in &commit.deltas {
                    self.cache
                        .invalidate(&(function.clone(), delta.key.clone()))
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

    /// The highest stream sequence whose effect is committed; 0 if none.
    pub async fn highest_applied(&self, function: &str) -> Result<u64, StateError> {
        postgres::highest_applied(&self.pool, function).await
    }

    /// Outputs of a committed batch that may not have been published.
    pub async fn outbox(&self, function: &str) -> Result<Vec<OutputRecord>, StateError> {
        postgres::outbox(&self.pool, function).await
    }

    /// Forgets outputs that are published.
    pub async fn clear_outbox(&self, function: &str) -> Result<(), StateError> {
        postgres::clear_outbox(&self.pool, function).await
    }

    /// Forgets applied sequences at or below `ack_floor`: JetStream never
    /// redelivers those.
    pub async fn prune_applied(&self, function: &str, ack_floor: u64) -> Result<u64, StateError> {
        postgres::prune_applied(&self.pool, function, ack_floor).await
    }
}
