//! The module registry: an uploaded component is checked (WebAssembly, a
//! component rather than a core module, only imports Weir links, exports
//! one of Weir's worlds), compiled under the host's engine settings
//! by a compile job (a child process bounded in time and memory, see
//! [`super::compile_job`]), and stored in
//! `weir_modules` under its sha256. The compiled artifact lands in the
//! artifact cache, so a host that later runs it does not compile again.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};

use super::compile_job::{CompileError, Compiler};
use crate::sandbox::{Sandbox, SandboxError, World};

/// A stored module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ModuleInfo {
    pub digest: String,
    pub size: i64,
    pub world: String,
}

/// Why an upload was refused or could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("the upload is empty")]
    Empty,
    #[error("the upload is not WebAssembly: it does not start with the `\\0asm` magic bytes")]
    NotWasm,
    #[error(
        "the upload is a core WebAssembly module, not a component: build for `wasm32-wasip2` (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    #[error("the upload is not a valid component: {0}")]
    Invalid(String),
    #[error("the component cannot be linked: {0}")]
    UnknownImport(String),
    #[error(
        "the component exports none of Weir's worlds: `weir:function/event-handler` (a `handle` function), `weir:window/incremental-window-handler` (`fold`, `merge`, `fire`) or `weir:window/buffered-window-handler` (`on-window`): {0}"
    )]
    WrongWorld(String),
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// The artifact was deleted between compiling and storing; the upload
    /// compiles again (never seen by a client).
    #[error("the compiled artifact was deleted while the module was stored")]
    ArtifactGone,
    #[error("module store: {0}")]
    Database(#[from] sqlx::Error),
    #[error("compiling the component failed inside the host: {0}")]
    Host(String),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("module `{0}` is not held by this namespace")]
    NotHeld(String),
    #[error("module `{digest}` is in use by {users}; remove or replace those versions first")]
    InUse { digest: String, users: String },
}

/// How much a namespace may hold.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    pub modules: i64,
    pub bytes: i64,
}

/// Compiles and stores modules.
#[derive(Clone)]
pub struct ModuleRegistry {
    pool: PgPool,
    sandbox: Arc<Sandbox>,
    compiler: Compiler,
}

impl std::fmt::Debug for ModuleRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleRegistry").finish_non_exhaustive()
    }
}

impl ModuleRegistry {
    /// A registry whose uploads `compiler`'s jobs compile for `sandbox`.
    pub fn new(pool: PgPool, sandbox: Arc<Sandbox>, compiler: Compiler) -> Self {
        Self {
            pool,
            sandbox,
            compiler,
        }
    }

    /// Checks, compiles and stores `bytes` for `namespace`, within its
    /// `quota`. Returns the module and whether it is new; uploading the same
    /// bytes again finds the stored one (and the namespace then holds it
    /// too).
    pub async fn upload(
        &self,
        bytes: Bytes,
        namespace: &str,
        quota: Quota,
    ) -> Result<(ModuleInfo, bool), ModuleError> {
        check_header(&bytes)?;
        let digest = hex::encode(Sha256::digest(&bytes));
        let size = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
        // Checked again when the module is held; this refuses early,
        // before anything is compiled.
        if !holds(&self.pool, namespace, &digest).await? {
            check_quota(&self.pool, namespace, size, quota).await?;
        }
        // The artifact is checked again under the module's lock when it is
        // stored: one deleted meanwhile (a release racing this upload, or a
        // refused upload of the same bytes) is compiled again, so a stored
        // module always has one and no host compiles an upload itself.
        let mut inserted = None;
        let mut world = World::Event;
        for _ in 0..3 {
            world = self.ensure_compiled(&digest, &bytes).await?;
            match self
                .store_and_hold(namespace, &digest, &bytes, size, world, quota)
                .await
            {
                Err(ModuleError::ArtifactGone) => continue,
                stored => {
                    inserted = Some(stored?);
                    break;
                }
            }
        }
        let Some(inserted) = inserted else {
            return Err(ModuleError::Host(
                "the compiled artifact kept disappearing while the module was stored".into(),
            ));
        };
        let info = ModuleInfo {
            digest,
            size,
            world: world.wit_name().to_string(),
        };
        Ok((info, inserted))
    }

    /// Whether a version of a function in `namespace` may use the module:
    /// the namespace holds it, a global admin uploaded it, or it predates
    /// holding (no holder at all). So no namespace can pin another's module
    /// (and its quota) by making versions of it.
    pub async fn usable_by(&self, namespace: &str, digest: &str) -> Result<bool, ModuleError> {
        Ok(may_use(&self.pool, namespace, digest).await?)
    }

