//! Where the host learns which functions to run, and the control plane's
//! HTTP API.
//!
//! The data path depends only on [`FunctionSource`]; today the source is the
//! static list from the config file ([`StaticFunctions`]). The API
//! ([`api`]) so far registers modules ([`modules`]) and issues tokens
//! ([`auth`]); functions, versions and rollouts will come through it as
//! another [`FunctionSource`].

pub mod admission;
pub mod api;
pub mod auth;
pub mod compile_job;
mod function_routes;
pub mod modules;
pub mod namespaces;
pub mod openapi;
pub mod records;
mod server;
pub mod store;
pub mod tokens;

use std::future::Future;

use crate::config::FunctionSpec;

/// Why the function list could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("function source unavailable: {0}")]
    Unavailable(String),
}

/// A source of function bindings.
pub trait FunctionSource: Send + Sync + 'static {
    /// The functions that should be running now.
    fn functions(&self) -> impl Future<Output = Result<Vec<FunctionSpec>, ControlError>> + Send;
}

/// A fixed list of functions, from the config file.
#[derive(Debug, Clone)]
pub struct StaticFunctions(pub Vec<FunctionSpec>);

impl FunctionSource for StaticFunctions {
    async fn functions(&self) -> Result<Vec<FunctionSpec>, ControlError> {
        Ok(self.0.clone())
    }
}
