//! `weir new` for each language, then `weir test`, `weir build`, `weir fn
//! deploy`, and events flow: exactly the sequence a new user follows (the
//! templates' READMEs), with exact per-key counts at the end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::process::weir_binary;
use weir_e2e::*;

const ADMIN: &str = "weir_bootstrap_for_template_tests";

/// Runs `weir <args>` in `dir` against the API at `address`; its stdout, or
/// its stderr as the error.
async fn weir(dir: &Path, address: Option<SocketAddr>, args: &[&str]) -> Result<String> {
    let mut command = tokio::process::Command::new(weir_binary()?);
    command.args(args).current_dir(dir);
    if let Some(address) = address {
        command
            .env("WEIR_API_URL", format!("http://{address}"))
            .env("WEIR_TOKEN", ADMIN)
            .env("WEIR_NAMESPACE", "shop");
    }
    // A Rust template builds in a target directory of its own, kept between
    // runs beside the workspace's.
    command.env("CARGO_TARGET_DIR", target_dir().join("template-projects"));
    let output = command.output().await?;
    anyhow::ensure!(
        output.status.success(),
        "weir {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

async fn new_build_deploy_and_count(db: &PgConnectOptions, lang: &str) -> Result<()> {
    let work = tempdir::TempDir::new("weir-template")?;
    let name = format!("hello-{lang}");
    let output_subject = format!("{name}.counts");
    let project = work.path().join(&name);
    weir(work.path(), None, &["new", &name, "--lang", lang]).await?;
    assert!(project.join("weir.toml").exists());
    assert!(project.join("README.md").exists());
    weir(&project, None, &["test"]).await?;
    weir(&project, None, &["build"]).await?;
    let component = project.join(format!("{name}.wasm"));
    let component = component.to_str().context("path")?;

    let stack = Stack::start(db).await?;
    let streams = vec![
        stream("INPUT", &["input.>"]),
        stream("COUNTS", &[output_subject.as_str()]),
    ];
    let (host, address) = api_host(&stack, streams, ADMIN).await?;
    let deployed = weir(
        &project,
        Some(address),
        &[
            "fn",
            "deploy",
            component,
            "--name",
            &name,
            "--stream",
            "INPUT",
            "--subject",
            "input.events",
            "--key",
            "json:/user",
            "--output",
            &output_subject,
        ],
    )
    .await?;
    assert!(deployed.contains("serving"), "{deployed}");

    let events: Vec<Vec<u8>> = (0..300)
        .map(|i| format!(r#"{{"user": "u{}", "n": {i}}}"#, i % 7).into_bytes())
        .collect();
    publish_all(&stack.js, "input.events", events).await?;
    eventually(Duration::from_secs(60), "a count per event", || async {
        Ok(stream_len(&stack.js, "COUNTS").await? >= 300)
    })
    .await?;
    host.stop().await?;

    // Each key's outputs count 1, 2, ... with no gap and no repeat.
    let mut counts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for message in read_stream(&stack.js, "COUNTS").await? {
        let out: serde_json::Value = serde_json::from_slice(&message.payload)?;
        let key = out["key"].as_str().context("key")?.to_string();
        counts
            .entry(key)
            .or_default()
            .push(out["count"].as_u64().context("count")?);
    }
    assert_eq!(counts.len(), 7);
    for (key, seen) in &counts {
        let expected: Vec<u64> = (1..=seen.len() as u64).collect();
        let total = (0..300).filter(|i| format!("u{}", i % 7) == *key).count();
        assert_eq!(seen, &expected, "{key}");
        assert_eq!(seen.len(), total, "{key}");
    }
    let stored = state_entries(&stack, &format!("shop_{name}"), "count").await?;
    assert_eq!(stored.len(), 7);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_new_rust_project_builds_deploys_and_counts(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    new_build_deploy_and_count(&db, "rust").await
}

#[sqlx::test(migrations = false)]
async fn a_new_typescript_project_builds_deploys_and_counts(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    new_build_deploy_and_count(&db, "ts").await
}

#[sqlx::test(migrations = false)]
async fn a_new_python_project_builds_deploys_and_counts(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    new_build_deploy_and_count(&db, "python").await
}

#[sqlx::test(migrations = false)]
async fn a_new_c_project_builds_deploys_and_counts(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    new_build_deploy_and_count(&db, "c").await
}

#[sqlx::test(migrations = false)]
async fn a_new_cpp_project_builds_deploys_and_counts(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    new_build_deploy_and_count(&db, "cpp").await
}