    /// Makes sure the artifact cache holds `digest` compiled by a compile
    /// job, and that it links as one of Weir's worlds (which it returns); a
    /// module that does not is refused and keeps no artifact. An artifact
    /// already in the cache was made by a job that finished (a stopped job
    /// leaves none).
    async fn ensure_compiled(&self, digest: &str, bytes: &Bytes) -> Result<World, ModuleError> {
        if !self.sandbox.has_artifact(digest) {
            self.compiler
                .compile(&self.sandbox, digest, bytes.clone())
                .await
                .map_err(|error| match error {
                    CompileError::Invalid(reason) => ModuleError::Invalid(reason),
                    other => ModuleError::Compile(other),
                })?;
        }
        let sandbox = self.sandbox.clone();
        let compiled = digest.to_string();
        let linked = tokio::task::spawn_blocking(move || sandbox.load_compiled(&compiled))
            .await
            .map_err(|e| ModuleError::Host(e.to_string()))?;
        match linked {
            Ok(code) => Ok(code.world()),
            Err(error) => {
                self.sandbox.forget_artifact(digest);
                Err(match error {
                    SandboxError::Invalid { reason, .. } => ModuleError::Invalid(reason),
                    SandboxError::UnknownImport { reason, .. } => {
                        ModuleError::UnknownImport(reason)
                    }
                    SandboxError::WrongWorld { reason, .. } => ModuleError::WrongWorld(reason),
                    other => ModuleError::Host(other.to_string()),
                })
            }
        }
    }

    /// Stores the module (unless stored already) and makes `namespace`
    /// hold it, if that keeps the namespace within `quota` and its artifact
    /// is still in the cache ([`ModuleError::ArtifactGone`] otherwise). One
    /// transaction that takes the namespace's quota lock, then the module's
    /// lock: two uploads at once cannot both take the namespace's last
    /// place, and a release cannot delete the module or its artifact
    /// meanwhile. Returns whether the module row is new.
    async fn store_and_hold(
        &self,
        namespace: &str,
        digest: &str,
        bytes: &[u8],
        size: i64,
        world: World,
        quota: Quota,
    ) -> Result<bool, ModuleError> {
        let mut tx = self.pool.begin().await?;
        lock(&mut tx, "module-quota", namespace).await?;
        lock(&mut tx, "module", digest).await?;
        let held = holds(&mut *tx, namespace, digest).await?;
        let stored: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM weir_modules WHERE digest = $1)")
                .bind(digest)
                .fetch_one(&mut *tx)
                .await?;
        if !held && let Err(refused) = check_quota(&mut *tx, namespace, size, quota).await {
            // Refused after compiling: an artifact no stored module needs
            // goes (under the module's lock, so no upload is storing it).
            if !stored {
                self.sandbox.forget_artifact(digest);
            }
            return Err(refused);
        }
        if !self.sandbox.has_artifact(digest) {
            return Err(ModuleError::ArtifactGone);
        }
        // The bytes go to the database only when they are new there.
        if !stored {
            sqlx::query(
                "INSERT INTO weir_modules (digest, bytes, size, world) VALUES ($1, $2, $3, $4)",
            )
            .bind(digest)
            .bind(bytes)
            .bind(size)
            .bind(world.wit_name())
            .execute(&mut *tx)
            .await?;
        } else {
            // Rows from before the world was read from the component say
            // `event-handler` whatever it was: uploading it again mends it.
            sqlx::query("UPDATE weir_modules SET world = $2 WHERE digest = $1 AND world <> $2")
                .bind(digest)
                .bind(world.wit_name())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO weir_module_owners (namespace, digest) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(namespace)
        .bind(digest)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(!stored)
    }

    /// Lets go of `namespace`'s hold on a module; once nothing holds it and
    /// no version uses it, the module and its compiled artifact are deleted.
    pub async fn release(&self, namespace: &str, digest: &str) -> Result<(), ModuleError> {
        let mut tx = self.pool.begin().await?;
        lock(&mut tx, "module", digest).await?;
        let held = holds(&mut *tx, namespace, digest).await?;
        if !held {
            return Err(ModuleError::NotHeld(digest.to_string()));
        }
        // Named only when they are the caller's own: another namespace's
        // functions are none of its business.
        let users: Vec<String> = sqlx::query_scalar(
            "SELECT CASE WHEN namespace = $2 THEN namespace || '/' || name || ' v' || version
                         ELSE 'a version of another namespace' END
             FROM weir_versions WHERE module_digest = $1 ORDER BY 1 LIMIT 5",
        )
        .bind(digest)
        .bind(namespace)
        .fetch_all(&mut *tx)
        .await?;
        if !users.is_empty() {
            return Err(ModuleError::InUse {
                digest: digest.to_string(),
                users: users.join(", "),
            });
        }
        sqlx::query("DELETE FROM weir_module_owners WHERE namespace = $1 AND digest = $2")
            .bind(namespace)
            .bind(digest)
            .execute(&mut *tx)
            .await?;
        let deleted = sqlx::query(
            "DELETE FROM weir_modules m WHERE digest = $1
             AND NOT EXISTS (SELECT 1 FROM weir_module_owners o WHERE o.digest = m.digest)
             AND NOT EXISTS (SELECT 1 FROM weir_versions v WHERE v.module_digest = m.digest)",
        )
        .bind(digest)
        .execute(&mut *tx)
        .await?;
        // Under the module's lock, so no upload of the same bytes is
        // between finding the artifact and storing the module. (Should the
        // commit fail, the module stays without an artifact: its next upload
        // compiles it again.)
        if deleted.rows_affected() == 1 {
            self.sandbox.forget_artifact(digest);
        }
        tx.commit().await?;
        Ok(())
    }

