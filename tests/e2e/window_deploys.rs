//! Event-time windows under deployment: versions switched (canary,
//! promote, rollback) while the running host is down after a crash-point
//! abort, binding changes a function with versions must refuse (another
//! window kind, a higher lateness, adding or removing windows), and
//! versions of another world (a per-event canary of a window function),
//! which the API refuses. Judged as in `window_faults`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::process::{HostProcess, log_tail};
use weir_e2e::*;
use weir_host::config::HostConfig;
use weir_host::windows::{WindowKind, WindowSettings};

use crate::window_faults::{closed_by, only_rejects_dead_lettered, wait_exact, wait_for_windows};
use crate::windows::{Contents, Ev, events, reference, settings, with_closer};

const ADMIN: &str = "weir_bootstrap_for_window_fault_tests";
/// The deployed window function (runtime name `shop_win`).
const WIN: &str = "/v1/namespaces/shop/functions/win";

/// Calls the API as the bootstrap admin; the JSON answer of a 2xx.
async fn call(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    api_call(address, ADMIN, method, path, body).await
}

/// `method path` with a JSON body as the bootstrap admin, whatever the
/// answer: its status and body.
async fn send(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> Result<(u16, String)> {
    let response = api_send(address, ADMIN, method, path, body).await?;
    Ok((response.status, response.body))
}

/// A host config over the window streams with the API's bootstrap token
/// (no listener: see [`serving_host`] and [`api_only_host`]).
fn api_config(stack: &Stack) -> HostConfig {
    let mut config = stack.config(
        vec![
            stream("EVENTS", &["events.>"]),
            stream("WINDOWS", &["windows.>"]),
        ],
        vec![],
    );
    config.api.bootstrap_token = Some(weir_host::config::Secret(ADMIN.into()));
    config.api.requests_per_second = 100_000;
    config
}

/// Waits for the API on `address`, then grants namespace `shop` the
/// window streams and their subjects.
async fn open_api(address: SocketAddr, dir: &Path) -> Result<()> {
    eventually(Duration::from_secs(60), "the API", || async {
        Ok(http_get(address, "/v1/").await.is_ok())
    })
    .await
    .map_err(|e| e.context(log_tail(dir, 30)))?;
    grant(
        address,
        ADMIN,
        "shop",
        &["EVENTS".into(), "WINDOWS".into()],
        &["events.>".into(), "windows.>".into()],
    )
    .await
}

/// One host process serving the API and running what is deployed, its
/// log in `dir`.
async fn serving_host(stack: &Stack, dir: &Path) -> Result<(HostProcess, SocketAddr)> {
    let address: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut config = api_config(stack);
    config.api.listen = Some(address);
    let host = HostProcess::start(&config, dir, &[])?;
    open_api(address, dir).await?;
    Ok((host, address))
}

/// A host process that only serves the API (its log in `dir`), so that
/// deployments change while the hosts running them are down.
async fn api_only_host(config: &HostConfig, dir: &Path) -> Result<(HostProcess, SocketAddr)> {
    let address: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let api_config = HostConfig {
        artifact_dir: dir.join("artifacts"),
        api: weir_host::config::ApiConfig {
            listen: Some(address),
            run_deployed: false,
            ..config.api.clone()
        },
        ..config.clone()
    };
    let host = HostProcess::start(&api_config, dir, &[])?;
    open_api(address, dir).await?;
    Ok((host, address))
}

/// Uploads the built component `name`; its digest.
async fn upload(address: SocketAddr, name: &str) -> Result<String> {
    upload_component(address, ADMIN, name).await
}

/// The binding of `win`: keyed and timed by the event's JSON, firing to
/// `windows.out`, with these window settings (none: a per-event binding).
fn binding(window: Option<&WindowSettings>) -> Result<serde_json::Value> {
    let mut binding = serde_json::json!({
        "stream": "EVENTS", "subject": "events.in",
        "key": {"json_pointer": "/key"}, "event_time": {"json_pointer": "/ts"},
        "outputs": ["windows.out"], "batch_size": 20, "ack_wait_ms": 5000,
    });
    if let Some(window) = window {
        binding["window"] = serde_json::to_value(window)?;
    }
    Ok(binding)
}

/// Binds `win` with `window` and makes `versions` versions of `module`
/// (the first becomes the stable one).
async fn deploy(
    address: SocketAddr,
    window: &WindowSettings,
    module: &str,
    versions: usize,
) -> Result<()> {
    call(address, "PUT", WIN, binding(Some(window))?).await?;
    for _ in 0..versions {
        let body = serde_json::json!({"module": module});
        call(address, "POST", &format!("{WIN}/versions"), body).await?;
    }
    Ok(())
}

/// The rollout changes of the switching test: a canary starts, is
/// promoted, rolled back, ... (method, path, body).
fn rollout_changes() -> Vec<(&'static str, String, serde_json::Value)> {
    let rollout = format!("{WIN}/rollout");
    let canary = |stable: i32, canary: i32| serde_json::json!({"stable": stable, "canary": canary, "weight": 50});
    vec![
        ("PUT", rollout.clone(), canary(1, 2)),
        ("POST", format!("{rollout}/promote"), serde_json::json!({})),
        ("PUT", rollout.clone(), canary(2, 3)),
        ("POST", format!("{rollout}/rollback"), serde_json::json!({})),
        ("PUT", rollout.clone(), canary(2, 3)),
        ("POST", format!("{rollout}/promote"), serde_json::json!({})),
    ]
}

/// Whether some window holds events of both chunk `r` and chunk `r + 1`
/// (ids `r * size + 1 ..= (r + 1) * size`), for every boundary.
fn windows_span_every_boundary(expected: &Contents, chunks: usize, size: u64) -> bool {
    let chunk_of = |id: u64| (id - 1) / size;
    (0..chunks as u64 - 1).all(|r| {
        expected.values().any(|ids| {
            ids.iter().any(|id| chunk_of(*id) == r) && ids.iter().any(|id| chunk_of(*id) == r + 1)
        })
    })
}

/// A host running what is deployed, its log in `dir`; with `crash`, it
/// aborts right after its `crash`-th publish, before acking.
fn function_host(config: &HostConfig, dir: &Path, crash: Option<u32>) -> Result<HostProcess> {
    let env: Vec<(&str, String)> = match crash {
        Some(after) => vec![
            ("WEIR_CRASH_POINT", "after-publish".to_string()),
            ("WEIR_CRASH_AFTER", after.to_string()),
        ],
        None => vec![],
    };
    HostProcess::start(config, dir, &env)
}

/// Waits for `host` to abort at its crash point.
async fn aborted(host: &mut HostProcess, dir: &Path) -> Result<()> {
    eventually(Duration::from_secs(60), "the host to abort", || {
        let exited = host.has_exited();
        async move { Ok(exited) }
    })
    .await
    .map_err(|e| e.context(log_tail(dir, 30)))
}

#[sqlx::test(migrations = false)]
async fn a_window_function_switching_versions_mid_window_under_kills_stays_exact(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (dir, api_dir) = (
        tempdir::TempDir::new("weir-window-switch")?,
        tempdir::TempDir::new("weir-window-switch-api")?,
    );
    let config = api_config(&stack);
    let (_api, address) = api_only_host(&config, api_dir.path()).await?;
    let mut host = function_host(&config, dir.path(), None)?;
    let window = settings(WindowKind::Tumbling { size_ms: 200 }, 200, 0);
    // Three versions of window-sum: a window folded by one version is
    // fired by another, under the same ids whichever publishes it.
    deploy(address, &window, &upload(address, "window-sum").await?, 3).await?;
    let inputs = events(600, 200, 0, 29);
    let (expected, _) = reference(&window, &with_closer(inputs.clone()), true);
    assert!(
        windows_span_every_boundary(&expected, 6, 100),
        "windows are open across every switch"
    );
    // Each round: the host aborts right after a publish, before its acks;
    // the rollout changes while it is down, so the restarted host runs its
    // batch in hand, and the windows it left open, on another version.
    for (round, ((method, path, body), chunk)) in rollout_changes()
        .into_iter()
        .zip(inputs.chunks(100))
        .enumerate()
    {
        host.kill();
        host = function_host(&config, dir.path(), Some(1 + round as u32 % 3))?;
        publish_all(&stack.js, "events.in", chunk.iter().map(Ev::payload)).await?;
        aborted(&mut host, dir.path()).await?;
        call(address, method, &path, body).await?;
        host = function_host(&config, dir.path(), None)?;
        let closed = closed_by(&window, &inputs[..(round + 1) * 100]);
        wait_for_windows(&stack, &closed, "the round's windows")
            .await
            .map_err(|e| e.context(format!("round {round}\n{}", log_tail(dir.path(), 30))))?;
    }
    let record = call(address, "GET", WIN, serde_json::Value::Null).await?;
    assert_eq!(record["rollout"]["stable"], 3, "{record}");
    assert_eq!(
        record["rollout"]["canary"],
        serde_json::Value::Null,
        "{record}"
    );
    let inputs = with_closer(inputs);
    let closer = inputs.last().context("the closer")?;
    publish_all(&stack.js, "events.in", [closer.payload()]).await?;
    wait_exact(&stack, &expected, &[dir.path()]).await?;
    only_rejects_dead_lettered(&stack, &inputs).await?;
    drop(host);
    Ok(())
}

/// PUTs each of `refused` as the binding of `win`: each must be a 409
/// `conflict` that leaves the binding with `window`.
async fn refused_changes(
    address: SocketAddr,
    window: &WindowSettings,
    refused: &[(&str, serde_json::Value)],
) -> Result<()> {
    for (what, body) in refused {
        let (status, answer) = send(address, "PUT", WIN, body).await?;
        assert_eq!(status, 409, "{what}: {answer}");
        let answer: serde_json::Value = serde_json::from_str(&answer)?;
        assert_eq!(answer["error"], "conflict", "{what}: {answer}");
        let record = call(address, "GET", WIN, serde_json::Value::Null).await?;
        assert_eq!(
            record["binding"]["window"],
            serde_json::to_value(window)?,
            "{what}: the binding is kept"
        );
    }
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_window_binding_cannot_raise_lateness_or_change_kind_once_versions_exist(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let dir = tempdir::TempDir::new("weir-window-binding")?;
    let (host, address) = serving_host(&stack, dir.path()).await?;
    let window = settings(WindowKind::Tumbling { size_ms: 200 }, 200, 1_000);
    let module = upload(address, "window-sum").await?;
    deploy(address, &window, &module, 1).await?;
    let inputs = with_closer(events(600, 200, 0, 31));
    let (first, second) = inputs.split_at(300);
    publish_all(&stack.js, "events.in", first.iter().map(Ev::payload)).await?;
    wait_for_windows(&stack, &closed_by(&window, first), "the first windows").await?;

    let sliding = WindowKind::Sliding {
        size_ms: 400,
        slide_ms: 200,
    };
    let refused = [
        (
            "another window kind",
            binding(Some(&settings(sliding, 200, 1_000)))?,
        ),
        (
            "a higher lateness",
            binding(Some(&settings(window.kind, 200, 2_000)))?,
        ),
        ("no windows", binding(None)?),
    ];
    refused_changes(address, &window, &refused).await?;
    // A lower lateness is allowed; a version on it takes over while the
    // first half's last windows are open.
    let lower = settings(window.kind, 200, 500);
    let (status, answer) = send(address, "PUT", WIN, &binding(Some(&lower))?).await?;
    assert_eq!(status, 200, "lowering the lateness: {answer}");
    // The late-data subject is published to like an output: one the
    // namespace does not own is refused, for a new function too.
    let mut elsewhere = lower.clone();
    elsewhere.late_subject = Some("billing.late".into());
    let other = "/v1/namespaces/shop/functions/other";
    let (status, answer) = send(address, "PUT", other, &binding(Some(&elsewhere))?).await?;
    assert_eq!(status, 403, "another namespace's late subject: {answer}");
    assert!(answer.contains("billing.late"), "{answer}");
    // One the namespace owns but no stream captures could never be stored.
    let granted = |extra: &[&str]| -> Vec<String> {
        ["events.>", "windows.>"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let streams = ["EVENTS".to_string(), "WINDOWS".to_string()];
    grant(address, ADMIN, "shop", &streams, &granted(&["spare.>"])).await?;
    elsewhere.late_subject = Some("spare.late".into());
    let (status, answer) = send(address, "PUT", other, &binding(Some(&elsewhere))?).await?;
    assert_eq!(status, 422, "an uncaptured late subject: {answer}");
    assert!(answer.contains("spare.late"), "{answer}");
    let (status, _) = send(address, "GET", other, &serde_json::Value::Null).await?;
    assert_eq!(status, 404, "neither refused binding was stored");
    let body = serde_json::json!({"module": module});
    call(address, "POST", &format!("{WIN}/versions"), body).await?;
    call(
        address,
        "PUT",
        &format!("{WIN}/rollout"),
        serde_json::json!({"stable": 2}),
    )
    .await?;
    publish_all(&stack.js, "events.in", second.iter().map(Ev::payload)).await?;
    // Every event is within the bound: the lateness changes no result.
    let (expected, _) = reference(&lower, &inputs, true);
    assert_eq!(expected, reference(&window, &inputs, true).0);
    wait_exact(&stack, &expected, &[dir.path()]).await?;
    only_rejects_dead_lettered(&stack, &inputs).await?;
    drop(host);
    Ok(())
}

/// A version whose module implements another world than its function's
/// binding and versions (a per-event canary of a window function, a
/// window module for a per-event binding) is refused by the API with 409,
/// and the windows go on exactly.
#[sqlx::test(migrations = false)]
async fn a_version_of_another_world_is_refused_and_the_windows_go_on(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let dir = tempdir::TempDir::new("weir-window-world")?;
    let (host, address) = serving_host(&stack, dir.path()).await?;
    let window = settings(WindowKind::Tumbling { size_ms: 200 }, 200, 0);
    let window_sum = upload(address, "window-sum").await?;
    deploy(address, &window, &window_sum, 1).await?;
    let inputs = with_closer(events(600, 200, 0, 37));
    let (first, rest) = inputs.split_at(200);
    publish_all(&stack.js, "events.in", first.iter().map(Ev::payload)).await?;
    wait_for_windows(&stack, &closed_by(&window, first), "the first windows").await?;

    let counter = serde_json::json!({"module": upload(address, "counter").await?});
    let versions = format!("{WIN}/versions");
    let (status, answer) = send(address, "POST", &versions, &counter).await?;
    assert_eq!(
        status, 409,
        "a per-event version of a window function: {answer}"
    );
    assert!(answer.contains("weir:function/event-handler"), "{answer}");
    // And the other way round: a window module for a per-event binding
    // that has a per-event version.
    // (It reads a subject nothing is published to.)
    let plain = "/v1/namespaces/shop/functions/plain";
    let mut plain_binding = binding(None)?;
    plain_binding["subject"] = "events.plain".into();
    call(address, "PUT", plain, plain_binding).await?;
    call(address, "POST", &format!("{plain}/versions"), counter).await?;
    let windowed = serde_json::json!({"module": window_sum});
    let (status, answer) = send(address, "POST", &format!("{plain}/versions"), &windowed).await?;
    assert_eq!(
        status, 409,
        "a window version of a per-event function: {answer}"
    );
    assert!(answer.contains("incremental-window-handler"), "{answer}");
    let record = call(address, "GET", WIN, serde_json::Value::Null).await?;
    assert_eq!(
        record["versions"].as_array().map(Vec::len),
        Some(1),
        "{record}"
    );

    publish_all(&stack.js, "events.in", rest.iter().map(Ev::payload)).await?;
    let (expected, _) = reference(&window, &inputs, true);
    wait_exact(&stack, &expected, &[dir.path()]).await?;
    only_rejects_dead_lettered(&stack, &inputs).await?;
    drop(host);
    Ok(())
}
