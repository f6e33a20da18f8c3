//! The control-plane API: uploads checked, compiled ahead and stored once by
//! digest; bad uploads refused with the reason and nothing stored; tokens,
//! roles and namespaces; a rate limit per token; and bad calls, including
//! fuzzed bodies, answered with 4xx JSON, never a 5xx.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;
use weir_host::config::Secret;

pub(crate) const ADMIN: &str = "weir_bootstrap_for_tests";

/// Starts a host serving the API (and no functions) with these limits.
async fn api_host(
    stack: &Stack,
    max_module_bytes: usize,
    requests_per_second: u32,
) -> Result<(RunningHost, SocketAddr)> {
    api_host_with(stack, vec![], |api| {
        api.max_module_bytes = max_module_bytes;
        api.requests_per_second = requests_per_second;
    })
    .await
}

/// Starts a host serving the API over `streams` (and no functions), its
/// API settings adjusted by `adjust`, and waits until it answers.
pub(crate) async fn api_host_with(
    stack: &Stack,
    streams: Vec<weir_host::config::StreamSpec>,
    adjust: impl FnOnce(&mut weir_host::config::ApiConfig),
) -> Result<(RunningHost, SocketAddr)> {
    let address: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut config = stack.config(streams, vec![]);
    config.api.listen = Some(address);
    config.api.bootstrap_token = Some(Secret(ADMIN.into()));
    adjust(&mut config.api);
    let host = RunningHost::start(config);
    eventually(Duration::from_secs(60), "the API", || async {
        host.check()?;
        Ok(http_get(address, "/v1/nothing").await.is_ok())
    })
    .await?;
    Ok((host, address))
}

pub(crate) fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A call of the API as `token` with a body of `content_type`.
pub(crate) async fn request(
    address: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> Result<HttpResponse> {
    let auth = bearer(token);
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", content_type),
    ];
    http_request(address, method, path, &headers, body).await
}

pub(crate) async fn post(
    address: SocketAddr,
    path: &str,
    token: &str,
    content_type: &str,
    body: &[u8],
) -> Result<HttpResponse> {
    request(address, token, "POST", path, content_type, body).await
}