    /// The world the stored module `digest` implements, read from its
    /// compiled artifact (not from its row, which modules stored before
    /// the world was read from the component have wrong). `None` when the
    /// artifact cannot be loaded here.
    pub async fn world_of(&self, digest: &str) -> Option<World> {
        let sandbox = self.sandbox.clone();
        let digest = digest.to_string();
        tokio::task::spawn_blocking(move || sandbox.load_compiled(&digest))
            .await
            .ok()?
            .ok()
            .map(|code| code.world())
    }

    /// The stored module with this digest, if any.
    pub async fn get(&self, digest: &str) -> Result<Option<ModuleInfo>, ModuleError> {
        let row = sqlx::query("SELECT digest, size, world FROM weir_modules WHERE digest = $1")
            .bind(digest)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(ModuleInfo {
                digest: row.try_get(0)?,
                size: row.try_get(1)?,
                world: row.try_get(2)?,
            })
        })
        .transpose()
    }
}

/// Takes the transaction-scoped lock on `name` of `kind`: decisions that
/// a read-then-write would race (a quota, a limit, a delete) are made one
/// at a time per name.
pub(crate) async fn lock(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    kind: &str,
    name: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("weir-{kind}:{name}"))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Whether versions of `namespace` may use module `digest` (see
/// [`ModuleRegistry::usable_by`]), read with `executor` (a transaction that
/// holds the module's lock, or the pool).
pub(crate) async fn may_use<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    namespace: &str,
    digest: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM weir_module_owners WHERE digest = $1 AND namespace IN ($2, '*'))
             OR NOT EXISTS (SELECT 1 FROM weir_module_owners WHERE digest = $1)",
    )
    .bind(digest)
    .bind(namespace)
    .fetch_one(executor)
    .await
}

/// Whether `namespace` holds the module `digest`.
async fn holds<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    namespace: &str,
    digest: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM weir_module_owners WHERE namespace = $1 AND digest = $2)",
    )
    .bind(namespace)
    .bind(digest)
    .fetch_one(executor)
    .await
}

/// Refuses a module of `size` bytes that would take `namespace` past its
/// quota.
async fn check_quota<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    namespace: &str,
    size: i64,
    quota: Quota,
) -> Result<(), ModuleError> {
    let (count, bytes): (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(m.size), 0)::int8 FROM weir_module_owners o
         JOIN weir_modules m USING (digest) WHERE o.namespace = $1",
    )
    .bind(namespace)
    .fetch_one(executor)
    .await?;
    if count + 1 > quota.modules || bytes.saturating_add(size) > quota.bytes {
        return Err(ModuleError::QuotaExceeded(format!(
            "namespace `{namespace}` holds {count} modules of {bytes} bytes; one more of {size} bytes would pass its quota of {} modules, {} bytes: delete unused ones (DELETE /v1/modules/{{digest}})",
            quota.modules, quota.bytes
        )));
    }
    Ok(())
}

/// Refuses what is not a component before anything is compiled: the
/// preamble is `\0asm`, then a version and a layer (1 for core modules,
/// 0x0d with layer 1 for components).
fn check_header(bytes: &[u8]) -> Result<(), ModuleError> {
    if bytes.is_empty() {
        return Err(ModuleError::Empty);
    }
    if !bytes.starts_with(b"\0asm") {
        return Err(ModuleError::NotWasm);
    }
    match bytes.get(4..8) {
        Some([1, 0, 0, 0]) => Err(ModuleError::CoreModule),
        Some([_, _, 1, 0]) => Ok(()),
        _ => Err(ModuleError::Invalid(
            "the preamble is truncated or of an unknown version".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_told_apart() {
        assert!(matches!(check_header(b""), Err(ModuleError::Empty)));
        assert!(matches!(
            check_header(b"#!/bin/sh"),
            Err(ModuleError::NotWasm)
        ));
        assert!(matches!(
            check_header(b"\0asm\x01\0\0\0"),
            Err(ModuleError::CoreModule)
        ));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
        assert!(matches!(
            check_header(b"\0asm\x0d"),
            Err(ModuleError::Invalid(_))
        ));
    }
}
