//! Start-up: bad modules and bad bindings stop the host with an error that
//! names the function and the problem; good modules are compiled once and
//! then loaded from the artifact cache.

use std::time::Duration;

use anyhow::Result;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;
use weir_host::config::{FunctionSpec, HostConfig, KeySource};
use weir_host::sandbox::{Sandbox, SandboxConfig};

fn function(module: std::path::PathBuf, outputs: &[&str]) -> FunctionSpec {
    FunctionSpec {
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        ..FunctionSpec::new("f", module, "IN", "in", KeySource::SubjectToken(0))
    }
}

async fn start_error(config: HostConfig) -> Result<String> {
    let host = RunningHost::start(config);
    let outcome = tokio::time::timeout(Duration::from_secs(60), host.stop_when_exited()).await?;
    Ok(match outcome {
        Ok(()) => String::from("<the host started>"),
        Err(error) => format!("{error:#}"),
    })
}

#[sqlx::test(migrations = false)]
async fn bad_modules_and_bindings_are_refused_with_a_clear_error(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let files = tempdir::TempDir::new("weir-modules")?;
    let base = || stack.config(vec![stream("IN", &["in"]), stream("OUT", &["out"])], vec![]);

    let not_wasm = files.path().join("not-wasm.wasm");
    std::fs::write(&not_wasm, b"#!/bin/sh\necho hello\n")?;
    let core_module = files.path().join("core.wasm");
    std::fs::write(&core_module, b"\0asm\x01\0\0\0")?;
    let passthrough = component("passthrough")?;
    let imports_http = files.path().join("imports-http.wasm");
    std::fs::write(&imports_http, wat_fixture("imports-http")?)?;
    let start_loop = files.path().join("start-loop.wasm");
    std::fs::write(&start_loop, wat_fixture("start-loop")?)?;

    let cases = [
        (
            function(imports_http, &["out"]),
            "wasi:http/outgoing-handler@0.2.0",
        ),
        // Its start function would spin forever: cut by the deadline at
        // the trial instantiation, so the function is refused at deploy.
        (function(start_loop, &["out"]), "interrupt"),
        (function(not_wasm, &["out"]), "not a valid Weir component"),
        (
            function(core_module, &["out"]),
            "not a valid Weir component",
        ),
        (
            function(files.path().join("missing.wasm"), &[]),
            "cannot read component",
        ),
        (
            function(passthrough.clone(), &["nowhere.out"]),
            "no JetStream stream captures it",
        ),
        (
            function(passthrough.clone(), &["out.>"]),
            "no JetStream stream captures it",
        ),
        (
            FunctionSpec {
                stream: "NO_SUCH_STREAM".into(),
                ..function(passthrough.clone(), &["out"])
            },
            "stream `NO_SUCH_STREAM` of function `f` is not available",
        ),
    ];
    for (spec, expected) in cases {
        let mut config = base();
        config.functions = vec![spec];
        let error = start_error(config).await?;
        assert!(
            error.contains(expected),
            "`{error}` should say `{expected}`"
        );
    }

    // A health address that is taken stops start-up instead of running
    // without the endpoints an orchestrator relies on.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut config = base();
    config.health_listen = Some(taken.local_addr()?);
    let error = start_error(config).await?;
    assert!(
        error.contains("cannot serve health endpoints on"),
        "{error}"
    );
    Ok(())
}

/// A fixture component written in the component text format, compiled here.
fn wat_fixture(name: &str) -> Result<Vec<u8>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/wat")
        .join(format!("{name}.wat"));
    Ok(wat::parse_file(path)?)
}

#[test]
fn a_compiled_component_is_cached_by_digest() -> Result<()> {
    let artifacts = tempdir::TempDir::new("weir-artifacts")?;
    let sandbox = Sandbox::new(&SandboxConfig {
        artifact_dir: artifacts.path().to_path_buf(),
        ..SandboxConfig::default()
    })?;
    let first = sandbox.load_file(&component("passthrough")?)?;
    let cached: Vec<_> = std::fs::read_dir(artifacts.path())?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(cached.len(), 1, "one artifact: {cached:?}");
    assert!(cached[0].starts_with(first.digest()), "{cached:?}");
    let second = sandbox.load_file(&component("passthrough")?)?;
    assert_eq!(first.digest(), second.digest());
    assert_eq!(std::fs::read_dir(artifacts.path())?.count(), 1);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_database_that_does_not_exist_is_created_not_waited_for(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let name = format!("weir_missing_{}", std::process::id());
    let (server, _) = stack
        .database_url
        .rsplit_once('/')
        .expect("a database url has a path");
    let mut config = stack.config(vec![stream("IN", &["in"])], vec![]);
    config.database_url = format!("{server}/{name}");
    let host = stack.host(config).await?;
    let admin = stack.pool().await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&admin)
            .await?;
    host.stop().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    assert!(exists, "the host made its database");
    Ok(())
}