async fn new_token(address: SocketAddr, namespace: &str, role: &str) -> Result<String> {
    let body = serde_json::json!({"namespace": namespace, "role": role}).to_string();
    let response = post(
        address,
        "/v1/tokens",
        ADMIN,
        "application/json",
        body.as_bytes(),
    )
    .await?;
    anyhow::ensure!(response.status == 201, "{response:?}");
    Ok(response.json()?["token"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// An upload, with the admin token, that declares 1,000 bytes, sends `sent`
/// of them and then waits: it holds an upload slot until the host gives
/// up on it or the stream is dropped.
pub(crate) async fn stalled_upload(
    address: SocketAddr,
    sent: usize,
) -> Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let head = format!(
        "POST /v1/modules HTTP/1.1\r\nHost: weir\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: application/wasm\r\nContent-Length: 1000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&vec![0u8; sent.min(999)]).await?;
    Ok(stream)
}

/// Status, `error` and `message` of a refused call; fails unless the body
/// is the API's error JSON.
pub(crate) fn refusal(response: &HttpResponse) -> Result<(u16, String, String)> {
    let body = response.json()?;
    let text = |field: &str| body[field].as_str().map(str::to_string);
    match (text("error"), text("message")) {
        (Some(error), Some(message)) => Ok((response.status, error, message)),
        _ => anyhow::bail!("not an error body: {response:?}"),
    }
}

fn wat_fixture(name: &str) -> Result<Vec<u8>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/wat")
        .join(format!("{name}.wat"));
    Ok(wat::parse_file(path)?)
}

#[sqlx::test(migrations = false)]
async fn uploads_are_checked_compiled_ahead_and_stored_once(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host(&stack, 1 << 20, 1_000).await?;
    let deployer = new_token(address, "shop", "deploy").await?;
    let pool = stack.pool().await?;
    let stored = || async {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM weir_modules")
            .fetch_one(&pool)
            .await?;
        anyhow::Ok(count)
    };

    let passthrough = std::fs::read(component("passthrough")?)?;
    let bad = [
        ("empty", Vec::new(), 422, "the upload is empty"),
        (
            "not wasm",
            b"#!/bin/sh\necho hi\n".to_vec(),
            422,
            "not WebAssembly",
        ),
        (
            "core module",
            b"\0asm\x01\0\0\0".to_vec(),
            422,
            "a core WebAssembly module, not a component",
        ),
        (
            "truncated",
            passthrough[..passthrough.len() / 2].to_vec(),
            422,
            "not a valid component",
        ),
        (
            "wrong world",
            wat::parse_str("(component)")?,
            422,
            "exports none of Weir's worlds: `weir:function/event-handler` (a `handle` function)",
        ),
        (
            "imports wasi:http",
            wat_fixture("imports-http")?,
            422,
            "it imports `wasi:http/outgoing-handler@0.2.0`, which Weir does not provide. Weir functions make no HTTP requests",
        ),
        ("over the limit", vec![0u8; 2 << 20], 413, ""),
    ];
    for (what, bytes, status, expected) in bad {
        let response = post(
            address,
            "/v1/modules",
            &deployer,
            "application/wasm",
            &bytes,
        )
        .await?;
        let (got, code, message) = refusal(&response)?;
        assert_eq!(got, status, "{what}: {message}");
        assert!(message.contains(expected), "{what}: {message}");
        if status == 422 {
            assert_eq!(code, "invalid_module", "{what}");
        } else {
            assert_eq!(code, "too_large", "{what}");
        }
        assert_eq!(stored().await?, 0, "{what}: nothing stored");
    }

    let digest = hex::encode(Sha256::digest(&passthrough));
    let first = post(
        address,
        "/v1/modules",
        &deployer,
        "application/wasm",
        &passthrough,
    )
    .await?;
    assert_eq!(first.status, 201, "{first:?}");
    let body = first.json()?;
    assert_eq!(body["digest"], digest.as_str());
    assert_eq!(body["created"], true);
    assert_eq!(body["size"], passthrough.len() as u64);
    assert_eq!(body["world"], "weir:function/event-handler@0.1.0");
    let again = post(
        address,
        "/v1/modules",
        &deployer,
        "application/wasm",
        &passthrough,
    )
    .await?;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()?["digest"], digest.as_str());
    assert_eq!(again.json()?["created"], false);
    assert_eq!(stored().await?, 1);
    // Compiled once, by the upload: a host running it loads the artifact.
    let artifacts: Vec<String> = std::fs::read_dir(stack.artifacts.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|name| name.starts_with(&digest))
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");

    let auth = bearer(&deployer);
    let read = http_request(
        address,
        "GET",
        &format!("/v1/modules/{digest}"),
        &[("Authorization", &auth)],
        &[],
    )
    .await?;
    assert_eq!(read.status, 200);
    assert_eq!(read.json()?["size"], passthrough.len() as u64);
    let missing = http_request(
        address,
        "GET",
        "/v1/modules/0000",
        &[("Authorization", &auth)],
        &[],
    )
    .await?;
    assert_eq!(refusal(&missing)?.0, 404);
    host.stop().await
}

#[sqlx::test(migrations = false)]
async fn tokens_roles_namespaces_and_rate_limits(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host(&stack, 1 << 20, 5).await?;
    let reader = new_token(address, "shop", "read").await?;
    let deployer = new_token(address, "shop", "deploy").await?;
    let shop_admin = new_token(address, "shop", "admin").await?;

    let anonymous = http_request(address, "GET", "/v1/modules/x", &[], &[]).await?;
    assert_eq!(refusal(&anonymous)?.0, 401);
    assert_eq!(anonymous.header("www-authenticate"), Some("Bearer"));
    let forged = http_request(
        address,
        "GET",
        "/v1/modules/x",
        &[("Authorization", "Bearer weir_not_a_token")],
        &[],
    )
    .await?;
    assert_eq!(refusal(&forged)?.0, 401);

    let upload = post(
        address,
        "/v1/modules",
        &reader,
        "application/wasm",
        b"\0asm",
    )
    .await?;
    let (status, code, message) = refusal(&upload)?;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    assert!(message.contains("needs the `deploy` role"), "{message}");

    let token_body = |ns: &str| serde_json::json!({"namespace": ns, "role": "read"}).to_string();
    let by_deployer = post(
        address,
        "/v1/tokens",
        &deployer,
        "application/json",
        token_body("shop").as_bytes(),
    )
    .await?;
    assert_eq!(refusal(&by_deployer)?.0, 403);
    let across = post(
        address,
        "/v1/tokens",
        &shop_admin,
        "application/json",
        token_body("billing").as_bytes(),
    )
    .await?;
    let (status, _, message) = refusal(&across)?;
    assert_eq!(status, 403);
    assert!(
        message.contains("namespace `shop`, not `billing`"),
        "{message}"
    );
    let own = post(
        address,
        "/v1/tokens",
        &shop_admin,
        "application/json",
        token_body("shop").as_bytes(),
    )
    .await?;
    assert_eq!(own.status, 201, "{own:?}");

    // Stored hashed: no row holds a token as issued.
    let pool = stack.pool().await?;
    let hashes: Vec<String> = sqlx::query_scalar("SELECT hash FROM weir_tokens")
        .fetch_all(&pool)
        .await?;
    assert_eq!(hashes.len(), 4);
    for token in [&reader, &deployer, &shop_admin] {
        assert!(!hashes.contains(token));
    }

    // 5 requests a second with bursts of 10: a fresh token gets 10, then
    // 429 with a Retry-After.
    let limited = new_token(address, "shop", "read").await?;
    let auth = bearer(&limited);
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..30 {
        let response = http_request(
            address,
            "GET",
            "/v1/modules/x",
            &[("Authorization", &auth)],
            &[],
        )
        .await?;
        if response.status == 429 {
            retry_after = response.header("retry-after").map(str::to_string);
        }
        statuses.push(response.status);
    }
    assert_eq!(statuses[..10], [404; 10], "{statuses:?}");
    assert!(
        statuses.iter().filter(|s| **s == 429).count() >= 15,
        "{statuses:?}"
    );
    assert_eq!(retry_after.as_deref(), Some("1"));
    host.stop().await
}

/// A small deterministic generator (xorshift64*), so a failing body can be
/// reproduced from the seed.
struct Fuzz(u64);

impl Fuzz {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn json(&mut self, depth: u32) -> serde_json::Value {
        use serde_json::Value;
        let keys = [
            "namespace",
            "role",
            "extra",
            "",
            "Namespace",
            "role\u{0}",
            "stream",
            "subject",
            "key",
            "json_pointer",
            "outputs",
            "limits",
            "batch_size",
            "stable",
            "canary",
            "weight",
            "module",
            "retry",
            "breaker",
        ];
        let words = [
            "shop", "read", "deploy", "admin", "*", "", "Shop", "root", "ü", "S", "s.in", "/k",
        ];
        match self.below(if depth > 2 { 6 } else { 8 }) {
            0 => Value::Null,
            1 => Value::Bool(self.below(2) == 0),
            2 => Value::from(self.next() as i64),
            3 => Value::from(f64::from(self.below(1000) as u32) / 7.0),
            4 | 5 => Value::from(words[self.below(words.len() as u64) as usize]),
            6 => Value::Array((0..self.below(4)).map(|_| self.json(depth + 1)).collect()),
            _ => Value::Object(
                (0..self.below(4))
                    .map(|_| {
                        let key = keys[self.below(keys.len() as u64) as usize].to_string();
                        (key, self.json(depth + 1))
                    })
                    .collect(),
            ),
        }
    }

    fn body(&mut self) -> Vec<u8> {
        let valid = br#"{"namespace":"shop","role":"read"}"#;
        match self.below(4) {
            // Random bytes.
            0 => (0..self.below(64)).map(|_| self.next() as u8).collect(),
            // A valid body with a byte changed or cut short.
            1 => {
                let mut body = valid.to_vec();
                let at = self.below(body.len() as u64) as usize;
                if self.below(2) == 0 {
                    body[at] = self.next() as u8;
                } else {
                    body.truncate(at);
                }
                body
            }
            // Any JSON value, shaped like the real one or not.
            _ => {
                let mut value = self.json(0);
                if self.below(2) == 0 {
                    value = serde_json::json!({"namespace": self.json(2), "role": self.json(2)});
                }
                value.to_string().into_bytes()
            }
        }
    }
}

#[sqlx::test(migrations = false)]
async fn bad_calls_get_4xx_json_and_fuzzed_bodies_never_a_5xx(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host(&stack, 1 << 20, 100_000).await?;
    let json = "application/json";
    // (method, path, content type, body, status, error code)
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [u8], u16, &'a str);
    let cases: [Case; 13] = [
        // Strings Postgres or NATS cannot hold, numbers the host cannot run:
        // 422 naming the field, never a 503 from the database.
        (
            "PUT",
            "/v1/namespaces/shop/functions/f",
            json,
            br#"{"stream":"S\u0000","subject":"s","key":{"subject_token":0}}"#,
            422,
            "invalid_body",
        ),
        (
            "PUT",
            "/v1/namespaces/shop/functions/f",
            json,
            br#"{"stream":"S","subject":"s","key":{"json_pointer":"/k\u0000"}}"#,
            422,
            "invalid_body",
        ),
        (
            "PUT",
            "/v1/namespaces/shop/functions/f",
            json,
            br#"{"stream":"S","subject":"s","key":{"subject_token":0},"ack_wait_ms":18446744073709551615}"#,
            422,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/tokens",
            json,
            b"{\"namespace\": ",
            400,
            "malformed_body",
        ),
        (
            "POST",
            "/v1/tokens",
            json,
            br#"{"namespace":"shop","role":"read","ttl":5}"#,
            422,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/tokens",
            json,
            br#"{"namespace":"shop"}"#,
            422,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/tokens",
            json,
            br#"{"namespace":5,"role":"read"}"#,
            422,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/tokens",
            json,
            br#"{"namespace":"shop","role":"root"}"#,
            422,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/tokens",
            json,
            br#"{"namespace":"Has Space","role":"read"}"#,
            422,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/tokens",
            "text/plain",
            br#"{"namespace":"shop","role":"read"}"#,
            415,
            "unsupported_media_type",
        ),
        ("GET", "/v1/nowhere", json, b"", 404, "not_found"),
        ("DELETE", "/v1/tokens", json, b"", 405, "method_not_allowed"),
        ("PUT", "/v1/modules", json, b"", 405, "method_not_allowed"),
    ];
    let auth = bearer(ADMIN);
    for (method, path, content_type, body, status, code) in cases {
        let response = http_request(
            address,
            method,
            path,
            &[("Authorization", &auth), ("Content-Type", content_type)],
            body,
        )
        .await?;
        let (got, got_code, message) = refusal(&response)?;
        assert_eq!(
            (got, got_code.as_str()),
            (status, code),
            "{method} {path} {}: {message}",
            String::from_utf8_lossy(body)
        );
    }

    let mut fuzz = Fuzz(0x5eed_cafe_f00d_0001);
    let mut created = 0;
    for round in 0..400 {
        let body = fuzz.body();
        let (method, path, content_type) = match fuzz.below(8) {
            0 => ("POST", "/v1/modules", "application/wasm"),
            1 => ("POST", "/v1/tokens", "application/x-www-form-urlencoded"),
            2 | 3 => ("POST", "/v1/tokens", json),
            4 => ("PUT", "/v1/namespaces/shop/functions/f", json),
            5 => ("POST", "/v1/namespaces/shop/functions/f/versions", json),
            6 => ("PUT", "/v1/namespaces/shop/functions/f/rollout", json),
            _ => (
                "POST",
                "/v1/namespaces/shop/functions/f/rollout/promote",
                json,
            ),
        };
        let response = http_request(
            address,
            method,
            path,
            &[("Authorization", &auth), ("Content-Type", content_type)],
            &body,
        )
        .await?;
        let shown = String::from_utf8_lossy(&body);
        assert!(
            response.status < 500,
            "round {round}: {path} {shown:?} got {response:?}"
        );
        if response.status < 300 {
            created += i64::from(path == "/v1/tokens" && response.status == 201);
            continue;
        }
        let (status, _, _) = refusal(&response)
            .map_err(|e| anyhow::anyhow!("round {round}: {path} {shown:?}: {e}"))?;
        assert!((400..500).contains(&status), "round {round}: {status}");
    }
    // Some fuzzed bodies are valid requests; every one created a token.
    let tokens: i64 = sqlx::query_scalar("SELECT count(*) FROM weir_tokens")
        .fetch_one(&stack.pool().await?)
        .await?;
    assert_eq!(tokens, created);
    host.check()?;
    host.stop().await
}

#[sqlx::test(migrations = false)]
async fn the_openapi_document_lists_every_route_the_api_serves(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host(&stack, 1 << 20, 1_000).await?;
    let document = http_get(address, "/v1/openapi.json").await?;
    assert_eq!(document.0, 200);
    let document: serde_json::Value = serde_json::from_str(&document.1)?;
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().context("paths")?;
    let mut operations = 0;
    for (path, methods) in paths {
        let concrete = path
            .replace("{namespace}", "shop")
            .replace("{name}", "f")
            .replace("{digest}", "0")
            .replace("{id}", "tok_0");
        for (method, operation) in methods.as_object().context("methods")? {
            operations += 1;
            let response =
                http_request(address, &method.to_uppercase(), &concrete, &[], &[]).await?;
            let expected = if operation.get("security").is_some() {
                401
            } else {
                200
            };
            assert_eq!(
                response.status, expected,
                "{method} {path} is documented; the router answered {response:?}"
            );
        }
    }
    assert_eq!(operations, 20);
    let binding = &document["components"]["schemas"]["Binding"];
    assert_eq!(
        binding["required"],
        serde_json::json!(["stream", "subject", "key"])
    );
    host.stop().await
}

/// Sends request `head` (no body follows, whatever it declares) and returns
/// the first response line and whatever else the server sent within 10 s.
async fn send_head_only(address: SocketAddr, head: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(head.as_bytes()).await?;
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .context("no answer before the body was sent")??;
    Ok(String::from_utf8_lossy(&answer[..read]).to_string())
}

/// An upload is judged on its headers before its body is read: without a
/// valid token, or declaring more than the module limit, it is refused at
/// once — no `100 Continue`, no waiting for (or buffering of) the body.
#[sqlx::test(migrations = false)]
async fn uploads_are_refused_before_their_body_is_read(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (_host, address) = api_host(&stack, 1 << 20, 1_000).await?;
    let upload = |authorization: &str, length: u64| {
        format!(
            "POST /v1/modules HTTP/1.1\r\nHost: weir\r\n{authorization}Content-Type: application/wasm\r\nContent-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
        )
    };
    let terabyte = 1u64 << 40;
    let anonymous = send_head_only(address, &upload("", terabyte)).await?;
    assert!(
        anonymous.starts_with("HTTP/1.1 401"),
        "no token: {anonymous}"
    );
    let wrong = send_head_only(address, &upload("Authorization: Bearer nope\r\n", 10)).await?;
    assert!(wrong.starts_with("HTTP/1.1 401"), "bad token: {wrong}");
    let reader = new_token(address, "shop", "read").await?;
    let read_only = send_head_only(
        address,
        &upload(&format!("Authorization: Bearer {reader}\r\n"), 10),
    )
    .await?;
    assert!(
        read_only.starts_with("HTTP/1.1 403"),
        "read role: {read_only}"
    );
    let oversized = send_head_only(
        address,
        &upload(&format!("authorization: bearer {ADMIN}\r\n"), terabyte),
    )
    .await?;
    assert!(
        oversized.starts_with("HTTP/1.1 413") && oversized.contains("too_large"),
        "declared past the limit: {oversized}"
    );

    // A body past the limit without a declared length is cut off too.
    let chunked = format!(
        "POST /v1/modules HTTP/1.1\r\nHost: weir\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: application/wasm\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(chunked.as_bytes()).await?;
    let chunk = vec![b'a'; 64 << 10];
    for _ in 0..20 {
        let head = format!("{:x}\r\n", chunk.len());
        if stream.write_all(head.as_bytes()).await.is_err()
            || stream.write_all(&chunk).await.is_err()
            || stream.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "chunked past the limit: {answer}"
    );
    Ok(())
}

/// The API has a Postgres pool of its own: a flood of calls that each need
/// the database (unknown tokens, looked up one by one) never holds more
/// than `api.database_connections`, whatever the concurrency.
#[sqlx::test(migrations = false)]
async fn a_flood_of_api_calls_holds_only_the_apis_own_connections(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (_host, address) = api_host(&stack, 1 << 20, 100_000).await?;
    let pool = stack.pool().await?;
    let api_connections = || async {
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
        )
        .bind(weir_host::serve::API_APPLICATION_NAME)
        .fetch_one(&pool)
        .await?;
        anyhow::Ok(count)
    };
    let flood: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(async move {
                http_request(
                    address,
                    "GET",
                    "/v1/namespaces/shop/functions",
                    &[("Authorization", &bearer(&format!("weir_unknown_{i}")))],
                    b"",
                )
                .await
            })
        })
        .collect();
    let mut most = 0;
    while flood.iter().any(|call| !call.is_finished()) {
        most = most.max(api_connections().await?);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for call in flood {
        let response = call.await??;
        assert_eq!(response.status, 401, "{response:?}");
    }
    assert!(
        most >= 1,
        "the calls went to the database through the API's pool"
    );
    assert!(
        most <= i64::from(weir_host::config::ApiConfig::default().database_connections),
        "the API held {most} connections"
    );
    Ok(())
}

