//! Functions, versions and rollouts in Postgres: what the API writes and
//! every host reads. Each change is announced on the [`CONTROL_CHANNEL`]
//! channel (in the same transaction), so hosts follow it at once.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};

use crate::breaker::BreakerConfig;
use crate::config::{FunctionSpec, KeySource, Limits, RetryPolicy, TimeSource};

/// The Postgres channel hosts LISTEN on.
pub const CONTROL_CHANNEL: &str = "weir_control";

/// A function's binding as the API takes it: everything but its name and
/// its module, which come from the URL and from each version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub stream: String,
    pub subject: String,
    pub key: KeySource,
    #[serde(default)]
    pub event_time: TimeSource,
    #[serde(default)]
    pub outputs: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default)]
    pub breaker: BreakerConfig,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10_000)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    #[schema(minimum = 100, maximum = 86_400_000)]
    pub ack_wait_ms: Option<u64>,
    /// Event-time windows, for a component of a `weir:window` world.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<crate::windows::WindowSettings>,
}

impl Binding {
    /// Every subject it publishes to: its outputs and its late-data
    /// subject.
    pub fn publishes(&self) -> Vec<String> {
        crate::config::published_subjects(&self.outputs, self.window.as_ref())
    }

    /// The host's view of this binding of function `name` of `namespace`.
    pub fn to_spec(&self, namespace: &str, name: &str) -> FunctionSpec {
        let defaults = FunctionSpec::new(
            runtime_name(namespace, name),
            PathBuf::new(),
            self.stream.clone(),
            self.subject.clone(),
            self.key.clone(),
        );
        FunctionSpec {
            event_time: self.event_time.clone(),
            outputs: self.outputs.clone(),
            limits: self.limits.clone(),
            retry: self.retry.clone(),
            breaker: self.breaker.clone(),
            batch_size: self.batch_size.unwrap_or(defaults.batch_size),
            ack_wait_ms: self.ack_wait_ms.unwrap_or(defaults.ack_wait_ms),
            window: self.window.clone(),
            deployed_as: Some((namespace.to_string(), name.to_string())),
            ..defaults
        }
    }
}

/// The name a deployed function runs under on the hosts (its durable
/// consumer and its state): namespace names have no `_`, so this is
/// unambiguous.
pub fn runtime_name(namespace: &str, name: &str) -> String {
    format!("{namespace}_{name}")
}

/// Where a replaying version starts reading its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ReplayFrom {
    /// A stream sequence.
    Sequence(u64),
    /// A time, in milliseconds since the Unix epoch.
    TimeMs(i64),
}

/// One version of a function.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct VersionRecord {
    pub version: i32,
    pub module: String,
    pub binding: Binding,
    /// Set for a version made to reprocess the stream from a position.
    pub replay_from: Option<ReplayFrom>,
    /// Whether that replay has started.
    pub replayed: bool,
}

fn replay_from(sequence: Option<i64>, time_ms: Option<i64>) -> Option<ReplayFrom> {
    match (sequence, time_ms) {
        (Some(sequence), _) => Some(ReplayFrom::Sequence(u64::try_from(sequence).unwrap_or(0))),
        (None, Some(ms)) => Some(ReplayFrom::TimeMs(ms)),
        (None, None) => None,
    }
}

/// Which versions serve a function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Takes every event the canary does not.
    pub stable: i32,
    /// Takes the keys whose hash falls below `weight` %.
    #[serde(default)]
    pub canary: Option<i32>,
    #[serde(default)]
    #[schema(maximum = 100)]
    pub weight: u8,
    /// Roll the canary back when its failure rate exceeds the stable
    /// version's by this many percentage points...
    #[serde(default = "default_rollback_margin")]
    #[schema(minimum = 0, maximum = 100)]
    pub rollback_margin: f64,
    /// ...once it has had at least this many calls.
    #[serde(default = "default_rollback_min_calls")]
    pub rollback_min_calls: u32,
}

fn default_rollback_margin() -> f64 {
    20.0
}

fn default_rollback_min_calls() -> u32 {
    50
}

