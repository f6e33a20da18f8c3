//! The API's OpenAPI 3.1 document, served at `/v1/openapi.json`. It is built
//! from [`ROUTES`], the table of every route with its role, body and
//! answers; a test calls each documented route to check the router serves
//! it. Request schemas are written here beside the types they describe.

use serde_json::{Value, json};

/// One documented operation.
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    /// The role the token needs; `None` for public routes.
    pub role: Option<&'static str>,
    /// The request body's schema name in `components.schemas`, or
    /// `"module"` for raw component bytes.
    pub body: Option<&'static str>,
    /// Success status and the statuses it may refuse with.
    pub answers: &'static [u16],
}

/// Every route of the API.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/v1/openapi.json",
        summary: "This document",
        role: None,
        body: None,
        answers: &[200],
    },
    RouteDoc {
        method: "post",
        path: "/v1/modules",
        summary: "Upload a component: checked, compiled ahead, stored by sha256",
        role: Some("deploy"),
        body: Some("module"),
        answers: &[201, 200, 400, 401, 403, 408, 409, 413, 422, 429],
    },
    RouteDoc {
        method: "get",
        path: "/v1/modules/{digest}",
        summary: "A stored module",
        role: Some("read"),
        body: None,
        answers: &[200, 401, 403, 404, 429],
    },
    RouteDoc {
        method: "delete",
        path: "/v1/modules/{digest}",
        summary: "Let go of the namespace's hold on a module; one nothing holds or uses is deleted",
        role: Some("deploy"),
        body: None,
        answers: &[204, 401, 403, 404, 409, 429],
    },
    RouteDoc {
        method: "post",
        path: "/v1/tokens",
        summary: "Create a token for a namespace and role (shown once)",
        role: Some("admin"),
        body: Some("NewToken"),
        answers: &[201, 400, 401, 403, 409, 415, 422, 429],
    },
    RouteDoc {
        method: "get",
        path: "/v1/tokens",
        summary: "A namespace's tokens (`?namespace=`; the caller's by default), without the tokens themselves",
        role: Some("admin"),
        body: None,
        answers: &[200, 401, 403, 422, 429],
    },
    RouteDoc {
        method: "delete",
        path: "/v1/tokens/{id}",
        summary: "Revoke a token",
        role: Some("admin"),
        body: None,
        answers: &[204, 401, 404, 429],
    },
    RouteDoc {
        method: "get",
        path: "/v1/namespaces/{namespace}/functions",
        summary: "The namespace's functions and the version each serves",
        role: Some("read"),
        body: None,
        answers: &[200, 401, 403, 429],
    },
    RouteDoc {
        method: "put",
        path: "/v1/namespaces/{namespace}/functions/{name}",
        summary: "Create or replace a function's binding",
        role: Some("deploy"),
        body: Some("Binding"),
        answers: &[201, 200, 400, 401, 403, 415, 422, 429],
    },
    RouteDoc {
        method: "get",
        path: "/v1/namespaces/{namespace}/functions/{name}",
        summary: "A function with its rollout, versions and statistics",
        role: Some("read"),
        body: None,
        answers: &[200, 401, 403, 404, 422, 429],
    },
    RouteDoc {
        method: "delete",
        path: "/v1/namespaces/{namespace}/functions/{name}",
        summary: "Remove a function and its versions",
        role: Some("deploy"),
        body: None,
        answers: &[204, 401, 403, 404, 422, 429],
    },
    RouteDoc {
        method: "get",
        path: "/v1/namespaces/{namespace}/resources",
        summary: "The streams and subjects the namespace owns",
        role: Some("read"),
        body: None,
        answers: &[200, 401, 403, 422, 429],
    },
    RouteDoc {
        method: "put",
        path: "/v1/namespaces/{namespace}/resources",
        summary: "Replace the streams and subjects the namespace owns (an admin of every namespace only)",
        role: Some("admin"),
        body: Some("Resources"),
        answers: &[200, 400, 401, 403, 415, 422, 429],
    },
    RouteDoc {
        method: "get",
        path: "/v1/namespaces/{namespace}/functions/{name}/logs",
        summary: "The function's guest log lines kept (`?after_seq=`, `?since_ms=`, `?limit=`); ask again from `last_seq` to follow",
        role: Some("read"),
        body: None,
        answers: &[200, 401, 403, 422, 429, 503],
    },
    RouteDoc {
        method: "get",
        path: "/v1/namespaces/{namespace}/functions/{name}/dead-letters",
        summary: "The function's dead letters kept, with the headers saying why (`?after_seq=`, `?since_ms=`, `?limit=`)",
        role: Some("read"),
        body: None,
        answers: &[200, 401, 403, 422, 429, 503],
    },
    RouteDoc {
        method: "post",
        path: "/v1/namespaces/{namespace}/functions/{name}/versions",
        summary: "Make the next version from an uploaded module and the current binding",
        role: Some("deploy"),
        body: Some("NewVersion"),
        answers: &[201, 400, 401, 403, 404, 415, 422, 429],
    },
    RouteDoc {
        method: "get",
        path: "/v1/namespaces/{namespace}/functions/{name}/rollout",
        summary: "The function with its rollout and per-version statistics",
        role: Some("read"),
        body: None,
        answers: &[200, 401, 403, 404, 422, 429],
    },
    RouteDoc {
        method: "put",
        path: "/v1/namespaces/{namespace}/functions/{name}/rollout",
        summary: "Set which versions serve: stable, and a canary for a share of keys",
        role: Some("deploy"),
        body: Some("Rollout"),
        answers: &[200, 400, 401, 403, 404, 415, 422, 429],
    },
    RouteDoc {
        method: "post",
        path: "/v1/namespaces/{namespace}/functions/{name}/rollout/promote",
        summary: "The canary becomes the stable version",
        role: Some("deploy"),
        body: None,
        answers: &[200, 401, 403, 422, 429],
    },
    RouteDoc {
        method: "post",
        path: "/v1/namespaces/{namespace}/functions/{name}/rollout/rollback",
        summary: "Every key back on the stable version",
        role: Some("deploy"),
        body: None,
        answers: &[200, 401, 403, 422, 429],
    },
];

