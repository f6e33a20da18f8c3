//! The lifecycle of API tokens: made with a name and an optional expiry, at
//! most `api.max_tokens_per_namespace` live per namespace; listed (never
//! the token itself, which is shown once); revoked. A revocation is
//! announced on [`TOKEN_CHANNEL`] in its own statement, so every host
//! forgets the token as soon as it commits (and within
//! [`super::admission::LOOKUP_TTL`] should a host's listener be down); an
//! expired token is refused from its expiry on. The bootstrap token lives
//! in the config, not here: it cannot be listed or revoked.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::api::{ApiError, ApiState, caller, is_namespace_name, reserved};
use super::auth::{ANY_NAMESPACE, AuthError, Role, hash_token, random_hex};
use super::namespaces::RESERVED_NAMESPACE;
use super::openapi::{BodyRefused, ErrorBody, Refused};

/// The Postgres channel revoked tokens' hashes are announced on.
pub const TOKEN_CHANNEL: &str = "weir_tokens";

/// Longest a token may be made to last: ten years.
const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;
/// Longest token name.
const MAX_NAME_BYTES: usize = 200;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewToken {
    /// A namespace, or `*` for every namespace.
    #[schema(pattern = "^([a-z0-9-]{1,63}|\\*)$")]
    namespace: String,
    role: Role,
    /// What the token is for, shown when tokens are listed.
    #[serde(default)]
    #[schema(max_length = 200)]
    name: String,
    /// Seconds until the token expires; none: it does not.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 315_360_000)]
    ttl_secs: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct CreatedToken {
    id: String,
    /// Shown once; only its hash is stored.
    token: String,
    namespace: String,
    role: Role,
    name: String,
    expires_ms: Option<i64>,
}

/// A token as listed: everything but the token.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct TokenInfo {
    id: String,
    name: String,
    namespace: String,
    role: String,
    created_ms: i64,
    expires_ms: Option<i64>,
    revoked: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct TokenList {
    tokens: Vec<TokenInfo>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Whose tokens: by default the caller's namespace.
    #[param(pattern = "^([a-z0-9-]{1,63}|\\*)$")]
    namespace: Option<String>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", message)
}

fn database(error: sqlx::Error) -> ApiError {
    AuthError::Database(error).into()
}

/// `POST /v1/tokens`: a token for a namespace and role.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens",
    summary = "Create a token for a namespace and role (shown once)",
    description = "Needs an `admin` token of the namespace (of every namespace for `*`).",
    request_body = NewToken,
    responses(
        (status = 201, description = "The token, shown this once", body = CreatedToken),
        (status = 409, description = "The namespace has as many live tokens as it may", body = ErrorBody),
        Refused, BodyRefused,
    ),
    security(("bearer" = [])))]
pub(super) async fn create_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<NewToken>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let principal = caller(&state, &headers).await?;
    let Json(request) = body?;
    if request.namespace != ANY_NAMESPACE && !is_namespace_name(&request.namespace) {
        return Err(invalid(
            "namespace: 1 to 63 lowercase letters, digits or `-`, or `*` for every namespace",
        ));
    }
    if request.namespace == RESERVED_NAMESPACE {
        return Err(reserved());
    }
    if request.name.len() > MAX_NAME_BYTES || request.name.chars().any(char::is_control) {
        return Err(invalid(format!(
            "name: at most {MAX_NAME_BYTES} bytes, without control characters"
        )));
    }
    if request
        .ttl_secs
        .is_some_and(|ttl| ttl == 0 || ttl > MAX_TTL_SECS)
    {
        return Err(invalid(format!(
            "ttl_secs: from 1 to {MAX_TTL_SECS} (ten years)"
        )));
    }
    principal.require(&request.namespace, Role::Admin)?;
    let pool = state.auth.pool();
    // Counted and inserted under the namespace's lock: two requests at
    // once cannot both take its last place.
    let mut tx = pool.begin().await.map_err(database)?;
    super::modules::lock(&mut tx, "tokens", &request.namespace)
        .await
        .map_err(database)?;
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM weir_tokens WHERE namespace = $1
         AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(&request.namespace)
    .fetch_one(&mut *tx)
    .await
    .map_err(database)?;
    if live >= i64::from(state.max_tokens_per_namespace) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_tokens",
            format!(
                "namespace `{}` has {live} live tokens, the most it may have; revoke some first (DELETE /v1/tokens/{{id}})",
                request.namespace
            ),
        ));
    }
    let token = format!("weir_{}", random_hex(24)?);
    let id = format!("tok_{}", random_hex(8)?);
    let ttl = request
        .ttl_secs
        .map(|secs| i64::try_from(secs).unwrap_or(i64::MAX));
    let expires_ms: Option<i64> = sqlx::query_scalar(
        "INSERT INTO weir_tokens (id, hash, namespace, role, name, expires_at)
         VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
         RETURNING (extract(epoch FROM expires_at) * 1000)::int8",
    )
    .bind(&id)
    .bind(hash_token(&token))
    .bind(&request.namespace)
    .bind(request.role.as_str())
    .bind(&request.name)
    .bind(ttl.map(|secs| secs as f64))
    .fetch_one(&mut *tx)
    .await
    .map_err(database)?;
    tx.commit().await.map_err(database)?;
    tracing::info!(%id, namespace = %request.namespace, role = request.role.as_str(), name = %request.name, ?expires_ms, by = %principal.token_id, "API token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id,
            token,
            namespace: request.namespace,
            role: request.role,
            name: request.name,
            expires_ms,
        }),
    ))
}

