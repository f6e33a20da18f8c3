//! Build driver for the repository: `cargo xtask <command>`.
//!
//! - `build-components`: builds the example guests to wasm32-wasip2 components.
//! - `build-guests`: builds the TypeScript and Python examples to components
//!   (see `guests`).
//! - `dev`: the local stack — services checked or started, examples built,
//!   `weir dev` running them with generated events.
//! - `test`: formatting, lints, guests, the other languages' native unit
//!   tests, then every test of the workspace.
//! - `faults [--long]`: the fault-injection suites alone; `--long` runs them
//!   at ten times the CI counts.
//! - `bench`: the throughput and latency benchmark (release build).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod guests;

/// Guest crates built to components.
const COMPONENTS: &[&str] = &[
    "enrich",
    "fraud-velocity",
    "passthrough",
    "sensor-average",
    "moving-sum",
    "user-sessions",
    "misbehave",
    "counter",
    "window-sum",
    "window-events",
    "nexmark",
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("build-components") => build_components(),
        Some("build-guests") => {
            guests::ensure_toolchains(&root)?;
            guests::build_components(&root, &target_dir(&root))
        }
        Some("dev") => {
            ensure_services()?;
            build_components()?;
            let components = target_dir(&root).join("wasm32-wasip2/component");
            run(cargo()
                .args(["run", "--release", "-p", "weir-host", "--bin", "weir", "--"])
                .arg("dev")
                .arg("--components")
                .arg(components)
                .args(&args[1..]))
        }
        Some("test") => {
            ensure_services()?;
            run(cargo().args(["fmt", "--all", "--check"]))?;
            build_components()?;
            run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            let mut wasm_clippy = cargo();
            wasm_clippy.args(["clippy", "--target", "wasm32-wasip2", "-p", "weir-sdk"]);
            for name in COMPONENTS {
                wasm_clippy.args(["-p", name]);
            }
            run(wasm_clippy.args(["--", "-D", "warnings"]))?;
            guests::ensure_toolchains(&root)?;
            guests::test_natively(&root)?;
            guests::build_components(&root, &target_dir(&root))?;
            test(&args[1..])
        }
        Some("faults") => {
            // `--long`: ten times the events and faults of the CI run; the
            // results go to docs/reliability.md.
            let long = args.iter().any(|a| a == "--long");
            ensure_services()?;
            build_components()?;
            run(cargo().args(["build", "--workspace", "--bins", "--exclude", "xtask"]))?;
            run(cargo()
                .env("WEIR_FAULTS_SCALE", if long { "10" } else { "1" })
                .args([
                    "nextest",
                    "run",
                    "-p",
                    "weir-e2e",
                    "--no-capture",
                    "faults::",
                ]))
        }
        Some("bench") => {
            ensure_services()?;
            build_components()?;
            guests::ensure_toolchains(&root)?;
            guests::build_components(&root, &target_dir(&root))?;
            run(cargo().args(["build", "--release", "-p", "weir-host", "--bin", "weir"]))?;
            run(cargo()
                .env("WEIR_BIN", target_dir(&root).join("release/weir"))
                .args([
                    "run",
                    "--release",
                    "-p",
                    "weir-e2e",
                    "--bin",
                    "weir-bench",
                    "--",
                ])
                .args(&args[1..]))
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <build-components | build-guests | dev | test | faults [--long] | bench> [args]"
            );
            bail!("unknown command")
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where cargo puts build outputs: `CARGO_TARGET_DIR`, or `target/`.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub(crate) fn run(command: &mut Command) -> Result<()> {
    eprintln!("+ {command:?}");
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// Installs or starts what the stack needs: the wasm32-wasip2 target,
/// nats-server, and a reachable Postgres.
fn ensure_services() -> Result<()> {
    run(Command::new("bash").arg("scripts/ensure-services.sh"))
}

fn build_components() -> Result<()> {
    let mut command = cargo();
    command.args([
        "build",
        "--target",
        "wasm32-wasip2",
        "--profile",
        "component",
    ]);
    for name in COMPONENTS {
        command.args(["-p", name]);
    }
    run(&mut command)
}

fn test(extra: &[String]) -> Result<()> {
    // The fault-injection tests run the real `weir` binary as a child
    // process, so they can SIGKILL it.
    run(cargo().args(["build", "--workspace", "--bins", "--exclude", "xtask"]))?;
    // DATABASE_URL (where `#[sqlx::test]` makes a database per test) comes
    // from the environment or, by default, from .cargo/config.toml.
    let nextest = Command::new("cargo-nextest")
        .arg("--version")
        .output()
        .is_ok();
    if nextest {
        run(cargo()
            .args(["nextest", "run", "--workspace", "--no-fail-fast"])
            .args(extra))
    } else {
        run(cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(extra))
    }
}