fn schemas() -> Value {
    let key_source = json!({"oneOf": [
        {"type": "object", "required": ["subject_token"], "properties": {"subject_token": {"type": "integer", "minimum": 0}}, "additionalProperties": false},
        {"type": "object", "required": ["header"], "properties": {"header": {"type": "string"}}, "additionalProperties": false},
        {"type": "object", "required": ["json_pointer"], "properties": {"json_pointer": {"type": "string"}}, "additionalProperties": false}
    ]});
    let time_source = json!({"oneOf": [
        {"const": "message_timestamp"},
        {"type": "object", "required": ["header"], "properties": {"header": {"type": "string"}}, "additionalProperties": false},
        {"type": "object", "required": ["json_pointer"], "properties": {"json_pointer": {"type": "string"}}, "additionalProperties": false}
    ]});
    let integers = |names: &[&str]| -> Value {
        names
            .iter()
            .map(|n| (n.to_string(), json!({"type": "integer", "minimum": 0})))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    json!({
        "Error": {"type": "object", "required": ["error", "message"], "properties": {
            "error": {"type": "string"}, "message": {"type": "string"}}},
        "Resources": {"type": "object", "required": ["streams", "subjects"], "additionalProperties": false, "properties": {
            "streams": {"type": "array", "items": {"type": "string"}, "description": "stream names; one ending in `*` covers the names it prefixes"},
            "subjects": {"type": "array", "items": {"type": "string"}, "description": "subject patterns inputs and outputs must stay within"}}},
        "NewToken": {"type": "object", "required": ["namespace", "role"], "additionalProperties": false, "properties": {
            "namespace": {"type": "string"}, "role": {"enum": ["read", "deploy", "admin"]},
            "name": {"type": "string", "maxLength": 200, "description": "what the token is for"},
            "ttl_secs": {"type": "integer", "minimum": 1, "maximum": 315360000, "description": "seconds until it expires; none: never"}}},
        "NewVersion": {"type": "object", "required": ["module"], "additionalProperties": false, "properties": {
            "module": {"type": "string", "description": "sha256 of an uploaded module"},
            "replay_from": {"oneOf": [
                {"type": "object", "required": ["sequence"], "properties": {"sequence": {"type": "integer", "minimum": 1}}, "additionalProperties": false},
                {"type": "object", "required": ["time_ms"], "properties": {"time_ms": {"type": "integer"}}, "additionalProperties": false}],
             "description": "reprocess from this stream position when the version becomes stable; the function's state is cleared first"}}},
        "Binding": {"type": "object", "required": ["stream", "subject", "key"], "additionalProperties": false, "properties": {
            "stream": {"type": "string"},
            "subject": {"type": "string"},
            "key": key_source,
            "event_time": time_source,
            "outputs": {"type": "array", "items": {"type": "string"}},
            "limits": {"type": "object", "additionalProperties": false, "properties": integers(&[
                "deadline_ms", "memory_bytes", "table_elements", "output_count", "output_bytes",
                "state_value_bytes", "state_entries_per_key", "log_lines"])},
            "retry": {"type": "object", "additionalProperties": false, "properties": integers(&[
                "max_attempts", "initial_backoff_ms", "max_backoff_ms"])},
            "breaker": {"type": "object", "additionalProperties": false, "properties": {
                "enabled": {"type": "boolean"},
                "window_kind": {"enum": ["count", "time"]},
                "window_size": {"type": "integer"}, "minimum_calls": {"type": "integer"},
                "failure_rate_threshold": {"type": "number"}, "slow_call_rate_threshold": {"type": "number"},
                "slow_call_duration_ms": {"type": "integer"}, "wait_in_open_ms": {"type": "integer"},
                "half_open_calls": {"type": "integer"}}},
            "batch_size": {"type": "integer", "minimum": 1, "maximum": 10000},
            "ack_wait_ms": {"type": "integer", "minimum": 100}}},
        "Rollout": {"type": "object", "required": ["stable"], "additionalProperties": false, "properties": {
            "stable": {"type": "integer"},
            "canary": {"type": ["integer", "null"]},
            "weight": {"type": "integer", "minimum": 0, "maximum": 100},
            "rollback_margin": {"type": "number", "minimum": 0, "maximum": 100},
            "rollback_min_calls": {"type": "integer", "minimum": 0}}}
    })
}

/// The OpenAPI document.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for route in ROUTES {
        let mut operation = json!({"summary": route.summary, "responses": {}});
        if let Some(role) = route.role {
            operation["security"] = json!([{"bearer": []}]);
            operation["description"] = json!(format!(
                "Needs a token with the `{role}` role in the namespace."
            ));
        }
        let parameters: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !parameters.is_empty() {
            operation["parameters"] = parameters.into();
        }
        match route.body {
            Some("module") => {
                operation["requestBody"] = json!({"required": true, "content": {
                    "application/wasm": {"schema": {"type": "string", "format": "binary"}}}});
            }
            Some(schema) => {
                operation["requestBody"] = json!({"required": true, "content": {
                    "application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
            }
            None => {}
        }
        for status in route.answers {
            let answer = if *status < 300 {
                json!({"description": "done", "content": {"application/json": {"schema": {"type": "object"}}}})
            } else {
                json!({"description": "refused", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
            };
            operation["responses"][status.to_string()] = answer;
        }
        let entry = paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}));
        entry[route.method] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Weir API", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        }
    })
}