/// `GET /v1/tokens?namespace=ns`: the namespace's tokens (the caller's
/// namespace without the parameter; every token for an admin of `*` asking
/// for `*`). Needs the admin role there.
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    summary = "A namespace's tokens, without the tokens themselves",
    description = "Needs an `admin` token of the namespace.",
    params(ListQuery),
    responses((status = 200, description = "The tokens", body = TokenList), Refused),
    security(("bearer" = [])))]
pub(super) async fn list_tokens(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<TokenList>, ApiError> {
    let principal = caller(&state, &headers).await?;
    let Query(query) = query.map_err(|e| invalid(e.body_text()))?;
    let namespace = query
        .namespace
        .unwrap_or_else(|| principal.namespace.clone());
    principal.require(&namespace, Role::Admin)?;
    let rows = sqlx::query(
        "SELECT id, name, namespace, role,
                (extract(epoch FROM created_at) * 1000)::int8,
                (extract(epoch FROM expires_at) * 1000)::int8,
                revoked_at IS NOT NULL
         FROM weir_tokens WHERE namespace = $1 OR $1 = '*' ORDER BY created_at, id",
    )
    .bind(&namespace)
    .fetch_all(state.auth.pool())
    .await
    .map_err(database)?;
    let tokens = rows
        .iter()
        .map(|row| {
            Ok(TokenInfo {
                id: row.try_get(0)?,
                name: row.try_get(1)?,
                namespace: row.try_get(2)?,
                role: row.try_get(3)?,
                created_ms: row.try_get(4)?,
                expires_ms: row.try_get(5)?,
                revoked: row.try_get(6)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(database)?;
    Ok(Json(TokenList { tokens }))
}

/// `DELETE /v1/tokens/{id}`: revokes a token. Needs the admin role in the
/// token's namespace.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    summary = "Revoke a token",
    description = "Needs an `admin` token of the token's namespace.",
    params(("id" = String, Path, description = "The token's id (`tok_...`)")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such token in a namespace the caller administers", body = ErrorBody),
        Refused,
    ),
    security(("bearer" = [])))]
pub(super) async fn revoke_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let principal = caller(&state, &headers).await?;
    let pool = state.auth.pool();
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no token `{id}`"),
        )
    };
    let namespace: Option<String> =
        sqlx::query_scalar("SELECT namespace FROM weir_tokens WHERE id = $1")
            .bind(&id)
            .fetch_optional(pool)
            .await
            .map_err(database)?;
    // Another namespace's token is as good as absent to this caller.
    let Some(namespace) = namespace else {
        return Err(not_found());
    };
    if principal.require(&namespace, Role::Admin).is_err() {
        return Err(not_found());
    }
    // Announced in the same statement: no host can miss a revocation
    // that committed.
    let hash: Option<String> = sqlx::query_scalar(
        "WITH revoked AS (
             UPDATE weir_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING hash
         )
         SELECT hash FROM revoked, LATERAL (SELECT pg_notify($2, hash)) announced",
    )
    .bind(&id)
    .bind(TOKEN_CHANNEL)
    .fetch_optional(pool)
    .await
    .map_err(database)?;
    if let Some(hash) = hash {
        state.auth.forget(&hash);
    }
    tracing::info!(%id, %namespace, by = %principal.token_id, "API token revoked");
    Ok(StatusCode::NO_CONTENT)
}