/// One client address gets `api.requests_per_second_per_client`, checked
/// before its token is looked up: a flood of made-up tokens from one
/// address is mostly answered 429 without touching the database.
#[sqlx::test(migrations = false)]
async fn one_client_is_rate_limited_before_its_tokens_are_looked_up(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let per_client = 20;
    let (_host, address) = api_host_with(&stack, vec![], |api| {
        api.requests_per_second = 100_000;
        api.requests_per_second_per_client = per_client;
    })
    .await?;
    // Let the bucket the readiness probes drew from fill up again.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..300)
        .map(|i| {
            tokio::spawn(async move {
                http_request(
                    address,
                    "GET",
                    "/v1/namespaces/shop/functions",
                    &[("Authorization", &bearer(&format!("weir_made_up_{i}")))],
                    b"",
                )
                .await
            })
        })
        .collect();
    let (mut unauthorized, mut limited) = (0u64, 0u64);
    for call in calls {
        let response = call.await??;
        match response.status {
            401 => unauthorized += 1,
            429 => {
                let (_, code, _) = refusal(&response)?;
                assert_eq!(code, "rate_limited");
                limited += 1;
            }
            other => anyhow::bail!("unexpected status {other}: {response:?}"),
        }
    }
    // Looked up at most: the burst (twice the rate) plus what the rate let
    // through while the flood lasted, plus one for rounding.
    let allowed = 2 * u64::from(per_client)
        + (started.elapsed().as_secs_f64() * f64::from(per_client)).ceil() as u64
        + 1;
    assert!(limited > 0, "nothing was limited");
    assert!(
        unauthorized <= allowed,
        "{unauthorized} made-up tokens were looked up; at most {allowed} should have been"
    );
    Ok(())
}