/// What start-up waits out and what it refuses: a broker that does not
/// answer (here paused past a request's timeout) is an outage; an output no
/// stream captures, or a stream that is not there, is refused at once.
#[tokio::test]
async fn start_up_tells_an_unanswering_broker_from_a_misconfiguration() -> Result<()> {
    use weir_host::serve::{StepFailure, check_bindings};
    let nats = NatsServer::start()?;
    let js = nats.jetstream().await?;
    for (name, subject) in [("IN", "in"), ("OUT", "out")] {
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            ..Default::default()
        })
        .await?;
    }
    let passthrough = component("passthrough")?;
    let good = function(passthrough.clone(), &["out"]);
    assert!(check_bindings(&js, &good).await.is_ok());

    let uncaptured = function(passthrough.clone(), &["nowhere"]);
    let missing_stream = FunctionSpec {
        stream: "NO_SUCH_STREAM".into(),
        ..function(passthrough.clone(), &["out"])
    };
    for spec in [&uncaptured, &missing_stream] {
        match check_bindings(&js, spec).await {
            Err(StepFailure::Refused(_)) => {}
            other => anyhow::bail!("{:?}: expected a refusal, got {other:?}", spec.outputs),
        }
    }

    let pid = nats.pid().expect("nats-server runs");
    weir_e2e::process::signal(pid, "STOP")?;
    let paused = check_bindings(&js, &good).await;
    weir_e2e::process::signal(pid, "CONT")?;
    assert!(
        matches!(paused, Err(StepFailure::Outage(_))),
        "a paused broker is an outage, not a misconfiguration: {paused:?}"
    );
    assert!(check_bindings(&js, &good).await.is_ok());
    Ok(())
}

/// Functions load at once and each starts as soon as its own module is
/// ready: a small Rust function serves while an 18 MB Python one is still
/// compiling (listed first in the config), and `/readyz` says which
/// function is loading, how large its module is and for how long. Once it
/// has loaded, the host is ready and both run.
#[sqlx::test(migrations = false)]
async fn a_small_function_serves_while_a_large_one_still_compiles(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let python = language_component("python", "enrich")?;
    let large = FunctionSpec {
        outputs: vec!["orders.enriched".into()],
        ..FunctionSpec::new(
            "enrich-py",
            python.clone(),
            "ORDERS",
            "orders.created",
            KeySource::JsonPointer("/order_id".into()),
        )
    };
    let small = FunctionSpec {
        outputs: vec!["bench.out".into()],
        ..FunctionSpec::new(
            "pass",
            component("passthrough")?,
            "IN",
            "in",
            KeySource::JsonPointer("/key".into()),
        )
    };
    let health: std::net::SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut config = stack.config(
        vec![
            stream("ORDERS", &["orders.created"]),
            stream("ENRICHED", &["orders.enriched"]),
            stream("IN", &["in"]),
            stream("OUT", &["bench.out"]),
        ],
        vec![large, small],
    );
    config.health_listen = Some(health);
    let host = RunningHost::start(config);

    let ready = || async {
        let (status, body) = http_get(health, "/readyz").await?;
        anyhow::Ok((status, serde_json::from_str::<serde_json::Value>(&body)?))
    };
    // The host makes the streams as it starts, before it loads modules.
    eventually(Duration::from_secs(30), "the host's streams", || async {
        host.check()?;
        for name in ["ORDERS", "ENRICHED", "IN", "OUT"] {
            if stream_len(&stack.js, name).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    publish_all(&stack.js, "in", [br#"{"key": "k1"}"#.to_vec()]).await?;
    eventually(
        Duration::from_secs(60),
        "the small function's output",
        || async {
            host.check()?;
            Ok(stream_len(&stack.js, "OUT").await? == 1)
        },
    )
    .await?;
    let (status, body) = ready().await?;
    assert_eq!(status, 503, "{body}");
    let loading = body["loading"].as_array().cloned().unwrap_or_default();
    assert_eq!(loading.len(), 1, "{body}");
    assert_eq!(loading[0]["function"], "enrich-py", "{body}");
    assert_eq!(
        loading[0]["module_bytes"].as_u64(),
        Some(std::fs::metadata(&python)?.len()),
        "{body}"
    );
    assert_eq!(body["functions_started"], 1, "{body}");
    assert_eq!(body["functions_expected"], 2, "{body}");

    eventually(Duration::from_secs(120), "the host to be ready", || async {
        host.check()?;
        Ok(ready().await?.0 == 200)
    })
    .await?;
    let order = br#"{"order_id": "o1", "items": [{"sku": "a", "qty": 2, "price_cents": 5}]}"#;
    publish_all(&stack.js, "orders.created", [order.to_vec()]).await?;
    eventually(
        Duration::from_secs(30),
        "the large function's output",
        || async { Ok(stream_len(&stack.js, "ENRICHED").await? == 1) },
    )
    .await?;
    let (_, body) = ready().await?;
    assert_eq!(body["loading"], serde_json::json!([]), "{body}");
    host.stop().await
}
