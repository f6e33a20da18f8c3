//! The HTTP API under `/v1` (axum): its state, its errors, the router,
//! admission per client address, and module uploads. Functions and
//! resources are in `function_routes`, tokens in `tokens`, logs and dead
//! letters in `records`.
//! Every error is JSON `{error, message}` with a 4xx status for what the
//! caller can fix, and never carries the host's internals.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::admission::{ClientLimiter, UploadsBusy};
use super::auth::{AuthError, Authenticator, Principal, Role};
use super::modules::{ModuleError, ModuleInfo, ModuleRegistry};
use super::namespaces::RESERVED_NAMESPACE;
use super::openapi::{ErrorBody, Refused};
use super::store::{ControlStore, StoreError};
use super::{function_routes, tokens};

/// Largest JSON body of any call but a module upload.
const MAX_JSON_BYTES: usize = 64 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub auth: Arc<Authenticator>,
    pub modules: ModuleRegistry,
    pub store: ControlStore,
    /// Largest module upload, in bytes.
    pub max_module_bytes: usize,
    /// The rate per client address, checked before anything else.
    pub clients: Arc<ClientLimiter>,
    /// The broker, to check that a binding's outputs can be stored and to
    /// read functions' logs and dead letters for their namespace.
    pub js: async_nats::jetstream::Context,
    /// `guest_logs.subject_prefix`.
    pub log_prefix: String,
    /// `dead_letter_prefix`.
    pub dead_letter_prefix: String,
    /// What each namespace may hold in modules.
    pub module_quota: super::modules::Quota,
    /// How long a client has to send its request headers.
    pub header_read_timeout: std::time::Duration,
    /// How long an upload's body may take to arrive once its headers are in.
    pub upload_body_timeout: std::time::Duration,
    /// Live tokens a namespace may have.
    pub max_tokens_per_namespace: u32,
    /// Uploads being read or compiled at once, in total and per client:
    /// memory held by uploads is at most the total times `max_module_bytes`.
    pub uploads: Arc<super::admission::UploadSlots>,
}

/// A refused or failed call, as the client sees it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub(super) fn unavailable(what: &str, error: &dyn std::fmt::Display) -> Self {
        tracing::warn!(%error, "API: {what} failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{what} is unavailable; try again"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            error: self.code,
            message: self.message,
        });
        let mut response = (self.status, body).into_response();
        if let Some(seconds) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Missing | AuthError::Invalid => {
                Self::new(StatusCode::UNAUTHORIZED, "unauthorized", error.to_string())
            }
            AuthError::Forbidden(_) => {
                Self::new(StatusCode::FORBIDDEN, "forbidden", error.to_string())
            }
            AuthError::RateLimited { retry_after } => Self {
                retry_after_secs: Some(retry_after.as_secs_f64().ceil().max(1.0) as u64),
                ..Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    error.to_string(),
                )
            },
            AuthError::Database(error) => Self::unavailable("the token store", &error),
            AuthError::Entropy(error) => Self::unavailable("token generation", &error),
        }
    }
}

impl From<ModuleError> for ApiError {
    fn from(error: ModuleError) -> Self {
        match error {
            ModuleError::Database(error) => Self::unavailable("the module store", &error),
            ModuleError::Host(reason)
            | ModuleError::Compile(super::compile_job::CompileError::Host(reason)) => {
                tracing::error!(%reason, "API: compiling an upload failed inside the host");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "compiling the component failed inside the host; see the host log",
                )
            }
            ModuleError::Compile(super::compile_job::CompileError::Stalled(_)) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("{error}; try again"),
            ),
            ModuleError::QuotaExceeded(_) => {
                Self::new(StatusCode::CONFLICT, "quota_exceeded", error.to_string())
            }
            ModuleError::InUse { .. } => {
                Self::new(StatusCode::CONFLICT, "in_use", error.to_string())
            }
            ModuleError::NotHeld(_) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", error.to_string())
            }
            invalid => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_module",
                invalid.to_string(),
            ),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NoFunction(_) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", error.to_string())
            }
            StoreError::NoModule(_) | StoreError::NoVersion { .. } | StoreError::NoCanary(_) => {
                Self::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_body",
                    error.to_string(),
                )
            }
            StoreError::Corrupt { .. } => {
                tracing::error!(%error, "API: a stored binding is unreadable");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "a stored function binding cannot be read; see the host log",
                )
            }
            // A row it refers to went away meanwhile (a racing delete).
            StoreError::Database(sqlx::Error::Database(db))
                if db.code().as_deref() == Some("23503") =>
            {
                Self::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "the function or version was removed meanwhile",
                )
            }
            StoreError::Database(error) => Self::unavailable("the control store", &error),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let code = match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
            _ => "malformed_body",
        };
        Self::new(rejection.status(), code, rejection.body_text())
    }
}