/// Uploads in flight are bounded (`api.concurrent_uploads`): past it, an
/// upload is refused at once with 429 instead of buffered; a slow upload
/// holds its place only while it is being sent.
#[sqlx::test(migrations = false)]
async fn uploads_in_flight_are_bounded(_pool: PgPoolOptions, db: PgConnectOptions) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host_with(&stack, vec![], |api| {
        api.requests_per_second = 100_000;
        api.concurrent_uploads = 1;
    })
    .await?;
    // An upload that sends half its body and then waits.
    let slow = stalled_upload(address, 500).await?;
    let bytes = std::fs::read(component("passthrough")?)?;
    let busy = eventually(
        Duration::from_secs(10),
        "the slow upload to hold its place",
        || async {
            let response = post(address, "/v1/modules", ADMIN, "application/wasm", &bytes).await?;
            Ok(response.status == 429)
        },
    )
    .await;
    busy?;
    let refused = post(address, "/v1/modules", ADMIN, "application/wasm", &bytes).await?;
    let (status, code, _) = refusal(&refused)?;
    assert_eq!((status, code.as_str()), (429, "uploads_busy"));
    // The slow client gives up: its place is free again.
    drop(slow);
    eventually(
        Duration::from_secs(10),
        "the upload to go through",
        || async {
            let response = post(address, "/v1/modules", ADMIN, "application/wasm", &bytes).await?;
            Ok(response.status == 201)
        },
    )
    .await?;
    host.stop().await
}

