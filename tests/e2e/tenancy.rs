//! Two tenants on one host. `billing` runs a function over its own stream
//! with state, outputs and a dead letter; `shop`, with its strongest token
//! (a namespace admin) and a deploy token, tries every way the API offers
//! to read or write billing's events, state, dead letters, logs, modules,
//! resources and tokens. Each is refused (403, or 404/422 where saying
//! "forbidden" would confirm the thing exists), and the NATS side shows
//! that nothing shop did reached billing: billing's streams, dead letters
//! and state are exactly what billing's own events made.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;

use crate::api::{ADMIN, api_host_with, request};

/// A token of `namespace` with `role`: the token and its id.
async fn token(address: SocketAddr, namespace: &str, role: &str) -> Result<(String, String)> {
    let body = serde_json::json!({"namespace": namespace, "role": role});
    let made = api_call(address, ADMIN, "POST", "/v1/tokens", body).await?;
    let field = |name: &str| {
        made[name]
            .as_str()
            .map(String::from)
            .with_context(|| format!("{name} of {made}"))
    };
    Ok((field("token")?, field("id")?))
}

/// Checks that `method path` as `token` is refused with one of `allowed`.
async fn refused(
    address: SocketAddr,
    token: &str,
    (method, path): (&str, &str),
    body: &serde_json::Value,
    allowed: &[u16],
) -> Result<()> {
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let answer = request(address, token, method, path, "application/json", &body).await?;
    ensure!(
        allowed.contains(&answer.status),
        "{method} {path} as shop: expected one of {allowed:?}, got {answer:?}"
    );
    ensure!(answer.json()?["error"].is_string(), "{answer:?}");
    Ok(())
}

/// Deploys `billing/ledger` (the counter fixture over `billing.in`, its
/// outputs on `counter.out`) as billing's deployer; the module's digest.
async fn deploy_ledger(address: SocketAddr, deployer: &str) -> Result<String> {
    let module = std::fs::read(component("counter")?)?;
    let uploaded = request(
        address,
        deployer,
        "POST",
        "/v1/modules",
        "application/wasm",
        &module,
    )
    .await?;
    ensure!(uploaded.status == 201, "{uploaded:?}");
    let digest = uploaded.json()?["digest"]
        .as_str()
        .context("digest")?
        .to_string();
    let binding = serde_json::json!({
        "stream": "BILLING", "subject": "billing.in", "key": {"json_pointer": "/key"},
        "outputs": ["counter.out"],
    });
    let function = "/v1/namespaces/billing/functions/ledger";
    api_call(address, deployer, "PUT", function, binding).await?;
    let version = serde_json::json!({"module": digest});
    api_call(
        address,
        deployer,
        "POST",
        &format!("{function}/versions"),
        version,
    )
    .await?;
    Ok(digest)
}

