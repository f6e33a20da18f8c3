//! Deploying through the API: upload → function → version → events flow on
//! a running host, then switching versions live, back and forth, while
//! events keep coming: every event handled exactly once by one version, and
//! the state the versions share stays exact.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;
use weir_host::config::Secret;

const ADMIN: &str = "weir_bootstrap_for_deploy_tests";

async fn call(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &serde_json::Value,
) -> Result<HttpResponse> {
    api_send(address, token, method, path, body).await
}

async fn upload(address: SocketAddr, name: &str) -> Result<String> {
    upload_component(address, ADMIN, name).await
}

/// Binds the new function at `function` with `binding` and makes its first
/// version from `module`, as the admin.
async fn deploy_new(
    address: SocketAddr,
    function: &str,
    binding: &serde_json::Value,
    module: &str,
) -> Result<()> {
    let put = call(address, "PUT", function, ADMIN, binding).await?;
    anyhow::ensure!(put.status == 201, "{put:?}");
    let version = serde_json::json!({"module": module});
    let versions = format!("{function}/versions");
    let made = call(address, "POST", &versions, ADMIN, &version).await?;
    anyhow::ensure!(made.status == 201, "{made:?}");
    Ok(())
}

/// Starts a host that serves the API (as the admin) and runs nothing, and
/// one that runs what is deployed, told by Postgres notifications, with its
/// artifact cache in `runner_artifacts` if given; the API's address.
async fn api_host_and_runner(
    stack: &Stack,
    streams: Vec<weir_host::config::StreamSpec>,
    runner_artifacts: Option<&std::path::Path>,
) -> Result<(RunningHost, RunningHost, SocketAddr)> {
    let address: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut api_config = stack.config(streams.clone(), vec![]);
    api_config.api.listen = Some(address);
    api_config.api.bootstrap_token = Some(Secret(ADMIN.into()));
    api_config.api.run_deployed = false;
    let api_host = stack.host(api_config).await?;
    let mut runner_config = stack.config(streams, vec![]);
    if let Some(artifacts) = runner_artifacts {
        runner_config.artifact_dir = artifacts.to_path_buf();
    }
    let runner = stack.host(runner_config).await?;
    Ok((api_host, runner, address))
}

/// Ids in the JSON payloads of a stream.
async fn ids(stack: &Stack, stream: &str) -> Result<Vec<u64>> {
    read_stream(&stack.js, stream)
        .await?
        .iter()
        .map(|m| {
            let payload: serde_json::Value = serde_json::from_slice(&m.payload)?;
            payload["id"].as_u64().context("id")
        })
        .collect()
}