/// Tokens have a lifecycle: named, listed without the secret, revoked
/// (refused at once), expiring (refused once expired, cached lookups
/// included), and at most `api.max_tokens_per_namespace` live at a time.
#[sqlx::test(migrations = false)]
async fn tokens_are_named_listed_revoked_expire_and_are_bounded(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host_with(&stack, vec![], |api| {
        api.requests_per_second = 100_000;
        api.max_tokens_per_namespace = 3;
    })
    .await?;
    let make = |body: serde_json::Value| async move {
        post(
            address,
            "/v1/tokens",
            ADMIN,
            "application/json",
            body.to_string().as_bytes(),
        )
        .await
    };
    let get = |token: String, path: &'static str| async move {
        http_request(
            address,
            "GET",
            path,
            &[("Authorization", &bearer(&token))],
            b"",
        )
        .await
    };
    let ci = make(serde_json::json!({"namespace": "shop", "role": "admin", "name": "ci deploys"}))
        .await?;
    assert_eq!(ci.status, 201, "{ci:?}");
    let ci = ci.json()?;
    let ci_token = ci["token"].as_str().context("token")?.to_string();
    let brief =
        make(serde_json::json!({"namespace": "shop", "role": "read", "ttl_secs": 3})).await?;
    assert_eq!(brief.status, 201, "{brief:?}");
    let brief = brief.json()?;
    assert!(brief["expires_ms"].as_i64().is_some());
    let brief_token = brief["token"].as_str().context("token")?.to_string();
    let doomed = make(serde_json::json!({"namespace": "shop", "role": "read"})).await?;
    let doomed = doomed.json()?;
    let doomed_token = doomed["token"].as_str().context("token")?.to_string();
    let functions = "/v1/namespaces/shop/functions";
    for token in [&ci_token, &brief_token, &doomed_token] {
        assert_eq!(get(token.clone(), functions).await?.status, 200);
    }

    // Three live tokens: the most namespace shop may have.
    let fourth = make(serde_json::json!({"namespace": "shop", "role": "read"})).await?;
    assert_eq!(refusal(&fourth)?.0, 409, "{fourth:?}");

    // Listed by the namespace's admin, without the secrets.
    let listed = get(ci_token.clone(), "/v1/tokens").await?;
    assert_eq!(listed.status, 200, "{listed:?}");
    assert!(!listed.body.contains(&ci_token) && !listed.body.contains(&doomed_token));
    let listed = listed.json()?;
    let names: Vec<&str> = listed["tokens"]
        .as_array()
        .context("tokens")?
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(names.contains(&"ci deploys"), "{listed}");
    // A reader may not list, another namespace's admin sees none of them.
    assert_eq!(get(doomed_token.clone(), "/v1/tokens").await?.status, 403);

    // Revoked: refused at once.
    let doomed_id = doomed["id"].as_str().context("id")?;
    let revoke = http_request(
        address,
        "DELETE",
        &format!("/v1/tokens/{doomed_id}"),
        &[("Authorization", &bearer(&ci_token))],
        b"",
    )
    .await?;
    assert_eq!(revoke.status, 204, "{revoke:?}");
    assert_eq!(get(doomed_token.clone(), functions).await?.status, 401);
    // Expired: refused, although its lookup was cached a moment ago.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert_eq!(get(brief_token.clone(), functions).await?.status, 401);
    // Revoked and expired tokens are no longer live: room for new ones.
    let again = make(serde_json::json!({"namespace": "shop", "role": "read"})).await?;
    assert_eq!(again.status, 201, "{again:?}");
    let bad = make(serde_json::json!({"namespace": "shop", "role": "read", "ttl_secs": 0})).await?;
    assert_eq!(refusal(&bad)?.0, 422);
    host.stop().await
}