#[sqlx::test(migrations = false)]
async fn one_tenant_reaches_nothing_of_another(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let streams = vec![
        stream("BILLING", &["billing.>"]),
        stream("BILLING_OUT", &["counter.out"]),
        stream("SHOP", &["shop.>"]),
    ];
    let (host, address) = api_host_with(&stack, streams, |_| {}).await?;
    let billing_streams = ["BILLING".to_string(), "BILLING_OUT".to_string()];
    let billing_subjects = ["billing.>".to_string(), "counter.out".to_string()];
    grant(
        address,
        ADMIN,
        "billing",
        &billing_streams,
        &billing_subjects,
    )
    .await?;
    let (billing, billing_token_id) = token(address, "billing", "deploy").await?;
    let (shop_admin, _) = token(address, "shop", "admin").await?;
    let (shop, _) = token(address, "shop", "deploy").await?;

    // Billing's own work: 20 events on 4 accounts, and one poison event.
    let digest = deploy_ledger(address, &billing).await?;
    let events = (0..20u64).map(|id| {
        serde_json::json!({"id": id, "value": 1, "key": format!("acct-{}", id % 4)})
            .to_string()
            .into_bytes()
    });
    let poison = serde_json::json!({"id": 99, "value": 1, "key": "acct-0", "poison": true});
    let mut published = publish_all(&stack.js, "billing.in", events).await?;
    published
        .extend(publish_all(&stack.js, "billing.in", [poison.to_string().into_bytes()]).await?);
    let dead_letters = weir_host::serve::DEAD_LETTER_STREAM;
    eventually(
        Duration::from_secs(60),
        "billing's outputs and dead letter",
        || async {
            host.check()?;
            Ok(stream_len(&stack.js, "BILLING_OUT").await? == 20
                && stream_len(&stack.js, dead_letters).await? == 1)
        },
    )
    .await?;

    // Reading billing's functions, records, resources, modules and tokens.
    let null = serde_json::Value::Null;
    let ledger = "/v1/namespaces/billing/functions/ledger";
    for path in [
        "/v1/namespaces/billing/functions".to_string(),
        ledger.to_string(),
        format!("{ledger}/rollout"),
        format!("{ledger}/logs"),
        format!("{ledger}/dead-letters"),
        "/v1/namespaces/billing/resources".to_string(),
        "/v1/tokens?namespace=billing".to_string(),
    ] {
        refused(address, &shop_admin, ("GET", &path), &null, &[403]).await?;
    }
    let module = format!("/v1/modules/{digest}");
    refused(address, &shop_admin, ("GET", &module), &null, &[404]).await?;

    // Changing billing's functions, resources, modules and tokens.
    let binding =
        serde_json::json!({"stream": "BILLING", "subject": "billing.in", "key": {"header": "k"}});
    refused(address, &shop_admin, ("PUT", ledger), &binding, &[403]).await?;
    refused(address, &shop_admin, ("DELETE", ledger), &null, &[403]).await?;
    let version = serde_json::json!({"module": digest});
    let versions = format!("{ledger}/versions");
    refused(address, &shop_admin, ("POST", &versions), &version, &[403]).await?;
    let rollout = serde_json::json!({"stable": 1});
    let rollout_path = format!("{ledger}/rollout");
    refused(
        address,
        &shop_admin,
        ("PUT", &rollout_path),
        &rollout,
        &[403],
    )
    .await?;
    for end in ["promote", "rollback"] {
        let path = format!("{ledger}/rollout/{end}");
        refused(address, &shop_admin, ("POST", &path), &null, &[403]).await?;
    }
    let grab = serde_json::json!({"streams": ["BILLING"], "subjects": ["billing.>"]});
    for namespace in ["shop", "billing"] {
        let path = format!("/v1/namespaces/{namespace}/resources");
        refused(address, &shop_admin, ("PUT", &path), &grab, &[403]).await?;
    }
    refused(address, &shop_admin, ("DELETE", &module), &null, &[404]).await?;
    let billing_admin = serde_json::json!({"namespace": "billing", "role": "admin"});
    refused(
        address,
        &shop_admin,
        ("POST", "/v1/tokens"),
        &billing_admin,
        &[403],
    )
    .await?;
    let everyone = serde_json::json!({"namespace": "*", "role": "read"});
    refused(
        address,
        &shop_admin,
        ("POST", "/v1/tokens"),
        &everyone,
        &[403],
    )
    .await?;
    let revoke = format!("/v1/tokens/{billing_token_id}");
    refused(address, &shop_admin, ("DELETE", &revoke), &null, &[404]).await?;

    // Bindings of shop's own functions that would read billing's events or
    // Weir's record streams, or write into billing's subjects or records.
    let spy = "/v1/namespaces/shop/functions/spy";
    for (stream, subject) in [
        ("BILLING", "billing.>"),
        ("BILLING_OUT", "counter.out"),
        ("SHOP", "billing.in"),
        (dead_letters, "weir.dlq.>"),
        (weir_host::guest_logs::LOG_STREAM, "weir.logs.>"),
    ] {
        let binding =
            serde_json::json!({"stream": stream, "subject": subject, "key": {"header": "k"}});
        refused(address, &shop, ("PUT", spy), &binding, &[403, 422]).await?;
    }
    for output in [
        "billing.in",
        "billing.>",
        "counter.out",
        "weir.dlq.billing.ledger",
        "weir.logs.billing.ledger",
        "weir.>",
        ">",
        "*",
        "_INBOX.>",
    ] {
        let binding = serde_json::json!({
            "stream": "SHOP", "subject": "shop.in", "key": {"header": "k"}, "outputs": [output],
        });
        refused(address, &shop, ("PUT", spy), &binding, &[403, 422]).await?;
    }
    // A version of shop's own function on billing's module.
    let own = serde_json::json!({"stream": "SHOP", "subject": "shop.in", "key": {"header": "k"}});
    api_call(address, &shop, "PUT", spy, own).await?;
    let spy_versions = format!("{spy}/versions");
    refused(address, &shop, ("POST", &spy_versions), &version, &[422]).await?;
    // In the same words as for bytes no one uploaded: shop cannot tell
    // which digests billing holds.
    let made_up = "0".repeat(64);
    let answers = [&digest, &made_up].map(|module| {
        let body = serde_json::json!({"module": module})
            .to_string()
            .into_bytes();
        let path = spy_versions.clone();
        let shop = shop.clone();
        async move {
            let answer = request(address, &shop, "POST", &path, "application/json", &body).await?;
            anyhow::Ok(answer.body.replace(module.as_str(), "<digest>"))
        }
    });
    let [billings, nobodys] = answers;
    ensure!(billings.await? == nobodys.await?, "the refusals differ");

    // Nothing of shop's reached billing: its stream holds only its own
    // events, its outputs and dead letters are its own, its module and
    // token are still there, and its state counts each event once.
    ensure!(stream_len(&stack.js, "BILLING").await? == published.len() as u64);
    let outputs = read_stream(&stack.js, "BILLING_OUT").await?;
    ensure!(outputs.len() == 20, "{} outputs", outputs.len());
    let letters = read_stream(&stack.js, dead_letters).await?;
    ensure!(
        letters.len() == 1 && letters[0].subject.as_str() == "weir.dlq.billing.ledger",
        "{:?}",
        letters
            .iter()
            .map(|m| m.subject.to_string())
            .collect::<Vec<_>>()
    );
    let module_answer = request(address, &billing, "GET", &module, "", &[]).await?;
    ensure!(module_answer.status == 200, "{module_answer:?}");
    let function = api_call(address, &billing, "GET", ledger, null).await?;
    ensure!(function["stable"] == 1, "{function}");
    let counts = state_entries(&stack, "billing_ledger", "count").await?;
    let expected: Vec<(String, String)> =
        (0..4).map(|a| (format!("acct-{a}"), "5".into())).collect();
    ensure!(counts == expected, "{counts:?}");
    host.check()?;
    host.stop().await
}