impl Rollout {
    /// Only `stable`, serving everything.
    pub fn stable(version: i32) -> Self {
        Self {
            stable: version,
            canary: None,
            weight: 0,
            rollback_margin: default_rollback_margin(),
            rollback_min_calls: default_rollback_min_calls(),
        }
    }

    /// What is wrong with it, naming the field.
    pub fn problem(&self) -> Option<&'static str> {
        if self.weight > 100 {
            return Some("weight is a percentage, 0 to 100");
        }
        if self.canary == Some(self.stable) {
            return Some("canary must be another version than stable");
        }
        if self.canary.is_none() && self.weight != 0 {
            return Some("weight needs a canary");
        }
        if !(0.0..=100.0).contains(&self.rollback_margin) {
            return Some("rollback_margin is in percentage points, 0 to 100");
        }
        None
    }
}

/// One version's calls, summed over hosts.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct VersionStats {
    pub version: i32,
    pub calls: i64,
    pub failures: i64,
    /// Mean call duration in microseconds.
    pub mean_micros: i64,
}

/// A function as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FunctionRecord {
    pub namespace: String,
    pub name: String,
    pub binding: Binding,
    /// The stable version, once one is deployed.
    pub stable: Option<i32>,
    pub rollout: Option<Rollout>,
    /// Why the last canary was rolled back automatically, if it was.
    pub rolled_back: Option<String>,
    pub versions: Vec<VersionRecord>,
    pub stats: Vec<VersionStats>,
}

/// One version a host runs.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployedVersion {
    pub version: i32,
    pub module_digest: String,
    /// A replay still to start: the host clears the function's state and
    /// reads the stream from here.
    pub replay_from: Option<ReplayFrom>,
    /// Whether the version was made to replay (started or not).
    pub replays: bool,
    /// Named by [`runtime_name`]; the stable version's binding decides the
    /// consumer and the key.
    pub spec: FunctionSpec,
}

/// What a host runs for one deployed function.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    pub namespace: String,
    pub name: String,
    pub stable: DeployedVersion,
    pub canary: Option<(DeployedVersion, u8)>,
    pub rollout: Rollout,
}

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no function `{0}`")]
    NoFunction(String),
    #[error(
        "no module `{0}` this namespace may use: upload it with a token of the namespace first"
    )]
    NoModule(String),
    #[error("function `{function}` has no version {version}")]
    NoVersion { function: String, version: i32 },
    #[error("function `{0}` has no canary")]
    NoCanary(String),
    #[error("stored binding of `{function}` cannot be read: {reason}")]
    Corrupt { function: String, reason: String },
    #[error("control store: {0}")]
    Database(#[from] sqlx::Error),
}

/// The control tables.
#[derive(Debug, Clone)]
pub struct ControlStore {
    pool: PgPool,
}

fn decode(function: &str, text: String) -> Result<Binding, StoreError> {
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
        function: function.to_string(),
        reason: e.to_string(),
    })
}