/// All tokens of one namespace share `api.requests_per_second_per_namespace`:
/// minting more tokens does not buy more rate.
#[sqlx::test(migrations = false)]
async fn a_namespaces_tokens_share_its_rate(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host_with(&stack, vec![], |api| {
        api.requests_per_second = 100_000;
        api.requests_per_second_per_namespace = 5;
    })
    .await?;
    let mut tokens = Vec::new();
    for _ in 0..5 {
        tokens.push(new_token(address, "shop", "read").await?);
    }
    let billing = new_token(address, "billing", "read").await?;
    let mut statuses = Vec::new();
    for round in 0..6 {
        for token in &tokens {
            let path = "/v1/namespaces/shop/functions";
            let response = http_request(
                address,
                "GET",
                path,
                &[("Authorization", &bearer(token))],
                b"",
            )
            .await?;
            statuses.push((round, response.status));
        }
    }
    let limited = statuses.iter().filter(|(_, s)| *s == 429).count();
    // Five tokens × six calls, each token far below its own rate: only the
    // namespace's (5/s, bursts of 10) can refuse them.
    assert!(limited >= 10, "{statuses:?}");
    // Another namespace is not held by shop's rate.
    let response = http_request(
        address,
        "GET",
        "/v1/namespaces/billing/functions",
        &[("Authorization", &bearer(&billing))],
        b"",
    )
    .await?;
    assert_eq!(response.status, 200, "{response:?}");
    host.stop().await
}

