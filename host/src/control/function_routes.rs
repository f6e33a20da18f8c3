//! The routes of a namespace's functions and resources: bindings (checked
//! against what the namespace owns and what the streams capture), versions,
//! rollouts, and the grants of streams and subjects.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};

use super::api::{ApiError, ApiState, caller, names};
use super::auth::{ANY_NAMESPACE, Role};
use super::namespaces::Resources;
use super::openapi::{BodyRefused, ErrorBody, Refused};
use super::store::{Binding, FunctionRecord, Rollout, VersionRecord};

/// What a namespace owns: readable in the namespace.
#[utoipa::path(get, path = "/v1/namespaces/{namespace}/resources", tag = "namespaces",
    summary = "The streams and subjects the namespace owns",
    description = "Needs a token with the `read` role in the namespace.",
    params(super::openapi::NamespacePath),
    responses((status = 200, description = "What the namespace owns", body = Resources), Refused),
    security(("bearer" = [])))]
pub(super) async fn get_resources(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(namespace): Path<String>,
) -> Result<Json<Resources>, ApiError> {
    caller(&state, &headers)
        .await?
        .require(&namespace, Role::Read)?;
    names(&namespace, "resources")?;
    Ok(Json(state.store.namespace_resources(&namespace).await?))
}

/// Replaces what a namespace owns: only an admin of every namespace may,
/// or a namespace's admin could take another's streams.
#[utoipa::path(put, path = "/v1/namespaces/{namespace}/resources", tag = "namespaces",
    summary = "Replace the streams and subjects the namespace owns",
    description = "Needs an `admin` token of every namespace (the bootstrap token or one made for `*`).",
    params(super::openapi::NamespacePath),
    request_body = Resources,
    responses((status = 200, description = "Granted", body = Resources), Refused, BodyRefused),
    security(("bearer" = [])))]
pub(super) async fn grant_resources(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(namespace): Path<String>,
    body: Result<Json<Resources>, JsonRejection>,
) -> Result<Json<Resources>, ApiError> {
    let principal = caller(&state, &headers).await?;
    principal.require(ANY_NAMESPACE, Role::Admin)?;
    names(&namespace, "resources")?;
    let Json(resources) = body?;
    if let Some(problem) = resources.problem() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            problem,
        ));
    }
    state.store.grant_resources(&namespace, &resources).await?;
    tracing::info!(%namespace, streams = ?resources.streams, subjects = ?resources.subjects, by = %principal.token_id, "namespace resources granted");
    Ok(Json(resources))
}

fn no_function(namespace: &str, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no function `{name}` in namespace `{namespace}`"),
    )
}

#[utoipa::path(put, path = "/v1/namespaces/{namespace}/functions/{name}", tag = "functions",
    summary = "Create or replace a function's binding",
    description = "Needs a token with the `deploy` role in the namespace. The stream, subject and outputs must be the namespace's, and a JetStream stream must capture every output.",
    params(super::openapi::FunctionPath),
    request_body = Binding,
    responses(
        (status = 201, description = "Created", body = FunctionRecord),
        (status = 200, description = "Replaced", body = FunctionRecord),
        (status = 404, description = "The function was removed meanwhile", body = ErrorBody),
        (status = 409, description = "A function with versions cannot move to another stream, switch between per-event and windowed, change its window kind or raise its allowed lateness", body = ErrorBody),
        Refused, BodyRefused,
    ),
    security(("bearer" = [])))]