impl ControlStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Creates or replaces a function's binding; true if it was created.
    /// Versions already made keep the binding they were made with.
    pub async fn put_function(
        &self,
        namespace: &str,
        name: &str,
        binding: &Binding,
    ) -> Result<bool, StoreError> {
        let spec = serde_json::to_string(binding).map_err(|e| StoreError::Corrupt {
            function: name.to_string(),
            reason: e.to_string(),
        })?;
        let mut tx = self.pool.begin().await?;
        let created: bool = sqlx::query_scalar(
            "INSERT INTO weir_functions (namespace, name, spec) VALUES ($1, $2, $3::jsonb)
             ON CONFLICT (namespace, name) DO UPDATE SET spec = EXCLUDED.spec, updated_at = now()
             RETURNING (xmax = 0)",
        )
        .bind(namespace)
        .bind(name)
        .bind(&spec)
        .fetch_one(&mut *tx)
        .await?;
        if created {
            // A function made again under a deleted one's name may be owned
            // again (its epochs go on from the deleted one's: nothing cached
            // or held under those can pass for its own).
            sqlx::query(
                "UPDATE weir_owners SET lease_until = now() - interval '1 millisecond'
                 WHERE function_name = $1 AND owner = ''",
            )
            .bind(runtime_name(namespace, name))
            .execute(&mut *tx)
            .await?;
        }
        notify(&mut tx, namespace, name).await?;
        tx.commit().await?;
        Ok(created)
    }

    pub async fn get_function(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<FunctionRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT f.spec::text, r.stable, r.canary, r.weight, r.rollback_margin,
                    r.rollback_min_calls, r.rolled_back
             FROM weir_functions f
             LEFT JOIN weir_rollouts r USING (namespace, name)
             WHERE f.namespace = $1 AND f.name = $2",
        )
        .bind(namespace)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let versions = sqlx::query(
            "SELECT version, module_digest, spec::text, replay_from_sequence, replay_from_ms,
                    replayed
             FROM weir_versions WHERE namespace = $1 AND name = $2 ORDER BY version",
        )
        .bind(namespace)
        .bind(name)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|v| {
            Ok(VersionRecord {
                version: v.try_get(0)?,
                module: v.try_get(1)?,
                binding: decode(name, v.try_get(2)?)?,
                replay_from: replay_from(v.try_get(3)?, v.try_get(4)?),
                replayed: v.try_get(5)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        let stable: Option<i32> = row.try_get(1)?;
        let rollout = match stable {
            Some(stable) => Some(Rollout {
                stable,
                canary: row.try_get(2)?,
                weight: u8::try_from(row.try_get::<i32, _>(3)?).unwrap_or(0),
                rollback_margin: row.try_get(4)?,
                rollback_min_calls: u32::try_from(row.try_get::<i32, _>(5)?).unwrap_or(0),
            }),
            None => None,
        };
        let stats = sqlx::query(
            "SELECT version, calls, failures, micros FROM weir_version_stats
             WHERE namespace = $1 AND name = $2 ORDER BY version",
        )
        .bind(namespace)
        .bind(name)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| {
            let calls: i64 = r.try_get(1)?;
            let micros: i64 = r.try_get(3)?;
            Ok(VersionStats {
                version: r.try_get(0)?,
                calls,
                failures: r.try_get(2)?,
                mean_micros: if calls > 0 { micros / calls } else { 0 },
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some(FunctionRecord {
            namespace: namespace.to_string(),
            name: name.to_string(),
            binding: decode(name, row.try_get(0)?)?,
            stable,
            rollout,
            rolled_back: row.try_get(6)?,
            versions,
            stats,
        }))
    }

    /// The names of a namespace's functions, with the version serving.
    pub async fn list_functions(
        &self,
        namespace: &str,
    ) -> Result<Vec<(String, Option<i32>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT f.name, r.stable FROM weir_functions f
             LEFT JOIN weir_rollouts r USING (namespace, name)
             WHERE f.namespace = $1 ORDER BY f.name",
        )
        .bind(namespace)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    /// Deletes a function with its versions, its state and its progress;
    /// false if there was none. (Hosts remove its consumer when they stop
    /// its worker.)
    pub async fn delete_function(&self, namespace: &str, name: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        fence_owners(&mut tx, &runtime_name(namespace, name), true).await?;
        sqlx::query("DELETE FROM weir_rollouts WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let deleted = sqlx::query("DELETE FROM weir_functions WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        // Its state and progress go with it: a function made again under the
        // same name starts anew instead of inheriting them.
        let runtime = runtime_name(namespace, name);
        for table in ["weir_state", "weir_applied", "weir_progress", "weir_outbox"] {
            let sql = format!("DELETE FROM {table} WHERE function_name = $1");
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&runtime)
                .execute(&mut *tx)
                .await?;
        }
        notify(&mut tx, namespace, name).await?;
        tx.commit().await?;
        Ok(deleted == 1)
    }

    /// Makes the next version of a function from `module` and its current
    /// binding. The first version starts serving at once.
    pub async fn create_version(
        &self,
        namespace: &str,
        name: &str,
        module: &str,
        replay: Option<ReplayFrom>,
    ) -> Result<VersionRecord, StoreError> {
        let mut tx = self.pool.begin().await?;
        let spec: Option<String> = sqlx::query_scalar(
            "SELECT spec::text FROM weir_functions WHERE namespace = $1 AND name = $2 FOR UPDATE",
        )
        .bind(namespace)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let spec = spec.ok_or_else(|| StoreError::NoFunction(name.to_string()))?;
        // The module's lock, which a release takes too: either the release
        // let go of the module first (refused here), or it sees this version
        // and keeps the module. The namespace must hold it (or a global
        // admin, or no one) — checked under the lock, and refused in the same
        // words whether the module is another namespace's or does not exist,
        // so that no namespace learns which digests others uploaded.
        super::modules::lock(&mut tx, "module", module).await?;
        let known: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM weir_modules WHERE digest = $1)")
                .bind(module)
                .fetch_one(&mut *tx)
                .await?;
        if !known || !super::modules::may_use(&mut *tx, namespace, module).await? {
            return Err(StoreError::NoModule(module.to_string()));
        }
        let version: i32 = sqlx::query_scalar(
            "INSERT INTO weir_versions
               (namespace, name, version, module_digest, spec, replay_from_sequence, replay_from_ms)
             SELECT $1, $2, COALESCE(MAX(version), 0) + 1, $3, $4::jsonb, $5, $6 FROM weir_versions
             WHERE namespace = $1 AND name = $2
             RETURNING version",
        )
        .bind(namespace)
        .bind(name)
        .bind(module)
        .bind(&spec)
        .bind(match replay {
            Some(ReplayFrom::Sequence(sequence)) => {
                Some(i64::try_from(sequence).unwrap_or(i64::MAX))
            }
            _ => None,
        })
        .bind(match replay {
            Some(ReplayFrom::TimeMs(ms)) => Some(ms),
            _ => None,
        })
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO weir_rollouts (namespace, name, stable) VALUES ($1, $2, $3)
             ON CONFLICT (namespace, name) DO NOTHING",
        )
        .bind(namespace)
        .bind(name)
        .bind(version)
        .execute(&mut *tx)
        .await?;
        notify(&mut tx, namespace, name).await?;
        tx.commit().await?;
        Ok(VersionRecord {
            version,
            module: module.to_string(),
            binding: decode(name, spec)?,
            replay_from: replay,
            replayed: false,
        })
    }

    /// Sets which versions serve; hosts apply it at once.
    pub async fn set_rollout(
        &self,
        namespace: &str,
        name: &str,
        rollout: &Rollout,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for version in std::iter::once(rollout.stable).chain(rollout.canary) {
            let exists: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM weir_versions
                 WHERE namespace = $1 AND name = $2 AND version = $3)",
            )
            .bind(namespace)
            .bind(name)
            .bind(version)
            .fetch_one(&mut *tx)
            .await?;
            if !exists {
                return Err(StoreError::NoVersion {
                    function: name.to_string(),
                    version,
                });
            }
        }
        sqlx::query(
            "INSERT INTO weir_rollouts
               (namespace, name, stable, canary, weight, rollback_margin, rollback_min_calls)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (namespace, name) DO UPDATE SET
               stable = EXCLUDED.stable, canary = EXCLUDED.canary, weight = EXCLUDED.weight,
               rollback_margin = EXCLUDED.rollback_margin,
               rollback_min_calls = EXCLUDED.rollback_min_calls,
               rolled_back = NULL, updated_at = now()",
        )
        .bind(namespace)
        .bind(name)
        .bind(rollout.stable)
        .bind(rollout.canary)
        .bind(i32::from(rollout.weight))
        .bind(rollout.rollback_margin)
        .bind(i32::try_from(rollout.rollback_min_calls).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await?;
        // Fresh numbers for the versions of the new rollout.
        sqlx::query("DELETE FROM weir_version_stats WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        notify(&mut tx, namespace, name).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Makes the canary the stable version, serving everything.
    pub async fn promote(&self, namespace: &str, name: &str) -> Result<i32, StoreError> {
        self.end_canary(namespace, name, true, None).await
    }

    /// Sends everything back to the stable version; `reason` says why when
    /// it was automatic.
    pub async fn rollback(
        &self,
        namespace: &str,
        name: &str,
        reason: Option<&str>,
    ) -> Result<i32, StoreError> {
        self.end_canary(namespace, name, false, reason).await
    }

    /// Rolls the canary back only if the rollout is still `(stable,
    /// canary)`: a worker judging an older rollout must not undo a newer
    /// one.
    pub async fn rollback_if(
        &self,
        namespace: &str,
        name: &str,
        (stable, canary): (i32, i32),
        reason: &str,
    ) -> Result<i32, StoreError> {
        let mut tx = self.pool.begin().await?;
        let serving: Option<i32> = sqlx::query_scalar(
            "UPDATE weir_rollouts SET canary = NULL, weight = 0, rolled_back = $5, updated_at = now()
             WHERE namespace = $1 AND name = $2 AND stable = $3 AND canary = $4
             RETURNING stable",
        )
        .bind(namespace)
        .bind(name)
        .bind(stable)
        .bind(canary)
        .bind(reason)
        .fetch_optional(&mut *tx)
        .await?;
        let serving = serving.ok_or_else(|| StoreError::NoCanary(name.to_string()))?;
        notify(&mut tx, namespace, name).await?;
        tx.commit().await?;
        Ok(serving)
    }

    async fn end_canary(
        &self,
        namespace: &str,
        name: &str,
        promote: bool,
        reason: Option<&str>,
    ) -> Result<i32, StoreError> {
        let mut tx = self.pool.begin().await?;
        let serving: Option<i32> = sqlx::query_scalar(
            "UPDATE weir_rollouts SET
               stable = CASE WHEN $3 THEN canary ELSE stable END,
               canary = NULL, weight = 0, rolled_back = $4, updated_at = now()
             WHERE namespace = $1 AND name = $2 AND canary IS NOT NULL
             RETURNING stable",
        )
        .bind(namespace)
        .bind(name)
        .bind(promote)
        .bind(reason)
        .fetch_optional(&mut *tx)
        .await?;
        let serving = serving.ok_or_else(|| StoreError::NoCanary(name.to_string()))?;
        notify(&mut tx, namespace, name).await?;
        tx.commit().await?;
        Ok(serving)
    }

    /// Adds a host's latest calls of one version to its totals.
    pub async fn add_stats(
        &self,
        namespace: &str,
        name: &str,
        version: i32,
        (calls, failures, micros): (i64, i64, i64),
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO weir_version_stats (namespace, name, version, calls, failures, micros)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (namespace, name, version) DO UPDATE SET
               calls = weir_version_stats.calls + EXCLUDED.calls,
               failures = weir_version_stats.failures + EXCLUDED.failures,
               micros = weir_version_stats.micros + EXCLUDED.micros",
        )
        .bind(namespace)
        .bind(name)
        .bind(version)
        .bind(calls)
        .bind(failures)
        .bind(micros)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every deployed function's serving versions, as hosts run them.
    pub async fn deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        let rows = sqlx::query(
            "SELECT r.namespace, r.name, r.stable, s.module_digest, s.spec::text,
                    r.canary, c.module_digest, c.spec::text, r.weight,
                    r.rollback_margin, r.rollback_min_calls,
                    CASE WHEN s.replayed THEN NULL ELSE s.replay_from_sequence END,
                    CASE WHEN s.replayed THEN NULL ELSE s.replay_from_ms END,
                    (s.replay_from_sequence IS NOT NULL OR s.replay_from_ms IS NOT NULL),
                    (c.replay_from_sequence IS NOT NULL OR c.replay_from_ms IS NOT NULL)
             FROM weir_rollouts r
             JOIN weir_versions s
               ON s.namespace = r.namespace AND s.name = r.name AND s.version = r.stable
             LEFT JOIN weir_versions c
               ON c.namespace = r.namespace AND c.name = r.name AND c.version = r.canary
             ORDER BY r.namespace, r.name",
        )
        .fetch_all(&self.pool)
        .await?;
        let deployments = rows.iter().map(|row| {
            let (namespace, name): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            let stable = DeployedVersion {
                version: row.try_get(2)?,
                module_digest: row.try_get(3)?,
                replay_from: replay_from(row.try_get(11)?, row.try_get(12)?),
                replays: row.try_get(13)?,
                spec: decode(&name, row.try_get(4)?)?.to_spec(&namespace, &name),
            };
            let weight = u8::try_from(row.try_get::<i32, _>(8)?).unwrap_or(0);
            let canary = match row.try_get::<Option<i32>, _>(5)? {
                Some(version) => Some((
                    DeployedVersion {
                        version,
                        module_digest: row.try_get(6)?,
                        replay_from: None,
                        replays: row.try_get::<Option<bool>, _>(14)?.unwrap_or(false),
                        spec: decode(&name, row.try_get(7)?)?.to_spec(&namespace, &name),
                    },
                    weight,
                )),
                None => None,
            };
            let rollout = Rollout {
                stable: stable.version,
                canary: canary.as_ref().map(|(c, _)| c.version),
                weight,
                rollback_margin: row.try_get(9)?,
                rollback_min_calls: u32::try_from(row.try_get::<i32, _>(10)?).unwrap_or(0),
            };
            Ok(Deployment {
                namespace,
                name,
                stable,
                canary,
                rollout,
            })
        });
        // One unreadable row must not stop every other function's changes.
        Ok(deployments
            .filter_map(
                |deployment: Result<Deployment, StoreError>| match deployment {
                    Ok(deployment) => Some(deployment),
                    Err(error) => {
                        tracing::error!(%error, "skipping an unreadable deployment");
                        None
                    }
                },
            )
            .collect())
    }

    /// Starts a replay: clears the function's state, applied sequences,
    /// progress and outbox, and marks the version replayed, in one
    /// transaction.
    pub async fn reset_for_replay(
        &self,
        namespace: &str,
        name: &str,
        version: i32,
    ) -> Result<(), StoreError> {
        let runtime = runtime_name(namespace, name);
        let mut tx = self.pool.begin().await?;
        // Whoever ran the function before the replay commits nothing more.
        fence_owners(&mut tx, &runtime, false).await?;
        for table in ["weir_state", "weir_applied", "weir_progress", "weir_outbox"] {
            let sql = format!("DELETE FROM {table} WHERE function_name = $1");
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&runtime)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "UPDATE weir_versions SET replayed = true
             WHERE namespace = $1 AND name = $2 AND version = $3",
        )
        .bind(namespace)
        .bind(name)
        .bind(version)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The bytes of a stored module.
    /// What namespace `namespace` owns (see [`super::namespaces`]).
    pub async fn namespace_resources(
        &self,
        namespace: &str,
    ) -> Result<super::namespaces::Resources, StoreError> {
        Ok(super::namespaces::resources(&self.pool, namespace).await?)
    }

    /// Replaces what namespace `namespace` owns.
    pub async fn grant_resources(
        &self,
        namespace: &str,
        resources: &super::namespaces::Resources,
    ) -> Result<(), StoreError> {
        Ok(super::namespaces::grant(&self.pool, namespace, resources, CONTROL_CHANNEL).await?)
    }

    pub async fn module_bytes(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        sqlx::query_scalar("SELECT bytes FROM weir_modules WHERE digest = $1")
            .bind(digest)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NoModule(digest.to_string()))
    }
}

/// Takes a function from its owner first, in the caller's transaction: a
/// new epoch (so an owner's commit in flight is fenced, and waits for this
/// transaction if it holds the row), and for a deletion a tombstone that no
/// host can claim (`owner = ''`, a lease that never ends) until the function
/// is made again. The row stays, so epochs only grow.
async fn fence_owners(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    function: &str,
    tombstone: bool,
) -> Result<(), StoreError> {
    let sql = if tombstone {
        "UPDATE weir_owners SET epoch = epoch + 1, owner = '', lease_until = 'infinity'
         WHERE function_name = $1"
    } else {
        "UPDATE weir_owners SET epoch = epoch + 1 WHERE function_name = $1"
    };
    sqlx::query(sql).bind(function).execute(&mut **tx).await?;
    Ok(())
}

async fn notify(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    namespace: &str,
    name: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CONTROL_CHANNEL)
        .bind(format!("{namespace}/{name}"))
        .execute(&mut **tx)
        .await?;
    Ok(())
}