/// A client has `api.header_read_timeout_secs` to send its request headers:
/// one that trickles them (a byte a second) is disconnected, not kept open
/// forever; a prompt one is served on the same server meanwhile.
#[sqlx::test(migrations = false)]
async fn a_client_trickling_its_headers_is_disconnected(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host_with(&stack, vec![], |api| {
        api.header_read_timeout_secs = 1;
    })
    .await?;
    let mut slow = tokio::net::TcpStream::connect(address).await?;
    let started = std::time::Instant::now();
    let mut closed = false;
    for byte in b"GET /v1/openapi.json HTTP/1.1\r\nHost: weir\r\nX-Slow: " {
        if slow.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        let mut answer = [0u8; 512];
        if let Ok(read) =
            tokio::time::timeout(Duration::from_millis(500), slow.read(&mut answer)).await
        {
            // The server answered (408) or closed: either way it let go.
            let _ = read;
            closed = true;
            break;
        }
        assert_eq!(http_get(address, "/v1/openapi.json").await?.0, 200);
    }
    assert!(
        closed,
        "the trickling client was kept for {:?}",
        started.elapsed()
    );
    host.stop().await
}

/// A namespace holds the modules it uploads, within a quota of count and
/// bytes; it can let go of one no version uses (which is then deleted, with
/// its compiled artifact, once nothing else holds it), not of one in use,
/// and not of another namespace's.
#[sqlx::test(migrations = false)]
async fn modules_are_held_within_a_quota_and_deleted_when_unused(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let streams = vec![
        stream("SHOP", &["shop.in"]),
        stream("BILLING", &["billing.in"]),
    ];
    let (host, address) = api_host_with(&stack, streams, |api| {
        api.requests_per_second = 100_000;
        api.module_quota_count = 2;
    })
    .await?;
    let shop = new_token(address, "shop", "deploy").await?;
    let billing = new_token(address, "billing", "deploy").await?;
    let upload = |token: String, name: &'static str| async move {
        let bytes = std::fs::read(component(name)?)?;
        post(address, "/v1/modules", &token, "application/wasm", &bytes).await
    };
    let digest = |response: &HttpResponse| -> Result<String> {
        Ok(response.json()?["digest"]
            .as_str()
            .context("digest")?
            .to_string())
    };
    let delete = |token: String, digest: String| async move {
        http_request(
            address,
            "DELETE",
            &format!("/v1/modules/{digest}"),
            &[("Authorization", &bearer(&token))],
            b"",
        )
        .await
    };
    let passthrough = upload(shop.clone(), "passthrough").await?;
    assert_eq!(passthrough.status, 201, "{passthrough:?}");
    let passthrough = digest(&passthrough)?;
    let counter = upload(shop.clone(), "counter").await?;
    assert_eq!(counter.status, 201, "{counter:?}");
    let counter = digest(&counter)?;
    let third = upload(shop.clone(), "misbehave").await?;
    let (status, code, message) = refusal(&third)?;
    assert_eq!(
        (status, code.as_str()),
        (409, "quota_exceeded"),
        "{message}"
    );

    // Another namespace can neither make versions of shop's module (and so
    // pin it) nor let go of it.
    let g =
        serde_json::json!({"stream": "BILLING", "subject": "billing.in", "key": {"header": "k"}});
    api_call(
        address,
        &billing,
        "PUT",
        "/v1/namespaces/billing/functions/g",
        g,
    )
    .await?;
    let pinned = serde_json::json!({"module": counter}).to_string();
    let pinned = post(
        address,
        "/v1/namespaces/billing/functions/g/versions",
        &billing,
        "application/json",
        pinned.as_bytes(),
    )
    .await?;
    assert_eq!(refusal(&pinned)?.0, 422, "{pinned:?}");
    assert!(pinned.body.contains("this namespace may use"), "{pinned:?}");
    assert_eq!(
        delete(billing.clone(), passthrough.clone()).await?.status,
        404
    );
    // In use by a version: kept.
    let function = "/v1/namespaces/shop/functions/f";
    let binding =
        serde_json::json!({"stream": "SHOP", "subject": "shop.in", "key": {"subject_token": 1}});
    let put = http_request(
        address,
        "PUT",
        function,
        &[
            ("Authorization", &bearer(&shop)),
            ("Content-Type", "application/json"),
        ],
        binding.to_string().as_bytes(),
    )
    .await?;
    assert_eq!(put.status, 201, "{put:?}");
    let version = serde_json::json!({"module": counter}).to_string();
    let made = post(
        address,
        &format!("{function}/versions"),
        &shop,
        "application/json",
        version.as_bytes(),
    )
    .await?;
    assert_eq!(made.status, 201, "{made:?}");
    let in_use = delete(shop.clone(), counter.clone()).await?;
    assert_eq!(refusal(&in_use)?.1, "in_use", "{in_use:?}");
    // Unused: deleted, and the quota has room again.
    assert_eq!(delete(shop.clone(), passthrough.clone()).await?.status, 204);
    let gone = http_request(
        address,
        "GET",
        &format!("/v1/modules/{passthrough}"),
        &[("Authorization", &bearer(&shop))],
        b"",
    )
    .await?;
    assert_eq!(gone.status, 404, "{gone:?}");
    assert_eq!(upload(shop.clone(), "misbehave").await?.status, 201);
    host.stop().await
}

/// The token limit is counted under the namespace's lock: many requests
/// at once for its last places make exactly as many tokens as fit.
#[sqlx::test(migrations = false)]
async fn tokens_made_at_once_stop_at_the_limit(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host_with(&stack, vec![], |api| {
        api.requests_per_second = 100_000;
        api.max_tokens_per_namespace = 3;
        api.database_connections = 8;
    })
    .await?;
    let body = serde_json::json!({"namespace": "shop", "role": "read"}).to_string();
    let made = futures::future::join_all((0..12).map(|_| {
        post(
            address,
            "/v1/tokens",
            ADMIN,
            "application/json",
            body.as_bytes(),
        )
    }))
    .await;
    let mut statuses = made
        .into_iter()
        .map(|response| response.map(|r| r.status))
        .collect::<Result<Vec<_>>>()?;
    statuses.sort();
    assert_eq!(statuses, [[201; 3].as_slice(), &[409; 9]].concat());
    host.stop().await
}
