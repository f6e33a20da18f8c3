//! The `weir` CLI against a running host's API, in the order of the README's
//! "Deploy through the API" section: deploy, events flow, list, deploy a
//! second version, switch back, show, remove, and a clear error for a
//! function that is not there.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::process::weir_binary;
use weir_e2e::*;

const ADMIN: &str = "weir_bootstrap_for_cli_tests";

/// Runs `weir <args>` against the API; its stdout, or its stderr as the
/// error when it fails.
async fn weir(address: SocketAddr, args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new(weir_binary()?)
        .args(args)
        .env("WEIR_API_URL", format!("http://{address}"))
        .env("WEIR_TOKEN", ADMIN)
        .env("WEIR_NAMESPACE", "shop")
        // Ordinary errors are printed without one all the same.
        .env("RUST_BACKTRACE", "1")
        .output()
        .await?;
    let stdout = String::from_utf8(output.stdout)?;
    if !output.status.success() {
        anyhow::bail!("{}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(stdout)
}

#[sqlx::test(migrations = false)]
async fn the_cli_deploys_lists_switches_and_removes(
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
    let counter = component("counter")?;
    let misbehave = component("misbehave")?;
    let counter = counter.to_str().context("path")?;
    let misbehave = misbehave.to_str().context("path")?;
    let binding = [
        "--name",
        "tally",
        "--stream",
        "COUNTED",
        "--subject",
        "counted.in",
        "--key",
        "json:/key",
        "--output",
        "counter.out",
        "--output",
        "fixture.out",
    ];

    let deployed = weir(
        address,
        &[&["fn", "deploy", counter][..], &binding].concat(),
    )
    .await?;
    assert!(
        deployed.starts_with("deployed shop/tally version 1 (module "),
        "{deployed}"
    );
    assert!(deployed.trim_end().ends_with(", serving"), "{deployed}");
    let event = |id: u64| {
        serde_json::json!({"key": format!("k{}", id % 4), "id": id, "value": 1, "do": "ok"})
            .to_string()
            .into_bytes()
    };
    publish_all(&stack.js, "counted.in", (0..100).map(event)).await?;
    eventually(
        Duration::from_secs(60),
        "version 1 handling events",
        || async { Ok(stream_len(&stack.js, "COUNTER_OUT").await? == 100) },
    )
    .await?;

    let listed = weir(address, &["fn", "ls"]).await?;
    let rows: Vec<Vec<&str>> = listed
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [vec!["NAME", "SERVING"], vec!["tally", "1"]],
        "{listed}"
    );

    let second = weir(
        address,
        &[&["fn", "deploy", misbehave][..], &binding].concat(),
    )
    .await?;
    assert!(
        second.starts_with("deployed shop/tally version 2"),
        "{second}"
    );
    let mut id = 100;
    eventually(Duration::from_secs(30), "version 2 serving", || {
        id += 1;
        let js = stack.js.clone();
        async move {
            publish_all(&js, "counted.in", [event(id)]).await?;
            Ok(stream_len(&js, "FIXTURE_OUT").await? >= 1)
        }
    })
    .await?;

    // Its dead letters, through the API with the namespace's token.
    let rejected = serde_json::json!({"key": "k", "id": 999, "do": "reject"}).to_string();
    publish_all(&stack.js, "counted.in", [rejected.into_bytes()]).await?;
    eventually(
        Duration::from_secs(30),
        "the dead letter in `weir fn dead-letters`",
        || async {
            let shown = weir(address, &["fn", "dead-letters", "tally"]).await?;
            Ok(shown.contains("asked to reject") && shown.contains("\"id\":999"))
        },
    )
    .await?;

    let back = weir(address, &["rollout", "set", "tally", "--stable", "1"]).await?;
    assert_eq!(back, "shop/tally now serves version 1\n");
    let status = weir(address, &["rollout", "status", "tally"]).await?;
    assert!(
        status.starts_with("shop/tally serves version 1\n"),
        "{status}"
    );
    let status_rows: Vec<Vec<&str>> = status
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(status_rows.len(), 2, "{status}");
    assert_eq!((status_rows[0][0], status_rows[0][2]), ("1", "stable"));
    assert_eq!((status_rows[1][0], status_rows[1][2]), ("2", "-"));
    let shown: serde_json::Value =
        serde_json::from_str(&weir(address, &["fn", "show", "tally", "--json"]).await?)?;
    assert_eq!(shown["stable"], 1);
    assert_eq!(shown["binding"]["subject"], "counted.in");

    assert_eq!(
        weir(address, &["fn", "rm", "tally"]).await?,
        "removed shop/tally\n"
    );
    assert_eq!(
        weir(address, &["fn", "ls"]).await?,
        "NAME                             SERVING\n"
    );
    let missing = weir(address, &["fn", "show", "tally"])
        .await
        .expect_err("gone");
    assert_eq!(
        missing.to_string(),
        "error: 404 not_found: no function `tally` in namespace `shop`\n",
        "one line, no backtrace"
    );
    let missing = weir(address, &["fn", "show", "tally", "--json"])
        .await
        .expect_err("gone");
    let missing: serde_json::Value = serde_json::from_str(&missing.to_string())?;
    assert_eq!(
        (missing["error"].as_str(), missing["status"].as_u64()),
        (Some("not_found"), Some(404)),
        "{missing}"
    );
    host.stop().await
}

/// A host that accepts connections and never answers costs the CLI its
/// call timeout, not minutes.
#[tokio::test]
async fn the_cli_gives_up_on_a_mute_api() -> Result<()> {
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = mute.local_addr()?;
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = mute.accept().await {
            connections.push(connection);
        }
    });
    let failed = weir(address, &["fn", "ls", "--timeout-secs", "1"])
        .await
        .expect_err("no answer");
    assert!(
        failed.to_string().contains("timed out"),
        "the error says why: {failed}"
    );
    held.abort();
    Ok(())
}