pub(super) async fn put_function(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    body: Result<Json<Binding>, JsonRejection>,
) -> Result<(StatusCode, Json<FunctionRecord>), ApiError> {
    caller(&state, &headers)
        .await?
        .require(&namespace, Role::Deploy)?;
    names(&namespace, &name)?;
    let Json(binding) = body?;
    if let Some(problem) = binding.to_spec(&namespace, &name).problem() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            problem,
        ));
    }
    // A namespace reads and writes only what it owns.
    let owned = state.store.namespace_resources(&namespace).await?;
    // (Its late-data subject is published to as its outputs are.)
    if let Some(problem) = owned.binding_problem(
        &namespace,
        &binding.stream,
        &binding.subject,
        &binding.publishes(),
    ) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", problem));
    }
    // An output no stream captures would hold its function's events forever
    // (the publish is retried as an outage): refused here instead.
    let captured = crate::output::stream_subjects(&state.js)
        .await
        .map_err(|error| ApiError::unavailable("NATS", &error))?;
    if let Some(output) = crate::output::uncaptured(&binding.publishes(), &captured) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!(
                "outputs: no JetStream stream captures all of `{output}` (an output or the late-data subject), so what the function publishes there could never be stored; make a stream that captures it first"
            ),
        ));
    }
    if let Some(existing) = state.store.get_function(&namespace, &name).await?
        && !existing.versions.is_empty()
        && let Some(problem) = binding_change_problem(&name, &existing.binding, &binding)
    {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", problem));
    }
    let created = state
        .store
        .put_function(&namespace, &name, &binding)
        .await?;
    let record = state
        .store
        .get_function(&namespace, &name)
        .await?
        .ok_or_else(|| no_function(&namespace, &name))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(record)))
}

/// Why `module` cannot be a version of `function` (of `namespace`), if it
/// cannot: a per-event component on a windowed binding or the other way
/// round, or a world other than the versions that serve now (a canary of
/// another world would stop the function, and incremental and buffered
/// windows keep their parts differently). Worlds are read from the
/// compiled artifacts. A module the namespace may not use is left to the
/// version's own check, which does not tell whether it exists.
async fn world_problem(
    state: &ApiState,
    namespace: &str,
    function: &FunctionRecord,
    module: &str,
) -> Result<Option<String>, ApiError> {
    if !state.modules.usable_by(namespace, module).await? {
        return Ok(None);
    }
    let Some(world) = state.modules.world_of(module).await else {
        return Ok(None);
    };
    let name = world.wit_name();
    match (world.is_windowed(), function.binding.window.is_some()) {
        (true, false) => {
            return Ok(Some(format!(
                "module `{module}` implements `{name}`, but the binding has no `window` settings; bind a window function as a new function with `window`"
            )));
        }
        (false, true) => {
            return Ok(Some(format!(
                "module `{module}` implements `{name}`, but the binding is windowed: build it against `weir:window`"
            )));
        }
        _ => {}
    }
    let serving = function.stable.into_iter().chain(
        function
            .rollout
            .iter()
            .flat_map(|rollout| std::iter::once(rollout.stable).chain(rollout.canary)),
    );
    for number in serving {
        let Some(version) = function.versions.iter().find(|v| v.version == number) else {
            continue;
        };
        let Some(other) = state.modules.world_of(&version.module).await else {
            continue;
        };
        if other != world {
            return Ok(Some(format!(
                "module `{module}` implements `{name}` and version {number}, which serves, implements `{}`: the versions of a function implement one world; deploy it as a new function",
                other.wit_name()
            )));
        }
    }
    Ok(None)
}

/// Why a function that has versions (and so may have a consumer, applied
/// sequences, state and open windows) cannot take `next` in place of its
/// binding `now`, if it cannot.
fn binding_change_problem(name: &str, now: &Binding, next: &Binding) -> Option<String> {
    // Its durable consumer, applied sequences and state belong to one
    // stream.
    if now.stream != next.stream {
        return Some(format!(
            "function `{name}` reads stream `{}`; deploy a new function to read `{}`",
            now.stream, next.stream
        ));
    }
    match (&now.window, &next.window) {
        (Some(now), Some(next)) => now
            .change_problem(next)
            .map(|problem| format!("function `{name}`: {problem}")),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => Some(format!(
            "function `{name}` is {} function; a binding cannot switch between per-event and windowed: deploy a new function",
            if now.window.is_some() {
                "a windowed"
            } else {
                "a per-event"
            }
        )),
    }
}

#[utoipa::path(get, path = "/v1/namespaces/{namespace}/functions/{name}", tag = "functions",
    summary = "A function with its rollout, versions and statistics",
    description = "Needs a token with the `read` role in the namespace.",
    params(super::openapi::FunctionPath),
    responses(
        (status = 200, description = "The function", body = FunctionRecord),
        (status = 404, description = "No such function", body = ErrorBody),
        Refused,
    ),
    security(("bearer" = [])))]