/// The `/v1` routes, each with its entry in the OpenAPI document: a
/// handler's `#[utoipa::path]` names both its route and its documentation.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    use super::records;
    use function_routes as functions;
    OpenApiRouter::with_openapi(super::openapi::ApiDoc::openapi())
        .routes(routes!(openapi_document))
        // The upload reads its body itself, after the caller's token and
        // within the module size limit.
        .routes(routes!(upload_module))
        .routes(routes!(get_module, delete_module))
        .routes(routes!(tokens::create_token, tokens::list_tokens))
        .routes(routes!(tokens::revoke_token))
        .routes(routes!(functions::list_functions))
        .routes(routes!(
            functions::put_function,
            functions::get_function,
            functions::delete_function
        ))
        .routes(routes!(
            functions::grant_resources,
            functions::get_resources
        ))
        .routes(routes!(records::logs))
        .routes(routes!(records::dead_letters))
        .routes(routes!(functions::create_version))
        .routes(routes!(functions::set_rollout, functions::get_rollout))
        .routes(routes!(functions::promote))
        .routes(routes!(functions::rollback))
}

/// The `/v1` router: [`routes`], each client admitted first.
pub fn router(state: ApiState) -> Router {
    let (routes, _) = routes().split_for_parts();
    routes
        // JSON bodies only: the upload reads its body itself.
        .layer(DefaultBodyLimit::max(MAX_JSON_BYTES))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admit_client,
        ))
        .with_state(state)
}

/// `GET /v1/openapi.json`.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "api",
    summary = "This document",
    responses(
        (status = 200, description = "The OpenAPI document", body = Object),
        (status = 429, description = "Too many requests from this client", body = ErrorBody),
    ))]
async fn openapi_document() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(super::openapi::document())
}

/// Refuses a request past its client address's rate before any handler
/// (and so any database query or body read) runs. Requests that did not
/// come through [`start`] (no peer address) are not limited here.
async fn admit_client(
    State(state): State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let client = request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    if let Some(client) = client
        && let Err(wait) = state.clients.admit(client, std::time::Instant::now())
    {
        return ApiError {
            retry_after_secs: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests from {client}; slow down"),
            )
        }
        .into_response();
    }
    next.run(request).await
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not accept {method}", uri.path()),
    )
}

pub(super) async fn caller(state: &ApiState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    Ok(state.auth.authenticate(authorization).await?)
}

#[derive(Serialize, utoipa::ToSchema)]
struct UploadedModule {
    #[serde(flatten)]
    module: ModuleInfo,
    /// False when the same bytes were uploaded before.
    created: bool,
}

/// A module upload. The body is not read until the caller is known to be
/// allowed to upload and its declared length fits: an unauthenticated or
/// oversized upload costs the host no memory (and a client that sent
/// `Expect: 100-continue` is answered before it sends anything).
#[utoipa::path(post, path = "/v1/modules", tag = "modules",
    summary = "Upload a component: checked, compiled ahead in a bounded job, stored by sha256",
    description = "Needs a token with the `deploy` role. The body is read only once the token and the declared length pass.",
    request_body(content = inline(super::openapi::WasmComponent), content_type = "application/wasm"),
    responses(
        (status = 201, description = "Stored", body = UploadedModule),
        (status = 200, description = "The same bytes were stored before", body = UploadedModule),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 409, description = "The namespace's module quota is full", body = ErrorBody),
        (status = 413, description = "Larger than the API takes", body = ErrorBody),
        Refused,
    ),
    security(("bearer" = [])))]
