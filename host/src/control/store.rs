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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub ack_wait_ms: Option<u64>,
}

impl Binding {
    /// The host's view of this binding, run as `runtime_name`.
    pub fn to_spec(&self, runtime_name: &str) -> FunctionSpec {
        let defaults = FunctionSpec::new(
            runtime_name,
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

/// One version of a function.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionRecord {
    pub version: i32,
    pub module: String,
    pub binding: Binding,
}

/// A function as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionRecord {
    pub namespace: String,
    pub name: String,
    pub binding: Binding,
    /// The version that serves, once one is deployed.
    pub stable: Option<i32>,
    pub versions: Vec<VersionRecord>,
}

/// What a host runs for one deployed function.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    /// Named by [`runtime_name`].
    pub spec: FunctionSpec,
    pub module_digest: String,
    pub version: i32,
}

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no function `{0}`")]
    NoFunction(String),
    #[error("no module with digest `{0}`: upload it first")]
    NoModule(String),
    #[error("function `{function}` has no version {version}")]
    NoVersion { function: String, version: i32 },
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
            "SELECT f.spec::text, r.stable FROM weir_functions f
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
            "SELECT version, module_digest, spec::text FROM weir_versions
             WHERE namespace = $1 AND name = $2 ORDER BY version",
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
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some(FunctionRecord {
            namespace: namespace.to_string(),
            name: name.to_string(),
            binding: decode(name, row.try_get(0)?)?,
            stable: row.try_get(1)?,
            versions,
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

    /// Deletes a function with its versions; false if there was none.
    pub async fn delete_function(&self, namespace: &str, name: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
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
        let known: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM weir_modules WHERE digest = $1)")
                .bind(module)
                .fetch_one(&mut *tx)
                .await?;
        if !known {
            return Err(StoreError::NoModule(module.to_string()));
        }
        let version: i32 = sqlx::query_scalar(
            "INSERT INTO weir_versions (namespace, name, version, module_digest, spec)
             SELECT $1, $2, COALESCE(MAX(version), 0) + 1, $3, $4::jsonb FROM weir_versions
             WHERE namespace = $1 AND name = $2
             RETURNING version",
        )
        .bind(namespace)
        .bind(name)
        .bind(module)
        .bind(&spec)
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
        })
    }

    /// Switches a function to serve `version`, at once.
    pub async fn set_stable(
        &self,
        namespace: &str,
        name: &str,
        version: i32,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM weir_versions WHERE namespace = $1 AND name = $2 AND version = $3)",
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
        sqlx::query(
            "INSERT INTO weir_rollouts (namespace, name, stable) VALUES ($1, $2, $3)
             ON CONFLICT (namespace, name) DO UPDATE SET stable = EXCLUDED.stable, updated_at = now()",
        )
        .bind(namespace)
        .bind(name)
        .bind(version)
        .execute(&mut *tx)
        .await?;
        notify(&mut tx, namespace, name).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every deployed function's serving version, as hosts run them.
    pub async fn deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        let rows = sqlx::query(
            "SELECT r.namespace, r.name, v.version, v.module_digest, v.spec::text
             FROM weir_rollouts r
             JOIN weir_versions v
               ON v.namespace = r.namespace AND v.name = r.name AND v.version = r.stable
             ORDER BY r.namespace, r.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let (namespace, name): (String, String) = (row.try_get(0)?, row.try_get(1)?);
                let binding = decode(&name, row.try_get(4)?)?;
                Ok(Deployment {
                    spec: binding.to_spec(&runtime_name(&namespace, &name)),
                    version: row.try_get(2)?,
                    module_digest: row.try_get(3)?,
                })
            })
            .collect()
    }

    /// The bytes of a stored module.
    pub async fn module_bytes(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        sqlx::query_scalar("SELECT bytes FROM weir_modules WHERE digest = $1")
            .bind(digest)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NoModule(digest.to_string()))
    }
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