/// A token revoked through one host is refused by another that has just
/// believed it, long before that host's lookup would have lapsed — also
/// when the hosts' listeners lost their connections just before.
#[sqlx::test(migrations = false)]
async fn a_token_revoked_on_one_host_is_refused_on_every_host(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (first, first_address) = api_host_with(&stack, vec![], |_| {}).await?;
    let (second, second_address) = api_host_with(&stack, vec![], |_| {}).await?;
    let list = "/v1/namespaces/shop/functions";
    let pool = stack.pool().await?;
    // Twice: once with the hosts listening, once revoked just after their
    // listeners' connections were killed (the announcement goes out while
    // no one listens).
    for listeners_lost in [false, true] {
        let (reader, id) = token(first_address, "shop", "read").await?;
        // The second host looks the token up and believes it for a while.
        let believed = request(second_address, &reader, "GET", list, "", &[]).await?;
        ensure!(believed.status == 200, "{believed:?}");
        if listeners_lost {
            let killed: i64 = sqlx::query_scalar(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'weir-api-revocations'",
            )
            .fetch_one(&pool)
            .await?;
            ensure!(killed == 2, "{killed} listeners");
        }
        let revoke = format!("/v1/tokens/{id}");
        let revoked = request(first_address, ADMIN, "DELETE", &revoke, "", &[]).await?;
        ensure!(revoked.status == 204, "{revoked:?}");
        let started = std::time::Instant::now();
        // Well under the 10 s a lookup is believed for.
        eventually(
            Duration::from_secs(3),
            "the second host to refuse the token",
            || async {
                Ok(request(second_address, &reader, "GET", list, "", &[])
                    .await?
                    .status
                    == 401)
            },
        )
        .await?;
        ensure!(started.elapsed() < weir_host::control::admission::LOOKUP_TTL);
    }
    first.stop().await?;
    second.stop().await
}