async fn upload_module(
    State(state): State<ApiState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<UploadedModule>), ApiError> {
    let principal = caller(&state, &headers).await?;
    principal.require_role(Role::Deploy)?;
    let limit = state.max_module_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("a module is at most {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    // Held until the upload is stored or refused. A request that did not
    // come through [`start`] counts as one client.
    let client = peer.map_or(IpAddr::from([0, 0, 0, 0]), |peer| peer.0.0.ip());
    let _in_flight = state.uploads.try_take(client).map_err(|busy| {
        let message = match busy {
            UploadsBusy::Host => "as many uploads as the host takes at once are in flight; retry",
            UploadsBusy::Client => {
                "as many uploads as one client may make at once are in flight from this address; wait for them"
            }
        };
        ApiError {
            retry_after_secs: Some(1),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "uploads_busy", message)
        }
    })?;
    let read = tokio::time::timeout(state.upload_body_timeout, axum::body::to_bytes(body, limit));
    let Ok(read) = read.await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!(
                "the module did not arrive within {} s",
                state.upload_body_timeout.as_secs()
            ),
        ));
    };
    let body = read.map_err(|error| {
        let over_limit = std::error::Error::source(&error)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if over_limit {
            too_large()
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_body",
                format!("reading the module failed: {error}"),
            )
        }
    })?;
    let (module, created) = state
        .modules
        .upload(body, &principal.namespace, state.module_quota)
        .await?;
    let status = if created {
        tracing::info!(digest = %module.digest, size = module.size, token = %principal.token_id, "module uploaded");
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(UploadedModule { module, created })))
}

/// Lets go of the caller's namespace's hold on a module; a module nothing
/// holds or uses is deleted, with its compiled artifact.
#[utoipa::path(delete, path = "/v1/modules/{digest}", tag = "modules",
    summary = "Let go of the namespace's hold on a module; one nothing holds or uses is deleted",
    description = "Needs a token with the `deploy` role.",
    params(super::openapi::ModulePath),
    responses(
        (status = 204, description = "Released"),
        (status = 404, description = "The namespace holds no such module", body = ErrorBody),
        (status = 409, description = "A version of the namespace uses it", body = ErrorBody),
        Refused,
    ),
    security(("bearer" = [])))]
async fn delete_module(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> Result<StatusCode, ApiError> {
    let principal = caller(&state, &headers).await?;
    principal.require_role(Role::Deploy)?;
    state.modules.release(&principal.namespace, &digest).await?;
    tracing::info!(%digest, namespace = %principal.namespace, token = %principal.token_id, "module released");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/modules/{digest}", tag = "modules",
    summary = "A stored module",
    description = "Needs a token with the `read` role.",
    params(super::openapi::ModulePath),
    responses(
        (status = 200, description = "The module", body = ModuleInfo),
        (status = 404, description = "No such module that the caller's namespace may use", body = ErrorBody),
        Refused,
    ),
    security(("bearer" = [])))]
async fn get_module(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> Result<Json<ModuleInfo>, ApiError> {
    let principal = caller(&state, &headers).await?;
    principal.require_role(Role::Read)?;
    // Another namespace's module is not there, as far as this caller can
    // tell: not even that those bytes were uploaded.
    let visible = principal.namespace == super::auth::ANY_NAMESPACE
        || state
            .modules
            .usable_by(&principal.namespace, &digest)
            .await?;
    match state.modules.get(&digest).await? {
        Some(module) if visible => Ok(Json(module)),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no module with digest `{digest}`"),
        )),
    }
}

/// Checks the namespace and function name of a URL.
pub(super) fn names(namespace: &str, name: &str) -> Result<(), ApiError> {
    let bad = |what: &str| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_name",
            format!("{what}: 1 to 63 lowercase letters, digits or `-`"),
        )
    };
    if !is_namespace_name(namespace) {
        return Err(bad("namespace"));
    }
    if namespace == RESERVED_NAMESPACE {
        return Err(reserved());
    }
    if !is_namespace_name(name) {
        return Err(bad("function name"));
    }
    Ok(())
}

/// The refusal of namespace [`RESERVED_NAMESPACE`].
pub(super) fn reserved() -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_name",
        format!(
            "namespace `{RESERVED_NAMESPACE}` is reserved: Weir's own streams and subjects (dead letters, guest logs) are named for it"
        ),
    )
}

/// A namespace name: what is safe in URLs, subjects and consumer names.
pub fn is_namespace_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Binds `address` now (a taken port fails start-up) and serves the API
/// until `shutdown`.
pub async fn start(
    address: SocketAddr,
    state: ApiState,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(%address, "serving the API under /v1");
    let auth = state.auth.clone();
    let until = shutdown.clone();
    tokio::spawn(async move { auth.follow_revocations(until).await });
    let header_read_timeout = state.header_read_timeout;
    Ok(tokio::spawn(super::server::serve(
        listener,
        router(state),
        header_read_timeout,
        shutdown,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names() {
        assert!(is_namespace_name("shop-2"));
        assert!(!is_namespace_name(""));
        assert!(!is_namespace_name("Shop"));
        assert!(!is_namespace_name("a.b"));
        assert!(!is_namespace_name(&"a".repeat(64)));
    }
}