pub(super) async fn get_function(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<FunctionRecord>, ApiError> {
    caller(&state, &headers)
        .await?
        .require(&namespace, Role::Read)?;
    names(&namespace, &name)?;
    state
        .store
        .get_function(&namespace, &name)
        .await?
        .map(Json)
        .ok_or_else(|| no_function(&namespace, &name))
}

/// `GET .../rollout`: the same view as the function's own route.
#[utoipa::path(get, path = "/v1/namespaces/{namespace}/functions/{name}/rollout", tag = "functions",
    summary = "The function with its rollout and per-version statistics",
    description = "Needs a token with the `read` role in the namespace.",
    params(super::openapi::FunctionPath),
    responses(
        (status = 200, description = "The function", body = FunctionRecord),
        (status = 404, description = "No such function", body = ErrorBody),
        Refused,
    ),
    security(("bearer" = [])))]
pub(super) async fn get_rollout(
    state: State<ApiState>,
    headers: HeaderMap,
    path: Path<(String, String)>,
) -> Result<Json<FunctionRecord>, ApiError> {
    get_function(state, headers, path).await
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct FunctionSummary {
    name: String,
    stable: Option<i32>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct FunctionList {
    functions: Vec<FunctionSummary>,
}

#[utoipa::path(get, path = "/v1/namespaces/{namespace}/functions", tag = "functions",
    summary = "The namespace's functions and the version each serves",
    description = "Needs a token with the `read` role in the namespace.",
    params(super::openapi::NamespacePath),
    responses((status = 200, description = "The functions", body = FunctionList), Refused),
    security(("bearer" = [])))]
pub(super) async fn list_functions(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(namespace): Path<String>,
) -> Result<Json<FunctionList>, ApiError> {
    caller(&state, &headers)
        .await?
        .require(&namespace, Role::Read)?;
    let functions = state
        .store
        .list_functions(&namespace)
        .await?
        .into_iter()
        .map(|(name, stable)| FunctionSummary { name, stable })
        .collect();
    Ok(Json(FunctionList { functions }))
}

#[utoipa::path(delete, path = "/v1/namespaces/{namespace}/functions/{name}", tag = "functions",
    summary = "Remove a function and its versions",
    description = "Needs a token with the `deploy` role in the namespace.",
    params(super::openapi::FunctionPath),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such function", body = ErrorBody),
        Refused,
    ),
    security(("bearer" = [])))]
pub(super) async fn delete_function(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller(&state, &headers)
        .await?
        .require(&namespace, Role::Deploy)?;
    names(&namespace, &name)?;
    match state.store.delete_function(&namespace, &name).await? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(no_function(&namespace, &name)),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewVersion {
    /// The digest of an uploaded module.
    module: String,
    /// Reprocess the stream from here when this version becomes stable,
    /// with the function's state cleared.
    #[serde(default)]
    replay_from: Option<super::store::ReplayFrom>,
}

#[utoipa::path(post, path = "/v1/namespaces/{namespace}/functions/{name}/versions", tag = "functions",
    summary = "Make the next version from an uploaded module and the current binding",
    description = "Needs a token with the `deploy` role in the namespace.",
    params(super::openapi::FunctionPath),
    request_body = NewVersion,
    responses(
        (status = 201, description = "The version", body = VersionRecord),
        (status = 404, description = "No such function", body = ErrorBody),
        (status = 409, description = "The module implements another world than the binding or the function's other versions", body = ErrorBody),
        Refused, BodyRefused,
    ),
    security(("bearer" = [])))]
pub(super) async fn create_version(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    body: Result<Json<NewVersion>, JsonRejection>,
) -> Result<(StatusCode, Json<VersionRecord>), ApiError> {
    let principal = caller(&state, &headers).await?;
    principal.require(&namespace, Role::Deploy)?;
    names(&namespace, &name)?;
    let Json(request) = body?;
    if let Some(super::store::ReplayFrom::TimeMs(ms)) = request.replay_from {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        if !(0..=now_ms).contains(&ms) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                "replay_from.time_ms must be a past time, in ms since the Unix epoch",
            ));
        }
    }
    // The version takes the function's binding as it is stored, which may
    // predate what the namespace owns now.
    if let Some(existing) = state.store.get_function(&namespace, &name).await? {
        let owned = state.store.namespace_resources(&namespace).await?;
        let binding = &existing.binding;
        if let Some(problem) = owned.binding_problem(
            &namespace,
            &binding.stream,
            &binding.subject,
            &binding.publishes(),
        ) {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", problem));
        }
        if let Some(problem) = world_problem(&state, &namespace, &existing, &request.module).await?
        {
            return Err(ApiError::new(StatusCode::CONFLICT, "conflict", problem));
        }
    }
    let version = state
        .store
        .create_version(&namespace, &name, &request.module, request.replay_from)
        .await?;
    tracing::info!(%namespace, function = %name, version = version.version, module = %version.module, by = %principal.token_id, "version created");
    Ok((StatusCode::CREATED, Json(version)))
}

