//! Loading a deployed function's versions: the stored module, compiled by
//! a compile job unless this host has its artifact, then instantiated. A
//! `Loader` owns what it needs, so the host loads every changed deployment
//! at once and starts each as soon as it is ready.

use std::sync::Arc;

use super::{ModuleSource, ServeError, load_version, setup};
use crate::control::store::{ControlStore, Deployment};
use crate::dispatch::{VersionCode, WorkerEnv};
use crate::sandbox::Sandbox;

#[derive(Clone)]
pub(super) struct Loader {
    pub(super) control: ControlStore,
    pub(super) sandbox: Arc<Sandbox>,
    /// Compiles a deployed module whose artifact this host lacks.
    pub(super) compiler: crate::control::compile_job::Compiler,
    pub(super) env: WorkerEnv,
}

impl Loader {
    /// Loads one deployed version from its stored module.
    pub(super) async fn load(
        &self,
        version: &crate::control::store::DeployedVersion,
    ) -> Result<VersionCode, ServeError> {
        let bytes = self
            .control
            .module_bytes(&version.module_digest)
            .await
            .map_err(|e| ServeError::Load {
                function: version.spec.name.clone(),
                reason: e.to_string(),
            })?;
        setup::check_bindings(&self.env.js, &version.spec).await?;
        let name = &version.spec.name;
        self.env
            .readiness
            .function_loading(name, bytes.len() as u64);
        let loaded = self.compile_and_load(version, bytes).await;
        if let Some(seconds) = self.env.readiness.function_loaded(name) {
            tracing::info!(function = %name, version = version.version, seconds, ok = loaded.is_ok(), "deployed version loaded");
        }
        loaded
    }

    /// Compiles the version's module with a compile job unless this host has
    /// its artifact, then instantiates it.
    async fn compile_and_load(
        &self,
        version: &crate::control::store::DeployedVersion,
        bytes: Vec<u8>,
    ) -> Result<VersionCode, ServeError> {
        if !self.sandbox.has_artifact(&version.module_digest) {
            self.compiler
                .compile(
                    &self.sandbox,
                    &version.module_digest,
                    bytes::Bytes::from(bytes.clone()),
                )
                .await
                .map_err(|e| ServeError::Load {
                    function: version.spec.name.clone(),
                    reason: format!("compiling its module: {e}"),
                })?;
        }
        load_version(
            &version.spec,
            ModuleSource::Stored(bytes),
            Some(version.version),
            &self.sandbox,
            &self.env,
        )
        .await
    }

    /// Loads and instantiates a deployment's versions, without touching
    /// what runs.
    pub(super) async fn prepare(
        &self,
        deployment: &Deployment,
    ) -> Result<(VersionCode, Option<(VersionCode, u8)>), ServeError> {
        let stable = self.load(&deployment.stable).await?;
        let canary = match &deployment.canary {
            Some((version, weight)) => Some((self.load(version).await?, *weight)),
            None => None,
        };
        Ok((stable, canary))
    }
}
