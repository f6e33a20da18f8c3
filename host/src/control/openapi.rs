//! The API's OpenAPI 3.1 document, served at `/v1/openapi.json`. It is not
//! written by hand: `utoipa` derives it from the `#[utoipa::path]` of each
//! handler (the same attribute that `api::routes` registers the route
//! with) and from the request and response types themselves, so it cannot
//! list a route the router lacks or a field the types do not have. What
//! lives here is what every route shares: the document's header, the
//! bearer scheme, the error body, and the refusals common to many routes.

use std::sync::LazyLock;

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

/// The document's header and security scheme; the paths come from the
/// router (`api::routes`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Weir API",
        description = "Deploy WebAssembly component functions over NATS JetStream: modules, functions, versions, rollouts, tokens, logs and dead letters. Every error is JSON `{error, message}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    modifiers(&BearerScheme)
)]
pub(super) struct ApiDoc;

/// Adds the `bearer` security scheme the routes' `security` refers to.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document, derived once from the routes.
static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> =
    LazyLock::new(|| super::api::routes().split_for_parts().1);

/// The OpenAPI document of the API.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    &DOCUMENT
}

/// Every refusal's body.
#[derive(Serialize, ToSchema)]
pub(super) struct ErrorBody {
    /// A stable code: `unauthorized`, `forbidden`, `not_found`,
    /// `invalid_body`, `rate_limited`, ...
    pub error: &'static str,
    /// What went wrong, for a person.
    pub message: String,
}

/// Raw component bytes, as uploaded.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub(super) struct WasmComponent(#[allow(dead_code)] Vec<u8>);

/// What any call with a token may be refused with.
#[derive(IntoResponses)]
#[allow(dead_code)] // only its documentation is used
pub(super) enum Refused {
    /// The request's parameters are malformed.
    #[response(status = 400)]
    Malformed(#[to_schema] ErrorBody),
    /// No token, or not a valid, live one.
    #[response(status = 401)]
    Unauthorized(#[to_schema] ErrorBody),
    /// The token's namespace or role does not allow the call.
    #[response(status = 403)]
    Forbidden(#[to_schema] ErrorBody),
    /// A name, parameter or body the call cannot take; the message names it.
    #[response(status = 422)]
    Invalid(#[to_schema] ErrorBody),
    /// Too many requests from this client, token or namespace; see `Retry-After`.
    #[response(status = 429)]
    RateLimited(#[to_schema] ErrorBody),
    /// A store the call needs is unavailable; try again.
    #[response(status = 503)]
    Unavailable(#[to_schema] ErrorBody),
}

/// What a call with a JSON body may be refused with, beyond [`Refused`].
#[derive(IntoResponses)]
#[allow(dead_code)] // only its documentation is used
pub(super) enum BodyRefused {
    /// The body is larger than the API takes.
    #[response(status = 413)]
    TooLarge(#[to_schema] ErrorBody),
    /// The body is not `application/json`.
    #[response(status = 415)]
    UnsupportedMediaType(#[to_schema] ErrorBody),
}

/// The path of a namespace's routes.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // only its documentation is used
pub(super) struct NamespacePath {
    /// The namespace (not `weir`, which is reserved).
    #[param(pattern = "^[a-z0-9-]{1,63}$")]
    namespace: String,
}

/// The path of a function's routes.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // only its documentation is used
pub(super) struct FunctionPath {
    /// The namespace (not `weir`, which is reserved).
    #[param(pattern = "^[a-z0-9-]{1,63}$")]
    namespace: String,
    /// The function's name.
    #[param(pattern = "^[a-z0-9-]{1,63}$")]
    name: String,
}

/// The path of a module's routes.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // only its documentation is used
pub(super) struct ModulePath {
    /// The module's sha256, in hex.
    digest: String,
}