#[utoipa::path(put, path = "/v1/namespaces/{namespace}/functions/{name}/rollout", tag = "functions",
    summary = "Set which versions serve: stable, and a canary for a share of keys",
    description = "Needs a token with the `deploy` role in the namespace.",
    params(super::openapi::FunctionPath),
    request_body = Rollout,
    responses(
        (status = 200, description = "The function with its new rollout", body = FunctionRecord),
        (status = 404, description = "No such function", body = ErrorBody),
        Refused, BodyRefused,
    ),
    security(("bearer" = [])))]
pub(super) async fn set_rollout(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    body: Result<Json<Rollout>, JsonRejection>,
) -> Result<Json<FunctionRecord>, ApiError> {
    caller(&state, &headers)
        .await?
        .require(&namespace, Role::Deploy)?;
    names(&namespace, &name)?;
    let Json(rollout) = body?;
    if let Some(problem) = rollout.problem() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            problem,
        ));
    }
    if state.store.get_function(&namespace, &name).await?.is_none() {
        return Err(no_function(&namespace, &name));
    }
    state.store.set_rollout(&namespace, &name, &rollout).await?;
    current(&state, &namespace, &name).await
}

pub(super) async fn current(
    state: &ApiState,
    namespace: &str,
    name: &str,
) -> Result<Json<FunctionRecord>, ApiError> {
    state
        .store
        .get_function(namespace, name)
        .await?
        .map(Json)
        .ok_or_else(|| no_function(namespace, name))
}

#[utoipa::path(post, path = "/v1/namespaces/{namespace}/functions/{name}/rollout/promote", tag = "functions",
    summary = "The canary becomes the stable version",
    description = "Needs a token with the `deploy` role in the namespace.",
    params(super::openapi::FunctionPath),
    responses(
        (status = 200, description = "The function with its new rollout", body = FunctionRecord),
        (status = 404, description = "No such function", body = ErrorBody),
        Refused,
    ),
    security(("bearer" = [])))]
pub(super) async fn promote(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(function): Path<(String, String)>,
) -> Result<Json<FunctionRecord>, ApiError> {
    end_canary(&state, &headers, function, true).await
}

#[utoipa::path(post, path = "/v1/namespaces/{namespace}/functions/{name}/rollout/rollback", tag = "functions",
    summary = "Every key back on the stable version",
    description = "Needs a token with the `deploy` role in the namespace.",
    params(super::openapi::FunctionPath),
    responses(
        (status = 200, description = "The function with its new rollout", body = FunctionRecord),
        (status = 404, description = "No such function", body = ErrorBody),
        Refused,
    ),
    security(("bearer" = [])))]
pub(super) async fn rollback(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(function): Path<(String, String)>,
) -> Result<Json<FunctionRecord>, ApiError> {
    end_canary(&state, &headers, function, false).await
}

/// Promotes the canary, or rolls it back.
pub(super) async fn end_canary(
    state: &ApiState,
    headers: &HeaderMap,
    (namespace, name): (String, String),
    promote: bool,
) -> Result<Json<FunctionRecord>, ApiError> {
    caller(state, headers)
        .await?
        .require(&namespace, Role::Deploy)?;
    names(&namespace, &name)?;
    if state.store.get_function(&namespace, &name).await?.is_none() {
        return Err(no_function(&namespace, &name));
    }
    match promote {
        true => state.store.promote(&namespace, &name).await?,
        false => state.store.rollback(&namespace, &name, None).await?,
    };
    current(state, &namespace, &name).await
}
