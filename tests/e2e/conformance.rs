//! The API against its own OpenAPI document, checked by schemathesis (from
//! PyPI, installed by `scripts/ensure-services.sh`): every documented
//! operation called with generated valid and invalid input under an admin
//! token of every namespace. No answer may be a server error, or have a
//! status, header, content type or body the document does not allow.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;
use weir_host::config::StreamSpec;

use crate::api::{ADMIN, api_host_with, post};

/// The schemathesis `scripts/ensure-services.sh` installs, unless
/// `WEIR_SCHEMATHESIS` names another.
const DEFAULT_PROGRAM: &str = "/opt/weir-tools/schemathesis-4.32.5/bin/schemathesis";

/// What schemathesis checks: every check about the server's answers.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance";

#[sqlx::test(migrations = false)]
async fn schemathesis_finds_no_server_error_and_no_answer_the_document_does_not_allow(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let program = std::env::var("WEIR_SCHEMATHESIS").unwrap_or_else(|_| DEFAULT_PROGRAM.into());
    if !std::path::Path::new(&program).exists() {
        bail!("{program} is missing: run scripts/ensure-services.sh (or set WEIR_SCHEMATHESIS)");
    }
    let stack = Stack::start(&db).await?;
    // A stream of the `shop` namespace's, so generated bindings can be
    // accepted as well as refused.
    let streams = vec![StreamSpec {
        name: "SHOP".into(),
        subjects: vec!["shop.>".into()],
        duplicate_window_secs: 120,
    }];
    let (host, address) = api_host_with(&stack, streams, |api| {
        // Schemathesis calls as fast as it can; the limits are tested elsewhere.
        api.requests_per_second = 1_000_000;
        api.requests_per_second_per_namespace = 1_000_000;
        api.requests_per_second_per_client = 1_000_000;
        api.max_module_bytes = 1 << 20;
    })
    .await?;
    let workdir = tempdir::TempDir::new("weir-schemathesis")?;
    // First with whatever names it makes up...
    schemathesis(&program, address, &workdir, "").await?;
    // ...then on a function that exists, with a version, and its module, so
    // that the routes past the 404s are called too.
    let module = std::fs::read(component("counter")?)?;
    let uploaded = post(address, "/v1/modules", ADMIN, "application/wasm", &module).await?;
    let digest = uploaded.json()?["digest"]
        .as_str()
        .context("the upload's digest")?
        .to_string();
    let binding = serde_json::json!({"stream": "SHOP", "subject": "shop.in", "key": {"json_pointer": "/key"}});
    api_call(
        address,
        ADMIN,
        "PUT",
        "/v1/namespaces/shop/functions/f",
        binding,
    )
    .await?;
    let version = serde_json::json!({"module": digest});
    let path = "/v1/namespaces/shop/functions/f/versions";
    api_call(address, ADMIN, "POST", path, version).await?;
    let known = format!(
        "[parameters]\n\"path.namespace\" = \"shop\"\n\"path.name\" = \"f\"\n\"path.digest\" = \"{digest}\"\n"
    );
    schemathesis(&program, address, &workdir, &known).await?;
    host.check()?;
    host.stop().await
}

/// Runs schemathesis against the API at `address` with `config` (TOML) as
/// its configuration; fails with its report unless it found nothing.
async fn schemathesis(
    program: &str,
    address: std::net::SocketAddr,
    workdir: &tempdir::TempDir,
    config: &str,
) -> Result<()> {
    let config_file = workdir.path().join("schemathesis.toml");
    std::fs::write(&config_file, config)?;
    let hooks = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemathesis/hooks.py");
    let run = tokio::process::Command::new(program)
        .arg("--config-file")
        .arg(&config_file)
        .args(["run", &format!("http://{address}/v1/openapi.json")])
        .args(["--header", &format!("Authorization: Bearer {ADMIN}")])
        .args(["--phases", "examples,coverage,fuzzing", "--checks", CHECKS])
        .args(["--max-examples", "60", "--seed", "20261206"])
        .args(["--generation-database", "none", "--request-timeout", "10"])
        .arg("--no-color")
        .env("SCHEMATHESIS_HOOKS", &hooks)
        .current_dir(workdir.path())
        .kill_on_drop(true)
        .output();
    let run = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .context("schemathesis ran for over 10 minutes")??;
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    if !run.status.success() {
        bail!(
            "schemathesis found answers the document does not allow ({}):\n{report}",
            run.status
        );
    }
    // It did test the API, not an empty document.
    anyhow::ensure!(report.contains("Tested: 19"), "{report}");
    Ok(())
}