#[sqlx::test(migrations = false)]
async fn deploy_switch_versions_live_and_lose_nothing(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host(
        &stack,
        vec![
            stream("COUNTED", &["counted.in"]),
            stream("COUNTER_OUT", &["counter.out"]),
            stream("FIXTURE_OUT", &["fixture.out"]),
        ],
        ADMIN,
    )
    .await?;

    // Two modules that both count events per key in the `count` entry: v1
    // (`counter`) reports on counter.out, v2 (`misbehave`, action ok) on
    // fixture.out, so each output says which version handled the event.
    let v1_module = upload(address, "counter").await?;
    let v2_module = upload(address, "misbehave").await?;
    let function = "/v1/namespaces/shop/functions/tally";
    let binding = serde_json::json!({
        "stream": "COUNTED",
        "subject": "counted.in",
        "key": {"json_pointer": "/key"},
        "outputs": ["counter.out", "fixture.out"],
        "batch_size": 20
    });
    let created = call(address, "PUT", function, ADMIN, &binding).await?;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.json()?["stable"], serde_json::Value::Null);
    let v1 = call(
        address,
        "POST",
        &format!("{function}/versions"),
        ADMIN,
        &serde_json::json!({"module": v1_module}),
    )
    .await?;
    assert_eq!(v1.status, 201, "{v1:?}");
    assert_eq!(v1.json()?["version"], 1);
    let event = |id: u64| {
        serde_json::json!({"key": format!("k{}", id % 10), "id": id, "value": 1, "do": "ok"})
            .to_string()
            .into_bytes()
    };

    publish_all(&stack.js, "counted.in", (0..300).map(event)).await?;
    eventually(
        Duration::from_secs(60),
        "v1 handles the first 300",
        || async { Ok(stream_len(&stack.js, "COUNTER_OUT").await? >= 300) },
    )
    .await?;

    // v2 is made, but v1 serves until the rollout says otherwise.
    let v2 = call(
        address,
        "POST",
        &format!("{function}/versions"),
        ADMIN,
        &serde_json::json!({"module": v2_module}),
    )
    .await?;
    assert_eq!(v2.json()?["version"], 2);
    let rollout = format!("{function}/rollout");
    let switch = |version: u64| {
        let rollout = rollout.clone();
        async move {
            let body = serde_json::json!({"stable": version});
            call(address, "PUT", &rollout, ADMIN, &body).await
        }
    };
    let switched = Instant::now();
    let response = switch(2).await?;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.json()?["stable"], 2);
    // Events published until v2's first output: the host finishes v1's
    // batch in hand, then v2 takes over from the consumer's position.
    let mut next = 300;
    while stream_len(&stack.js, "FIXTURE_OUT").await? == 0 {
        anyhow::ensure!(
            switched.elapsed() < Duration::from_secs(30),
            "v2 never served"
        );
        publish_all(&stack.js, "counted.in", [event(next)]).await?;
        next += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let live_after = switched.elapsed();

    // Switch back while events flow.
    let producer = {
        let js = stack.js.clone();
        tokio::spawn(async move {
            for id in next..600 {
                publish_all(&js, "counted.in", [event(id)]).await?;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(switch(1).await?.status, 200);
    producer.await??;
    eventually(Duration::from_secs(60), "all 600 handled", || async {
        Ok(stream_len(&stack.js, "COUNTER_OUT").await?
            + stream_len(&stack.js, "FIXTURE_OUT").await?
            >= 600)
    })
    .await?;

    let shown = call(address, "GET", function, ADMIN, &serde_json::Value::Null).await?;
    let shown = shown.json()?;
    assert_eq!(shown["stable"], 1);
    assert_eq!(shown["versions"].as_array().map(Vec::len), Some(2));
    host.stop().await?;

    // Exactly once, by one version or the other.
    let by_v1 = ids(&stack, "COUNTER_OUT").await?;
    let by_v2 = ids(&stack, "FIXTURE_OUT").await?;
    let all: BTreeSet<u64> = by_v1.iter().chain(&by_v2).copied().collect();
    assert_eq!(by_v1.len() + by_v2.len(), 600, "no event handled twice");
    assert_eq!(all, (0..600).collect::<BTreeSet<_>>());
    assert!(!by_v2.is_empty(), "v2 handled events after the switch");
    assert!(
        by_v1.iter().any(|id| *id > 300),
        "v1 serves again after the switch back"
    );
    // The versions share the function's state: counts are exact.
    let counts = state_entries(&stack, "shop_tally", "count").await?;
    let expected: Vec<(String, String)> = (0..10).map(|k| (format!("k{k}"), "60".into())).collect();
    assert_eq!(counts, expected);
    assert!(
        live_after < Duration::from_secs(5),
        "the switch took effect within {live_after:?}"
    );
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn bad_function_calls_name_the_problem(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let address: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut config = stack.config(vec![], vec![]);
    config.api.listen = Some(address);
    config.api.bootstrap_token = Some(Secret(ADMIN.into()));
    config.api.requests_per_second = 10_000;
    let host = stack.host(config).await?;
    eventually(Duration::from_secs(60), "the API", || async {
        Ok(http_get(address, "/v1/x").await.is_ok())
    })
    .await?;
    let function = "/v1/namespaces/shop/functions/f";
    grant(address, ADMIN, "shop", &["S".into()], &["s.>".into()]).await?;
    let good = serde_json::json!({"stream": "S", "subject": "s.in", "key": {"header": "k"}});
    let cases = [
        (
            "PUT",
            function,
            serde_json::json!({"subject": "s", "key": {"header": "k"}}),
            422,
            "stream",
        ),
        (
            "PUT",
            function,
            serde_json::json!({"streem": "S", "subject": "s", "key": {"header": "k"}}),
            422,
            "streem",
        ),
        (
            "PUT",
            function,
            serde_json::json!({"stream": "S", "subject": "s", "key": {"header": "k"}, "batch_size": 0}),
            422,
            "batch_size",
        ),
        (
            "PUT",
            function,
            serde_json::json!({"stream": "S", "subject": "s", "key": {"nope": 1}}),
            422,
            "key",
        ),
        (
            "PUT",
            function,
            serde_json::json!({"stream": "S", "subject": "s", "key": {"header": "k"},
                "window": {"kind": {"sliding": {"size_ms": 1000, "slide_ms": 2000}}}}),
            422,
            "slide_ms <= size_ms",
        ),
        (
            "PUT",
            function,
            serde_json::json!({"stream": "S", "subject": "s.>", "key": {"header": "k"},
                "window": {"kind": {"tumbling": {"size_ms": 1000}}, "late_subject": "s.late"}}),
            422,
            "late_subject must not be one the function reads",
        ),
        (
            "PUT",
            "/v1/namespaces/Shop/functions/f",
            good.clone(),
            422,
            "namespace",
        ),
        (
            "PUT",
            "/v1/namespaces/shop/functions/f_1",
            good.clone(),
            422,
            "function name",
        ),
        (
            "GET",
            "/v1/namespaces/shop/functions/missing",
            serde_json::Value::Null,
            404,
            "no function",
        ),
        (
            "POST",
            "/v1/namespaces/shop/functions/missing/versions",
            serde_json::json!({"module": "abc"}),
            404,
            "no function",
        ),
        (
            "PUT",
            "/v1/namespaces/shop/functions/missing/rollout",
            serde_json::json!({"stable": 1}),
            404,
            "no function",
        ),
    ];
    for (method, path, body, status, expected) in &cases {
        let response = call(address, method, path, ADMIN, body).await?;
        let json = response.json()?;
        let message = json["message"].as_str().unwrap_or_default();
        assert_eq!(
            response.status, *status,
            "{method} {path} {body}: {message}"
        );
        assert!(message.contains(expected), "{method} {path}: {message}");
    }
    assert_eq!(
        call(address, "PUT", function, ADMIN, &good).await?.status,
        201
    );
    let unknown_module = call(
        address,
        "POST",
        &format!("{function}/versions"),
        ADMIN,
        &serde_json::json!({"module": "0".repeat(64)}),
    )
    .await?;
    assert_eq!(unknown_module.status, 422);
    assert!(
        unknown_module.body.contains("this namespace may use"),
        "{unknown_module:?}"
    );
    let no_version = call(
        address,
        "PUT",
        &format!("{function}/rollout"),
        ADMIN,
        &serde_json::json!({"stable": 9}),
    )
    .await?;
    assert_eq!(no_version.status, 422);
    assert!(no_version.body.contains("no version 9"), "{no_version:?}");
    // System subjects are never outputs.
    let system = serde_json::json!({"stream": "S", "subject": "s.in", "key": {"header": "k"},
                                    "outputs": ["$JS.API.>"]});
    let refused = call(address, "PUT", function, ADMIN, &system).await?;
    assert_eq!(refused.status, 422);
    assert!(refused.body.contains("system subjects"), "{refused:?}");
    let missing = call(
        address,
        "POST",
        "/v1/namespaces/shop/functions/missing/rollout/promote",
        ADMIN,
        &serde_json::Value::Null,
    )
    .await?;
    assert_eq!(missing.status, 404);

    // A namespace reads and writes only what it owns: another tenant's
    // stream or subjects, Weir's dead letters and logs, inboxes and `*`
    // are refused with the field named.
    let binding = |stream: &str, subject: &str, outputs: &[&str]| serde_json::json!({"stream": stream, "subject": subject, "key": {"header": "k"}, "outputs": outputs});
    let outside = [
        (binding("BILLING", "billing.>", &[]), "stream: `BILLING`"),
        (
            binding("WEIR_DEAD_LETTERS", "weir.dlq.>", &[]),
            "stream: `WEIR_DEAD_LETTERS`",
        ),
        (
            binding("WEIR_LOGS", "weir.logs.>", &[]),
            "stream: `WEIR_LOGS`",
        ),
        (binding("S", "billing.>", &[]), "subject: `billing.>`"),
        (binding("S", ">", &[]), "subject: `>`"),
        (
            binding("S", "s.in", &["billing.in"]),
            "outputs: `billing.in`",
        ),
        (
            binding("S", "s.in", &["weir.dlq.billing"]),
            "outputs: `weir.dlq.billing`",
        ),
        (
            binding("S", "s.in", &["weir.logs.billing"]),
            "outputs: `weir.logs.billing`",
        ),
        (binding("S", "s.in", &["_INBOX.>"]), "outputs: `_INBOX.>`"),
        (binding("S", "s.in", &["*"]), "outputs: `*`"),
    ];
    for (body, expected) in &outside {
        let refused = call(
            address,
            "PUT",
            "/v1/namespaces/shop/functions/g",
            ADMIN,
            body,
        )
        .await?;
        let message = refused.json()?["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(refused.status, 403, "{body}: {message}");
        assert!(message.starts_with(expected), "{body}: {message}");
    }
    // An output no stream captures (whole, wildcards included) is refused at
    // bind time: its publishes would be retried forever.
    for output in ["s.out", "s.out.>"] {
        let uncaptured = call(
            address,
            "PUT",
            "/v1/namespaces/shop/functions/g",
            ADMIN,
            &binding("S", "s.in", &[output]),
        )
        .await?;
        assert_eq!(uncaptured.status, 422, "{uncaptured:?}");
        assert!(
            uncaptured.body.contains("no JetStream stream captures"),
            "{uncaptured:?}"
        );
    }
    // Namespace `weir` is named like Weir's own streams and subjects: no
    // tenant may have it.
    let weirs = call(
        address,
        "PUT",
        "/v1/namespaces/weir/functions/x",
        ADMIN,
        &good,
    )
    .await?;
    assert_eq!(weirs.status, 422, "{weirs:?}");
    assert!(weirs.body.contains("reserved"), "{weirs:?}");
    let weir_token = serde_json::json!({"namespace": "weir", "role": "admin"});
    let weir_token = call(address, "POST", "/v1/tokens", ADMIN, &weir_token).await?;
    assert_eq!(weir_token.status, 422, "{weir_token:?}");
    // Only an admin of every namespace grants: a namespace's own admin
    // cannot take another's streams.
    let shop_admin = call(
        address,
        "POST",
        "/v1/tokens",
        ADMIN,
        &serde_json::json!({"namespace": "shop", "role": "admin"}),
    )
    .await?;
    let shop_admin = shop_admin.json()?["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let taken = serde_json::json!({"streams": ["BILLING"], "subjects": ["billing.>"]});
    let resources = "/v1/namespaces/shop/resources";
    assert_eq!(
        call(address, "PUT", resources, &shop_admin, &taken)
            .await?
            .status,
        403
    );
    let owned = call(
        address,
        "GET",
        resources,
        &shop_admin,
        &serde_json::Value::Null,
    )
    .await?;
    assert_eq!(owned.json()?["streams"], serde_json::json!(["S"]));
    // Without a grant a namespace owns its own name: billing may bind to
    // BILLING and billing.>, not to shop's S.
    let billing_deployer = call(
        address,
        "POST",
        "/v1/tokens",
        ADMIN,
        &serde_json::json!({"namespace": "billing", "role": "deploy"}),
    )
    .await?;
    let billing_deployer = billing_deployer.json()?["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let billing_fn = "/v1/namespaces/billing/functions/ledger";
    let own = binding("BILLING", "billing.in", &[]);
    assert_eq!(
        call(address, "PUT", billing_fn, &billing_deployer, &own)
            .await?
            .status,
        201
    );
    let shops = binding("S", "s.in", &[]);
    assert_eq!(
        call(address, "PUT", billing_fn, &billing_deployer, &shops)
            .await?
            .status,
        403
    );

    // Another namespace's token sees nothing here.
    let token = call(
        address,
        "POST",
        "/v1/tokens",
        ADMIN,
        &serde_json::json!({"namespace": "billing", "role": "admin"}),
    )
    .await?;
    let token = token.json()?["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let across = call(address, "GET", function, &token, &serde_json::Value::Null).await?;
    assert_eq!(across.status, 403);
    let listed = call(
        address,
        "GET",
        "/v1/namespaces/shop/functions",
        ADMIN,
        &serde_json::Value::Null,
    )
    .await?;
    assert_eq!(listed.json()?["functions"][0]["name"], "f");
    assert_eq!(
        call(address, "DELETE", function, ADMIN, &serde_json::Value::Null)
            .await?
            .status,
        204
    );
    assert_eq!(
        call(address, "GET", function, ADMIN, &serde_json::Value::Null)
            .await?
            .status,
        404
    );
    host.stop().await
}

#[sqlx::test(migrations = false)]
async fn a_version_can_replay_the_stream_from_a_position(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host(
        &stack,
        vec![
            stream("COUNTED", &["counted.in"]),
            stream("COUNTER_OUT", &["counter.out"]),
        ],
        ADMIN,
    )
    .await?;
    let module = upload(address, "counter").await?;
    let function = "/v1/namespaces/shop/functions/tally";
    let binding = serde_json::json!({
        "stream": "COUNTED", "subject": "counted.in", "key": {"json_pointer": "/key"},
        "outputs": ["counter.out"],
    });
    call(address, "PUT", function, ADMIN, &binding).await?;
    let versions = format!("{function}/versions");
    let first = serde_json::json!({"module": module});
    call(address, "POST", &versions, ADMIN, &first).await?;
    let event = |id: u64| {
        serde_json::json!({"key": format!("k{}", id % 10), "id": id, "value": 1})
            .to_string()
            .into_bytes()
    };
    publish_all(&stack.js, "counted.in", (0..100).map(event)).await?;
    eventually(Duration::from_secs(60), "the first pass", || async {
        Ok(stream_len(&stack.js, "COUNTER_OUT").await? == 100)
    })
    .await?;

    // Version 2 reprocesses everything from sequence 1 once it serves: the
    // state starts empty, so counts come out the same, not doubled, and
    // its outputs are published again.
    let replay = serde_json::json!({"module": module, "replay_from": {"sequence": 1}});
    let made = call(address, "POST", &versions, ADMIN, &replay).await?;
    assert_eq!(
        made.json()?["replay_from"],
        serde_json::json!({"sequence": 1})
    );
    let switch = serde_json::json!({"stable": 2});
    call(
        address,
        "PUT",
        &format!("{function}/rollout"),
        ADMIN,
        &switch,
    )
    .await?;
    eventually(Duration::from_secs(60), "the replay", || async {
        Ok(stream_len(&stack.js, "COUNTER_OUT").await? == 200)
    })
    .await?;
    publish_all(&stack.js, "counted.in", (100..110).map(event)).await?;
    eventually(
        Duration::from_secs(60),
        "events after the replay",
        || async { Ok(stream_len(&stack.js, "COUNTER_OUT").await? == 210) },
    )
    .await?;
    let shown = call(address, "GET", function, ADMIN, &serde_json::Value::Null).await?;
    assert_eq!(shown.json()?["versions"][1]["replayed"], true);
    host.stop().await?;

    let counts = state_entries(&stack, "shop_tally", "count").await?;
    let expected: Vec<(String, String)> = (0..10).map(|k| (format!("k{k}"), "11".into())).collect();
    assert_eq!(counts, expected);
    // Each id twice on the output: once per pass (the first 100 only).
    let mut seen = ids(&stack, "COUNTER_OUT").await?;
    seen.sort_unstable();
    let expected: Vec<u64> = (0..100).flat_map(|id| [id, id]).chain(100..110).collect();
    assert_eq!(seen, expected);
    Ok(())
}

/// A host that runs a deployed module it has no artifact for (another
/// host took the upload) compiles it with a compile job, bounded like an
/// upload's, never in its own process: its artifact cache then has the
/// job directory and the artifact, and the function runs.
#[sqlx::test(migrations = false)]
async fn a_runner_compiles_a_deployed_module_in_a_compile_job(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let streams = vec![
        stream("COUNTED", &["counted.in"]),
        stream("COUNTER_OUT", &["counter.out"]),
    ];
    let runner_artifacts = tempdir::TempDir::new("weir-runner-artifacts")?;
    let (api_host, runner, address) =
        api_host_and_runner(&stack, streams, Some(runner_artifacts.path())).await?;

    let module = upload(address, "counter").await?;
    let names = ["COUNTED", "COUNTER_OUT"].map(String::from);
    let subjects = ["counted.in", "counter.out"].map(String::from);
    grant(address, ADMIN, "shop", &names, &subjects).await?;
    let function = "/v1/namespaces/shop/functions/tally";
    let binding = serde_json::json!({
        "stream": "COUNTED", "subject": "counted.in", "key": {"json_pointer": "/key"},
        "outputs": ["counter.out"],
    });
    deploy_new(address, function, &binding, &module).await?;
    let event = serde_json::json!({"key": "k", "id": 1, "value": 1}).to_string();
    publish_all(&stack.js, "counted.in", [event.into_bytes()]).await?;
    eventually(Duration::from_secs(60), "the runner running it", || async {
        Ok(stream_len(&stack.js, "COUNTER_OUT").await? == 1)
    })
    .await?;
    let cached: Vec<String> = std::fs::read_dir(runner_artifacts.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        cached.iter().any(|name| name == "jobs"),
        "compiled by a job: {cached:?}"
    );
    assert!(
        cached.iter().any(|name| name.starts_with(&module)),
        "{cached:?}"
    );
    runner.stop().await?;
    api_host.stop().await
}

#[sqlx::test(migrations = false)]
async fn another_host_follows_what_the_api_host_deploys(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let streams = vec![
        stream("COUNTED", &["counted.in"]),
        stream("COUNTER_OUT", &["counter.out"]),
        stream("FIXTURE_OUT", &["fixture.out"]),
    ];
    // One host serves the API and runs nothing; the other runs what is
    // deployed, told by Postgres notifications.
    let (api_host, runner, address) = api_host_and_runner(&stack, streams, None).await?;

    let v1 = upload(address, "counter").await?;
    let v2 = upload(address, "misbehave").await?;
    let names = ["COUNTED", "COUNTER_OUT", "FIXTURE_OUT"].map(String::from);
    let subjects = ["counted.in", "counter.out", "fixture.out"].map(String::from);
    grant(address, ADMIN, "shop", &names, &subjects).await?;
    let function = "/v1/namespaces/shop/functions/tally";
    let binding = serde_json::json!({
        "stream": "COUNTED", "subject": "counted.in", "key": {"json_pointer": "/key"},
        "outputs": ["counter.out", "fixture.out"],
    });
    deploy_new(address, function, &binding, &v1).await?;
    let versions = format!("{function}/versions");
    call(
        address,
        "POST",
        &versions,
        ADMIN,
        &serde_json::json!({"module": v2}),
    )
    .await?;
    let event = |id: u64| {
        serde_json::json!({"key": "k", "id": id, "value": 1, "do": "ok"})
            .to_string()
            .into_bytes()
    };
    publish_all(&stack.js, "counted.in", [event(0)]).await?;
    eventually(Duration::from_secs(30), "the runner running v1", || async {
        Ok(stream_len(&stack.js, "COUNTER_OUT").await? == 1)
    })
    .await?;
    let switch = serde_json::json!({"stable": 2});
    call(
        address,
        "PUT",
        &format!("{function}/rollout"),
        ADMIN,
        &switch,
    )
    .await?;
    let mut id = 1;
    eventually(
        Duration::from_secs(30),
        "the runner following to v2",
        || {
            id += 1;
            let js = stack.js.clone();
            async move {
                publish_all(&js, "counted.in", [event(id)]).await?;
                Ok(stream_len(&js, "FIXTURE_OUT").await? >= 1)
            }
        },
    )
    .await?;
    runner.stop().await?;
    api_host.stop().await
}

#[sqlx::test(migrations = false)]
async fn a_deployed_function_keeps_its_stream_and_replays_only_from_the_past(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host(
        &stack,
        vec![
            stream("COUNTED", &["counted.in"]),
            stream("COUNTER_OUT", &["counter.out"]),
        ],
        ADMIN,
    )
    .await?;
    let module = upload(address, "counter").await?;
    let function = "/v1/namespaces/shop/functions/tally";
    let binding = serde_json::json!({
        "stream": "COUNTED", "subject": "counted.in", "key": {"json_pointer": "/key"},
        "outputs": ["counter.out"],
    });
    call(address, "PUT", function, ADMIN, &binding).await?;
    let versions = format!("{function}/versions");
    call(
        address,
        "POST",
        &versions,
        ADMIN,
        &serde_json::json!({"module": module}),
    )
    .await?;
    // Owned, so that what refuses the move is the function's history.
    let streams = ["COUNTED", "COUNTER_OUT", "OTHER"].map(String::from);
    grant(
        address,
        ADMIN,
        "shop",
        &streams,
        &["counted.in".into(), "counter.out".into()],
    )
    .await?;
    let mut moved = binding.clone();
    moved["stream"] = "OTHER".into();
    let refused = call(address, "PUT", function, ADMIN, &moved).await?;
    assert_eq!(refused.status, 409, "{refused:?}");
    assert!(
        refused.body.contains("reads stream `COUNTED`"),
        "{refused:?}"
    );
    let future = serde_json::json!({"module": module, "replay_from": {"time_ms": i64::MAX}});
    let refused = call(address, "POST", &versions, ADMIN, &future).await?;
    assert_eq!(refused.status, 422, "{refused:?}");
    assert!(refused.body.contains("past time"), "{refused:?}");
    host.stop().await
}

/// A grant narrowed after a function was deployed stops it on every host as
/// soon as they hear of the grant (its binding reaches outside the namespace
/// now), refuses new versions of it at once, and loses nothing: granted
/// again, it carries on from where it stopped.
#[sqlx::test(migrations = false)]
async fn a_narrowed_grant_stops_the_functions_outside_it(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host(
        &stack,
        vec![
            stream("COUNTED", &["counted.in"]),
            stream("COUNTER_OUT", &["counter.out"]),
        ],
        ADMIN,
    )
    .await?;
    let module = upload(address, "counter").await?;
    let function = "/v1/namespaces/shop/functions/tally";
    let binding = serde_json::json!({
        "stream": "COUNTED", "subject": "counted.in", "key": {"json_pointer": "/key"},
        "outputs": ["counter.out"],
    });
    assert_eq!(
        call(address, "PUT", function, ADMIN, &binding)
            .await?
            .status,
        201
    );
    let versions = format!("{function}/versions");
    let version = serde_json::json!({"module": module});
    assert_eq!(
        call(address, "POST", &versions, ADMIN, &version)
            .await?
            .status,
        201
    );
    let event = |id: u64| {
        serde_json::json!({"key": "k", "id": id, "value": 1})
            .to_string()
            .into_bytes()
    };
    publish_all(&stack.js, "counted.in", [event(1)]).await?;
    eventually(Duration::from_secs(30), "the first output", || async {
        Ok(stream_len(&stack.js, "COUNTER_OUT").await? == 1)
    })
    .await?;

    let narrowed = ["COUNTER_OUT".to_string()];
    grant(address, ADMIN, "shop", &narrowed, &["counter.out".into()]).await?;
    let refused = call(address, "POST", &versions, ADMIN, &version).await?;
    assert_eq!(refused.status, 403, "{refused:?}");
    // The hosts hear of the grant and stop the function: an event published
    // from some moment on is no longer processed. (Each one processed while
    // the news travels is counted.)
    let mut sent = 1;
    let stopped = loop {
        anyhow::ensure!(sent < 20, "the function kept running outside its grant");
        sent += 1;
        publish_all(&stack.js, "counted.in", [event(sent)]).await?;
        let processed = eventually(Duration::from_secs(5), "the event", || async {
            Ok(stream_len(&stack.js, "COUNTER_OUT").await? == sent)
        })
        .await;
        if processed.is_err() {
            break sent;
        }
    };
    assert_eq!(stream_len(&stack.js, "COUNTER_OUT").await?, stopped - 1);

    let whole = ["COUNTED", "COUNTER_OUT"].map(String::from);
    let subjects = ["counted.in", "counter.out"].map(String::from);
    grant(address, ADMIN, "shop", &whole, &subjects).await?;
    eventually(
        Duration::from_secs(30),
        "the held event, once granted again",
        || async { Ok(stream_len(&stack.js, "COUNTER_OUT").await? == stopped) },
    )
    .await?;
    host.stop().await
}

/// A deployed function's guest log lines and dead letters are read through
/// the API with a token for its namespace (the host reads NATS for the
/// caller), and followed by asking again after the last sequence; another
/// namespace's token gets nothing.
#[sqlx::test(migrations = false)]
async fn logs_and_dead_letters_are_read_through_the_api_per_namespace(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host(
        &stack,
        vec![
            stream("COUNTED", &["counted.in"]),
            stream("FIXTURE_OUT", &["fixture.out"]),
        ],
        ADMIN,
    )
    .await?;
    let module = upload(address, "misbehave").await?;
    let function = "/v1/namespaces/shop/functions/noisy";
    let binding = serde_json::json!({
        "stream": "COUNTED", "subject": "counted.in", "key": {"json_pointer": "/key"},
        "outputs": ["fixture.out"], "retry": {"max_attempts": 1},
    });
    deploy_new(address, function, &binding, &module).await?;
    let event = |id: u64, action: &str| {
        serde_json::json!({"key": "k", "id": id, "do": action})
            .to_string()
            .into_bytes()
    };
    publish_all(
        &stack.js,
        "counted.in",
        [event(1, "chatty"), event(2, "reject")],
    )
    .await?;

    let token = |namespace: &'static str| async move {
        let made = call(
            address,
            "POST",
            "/v1/tokens",
            ADMIN,
            &serde_json::json!({"namespace": namespace, "role": "read"}),
        )
        .await?;
        anyhow::Ok(
            made.json()?["token"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    let reader = token("shop").await?;
    let dead_letters = format!("{function}/dead-letters");
    let read = |path: String, token: String| async move {
        call(address, "GET", &path, &token, &serde_json::Value::Null).await
    };
    let dead = eventually(Duration::from_secs(30), "the dead letter", || async {
        let response = read(dead_letters.clone(), reader.clone()).await?;
        Ok(response.json()?["records"]
            .as_array()
            .is_some_and(|r| r.len() == 1))
    });
    dead.await?;
    let dead = read(dead_letters.clone(), reader.clone()).await?.json()?;
    let letter = &dead["records"][0];
    assert!(
        letter["payload"]
            .as_str()
            .is_some_and(|p| p.contains("\"reject\"")),
        "{dead}"
    );
    assert!(
        dead.to_string().contains("asked to reject"),
        "the reason is in its headers: {dead}"
    );

    let logs = format!("{function}/logs");
    eventually(Duration::from_secs(30), "the log lines", || async {
        let response = read(logs.clone(), reader.clone()).await?;
        Ok(response.body.contains("chatty event"))
    })
    .await?;
    // Following: nothing new after the last sequence read.
    let all = read(logs.clone(), reader.clone()).await?.json()?;
    let last = all["last_seq"].as_u64().context("last_seq")?;
    let after = read(format!("{logs}?after_seq={last}"), reader.clone())
        .await?
        .json()?;
    assert_eq!(after["records"], serde_json::json!([]), "{after}");
    assert_eq!(after["last_seq"].as_u64(), Some(last));
    // A start time the host cannot represent is refused, not read from 0.
    let out_of_range = read(format!("{logs}?since_ms={}", i64::MAX), reader.clone()).await?;
    assert_eq!(out_of_range.status, 422, "{out_of_range:?}");
    assert!(out_of_range.body.contains("since_ms"), "{out_of_range:?}");

    // Another namespace's reader is refused both.
    let outsider = token("billing").await?;
    for path in [logs, dead_letters] {
        assert_eq!(read(path, outsider.clone()).await?.status, 403);
    }
    // On NATS, the records are under the namespace's own subject tree, so
    // a NATS permission on `weir.dlq.shop.>` / `weir.logs.shop.>` grants
    // exactly them.
    let subjects = |messages: Vec<async_nats::Message>| {
        messages
            .iter()
            .map(|m| m.subject.to_string())
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(
        subjects(read_stream(&stack.js, "WEIR_DEAD_LETTERS").await?),
        ["weir.dlq.shop.noisy".to_string()].into()
    );
    assert_eq!(
        subjects(read_stream(&stack.js, "WEIR_LOGS").await?),
        ["weir.logs.shop.noisy".to_string()].into()
    );
    host.stop().await
}
