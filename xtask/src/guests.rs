//! Guests in languages other than Rust: their toolchains, their native unit
//! tests and their components.
//!
//! `scripts/ensure-guest-toolchains.sh` installs the toolchains (cached
//! under `/opt/weir-tools`); the JavaScript/TypeScript SDK and examples are
//! one npm workspace at the repository root (`npm ci`), and Python runs on a
//! venv holding componentize-py and pytest. Every example is a project with
//! a `weir.toml`, tested and built with `weir test` and `weir build` as a
//! user's would be. Components go to
//! `<target>/guest-components/<lang>/<name>.wasm`, rebuilt only when a hash
//! of their sources, the SDK, the WIT, `weir build`'s code and the toolchain
//! changes: an interpreted component takes 10–20 s of CPU to build.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::run;

/// A language's example functions, each a standalone project under
/// `examples/<dir>/<name>`.
pub struct Language {
    /// The directory under `examples/` and under `guest-components/`.
    pub dir: &'static str,
    /// What fixes the toolchain's output besides the sources: hashed in.
    pub toolchain: &'static str,
}

pub const TYPESCRIPT: Language = Language {
    dir: "ts",
    toolchain: "componentize-js 0.23.0, esbuild 0.28.2",
};
pub const PYTHON: Language = Language {
    dir: "python",
    toolchain: "componentize-py 0.25.1",
};
pub const C: Language = Language {
    dir: "c",
    toolchain: "clang-19, wasi-libc, wit-bindgen-c 0.61.1, reactor adapter 48.0.8",
};
pub const CPP: Language = Language {
    dir: "cpp",
    toolchain: "clang++-19, libc++, wasi-libc, wit-bindgen-c 0.61.1, reactor adapter 48.0.8",
};

/// The examples built in every language.
pub const EXAMPLES: &[&str] = &["fraud-velocity", "enrich"];

/// Where the Python guest toolchain lives (see ensure-guest-toolchains.sh).
fn python() -> PathBuf {
    let venv = std::env::var_os("WEIR_PYTHON_GUESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/weir-tools/python-guests-0.25.1"));
    venv.join("bin/python")
}

/// Installs what is missing and the npm workspace's packages.
pub fn ensure_toolchains(root: &Path) -> Result<()> {
    run(Command::new("bash").arg("scripts/ensure-guest-toolchains.sh"))?;
    let installed = root.join("node_modules/.package-lock.json");
    let lock = root.join("package-lock.json");
    if newer(&lock, &installed) {
        run(npm(root).args(["ci", "--no-audit", "--no-fund", "--prefer-offline"]))?;
    }
    Ok(())
}

/// Is `a` newer than `b` (or `b` missing)?
fn newer(a: &Path, b: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (modified(a), modified(b)) {
        (Some(a), Some(b)) => a > b,
        _ => true,
    }
}

fn npm(dir: &Path) -> Command {
    let mut command = Command::new("npm");
    command.current_dir(dir);
    command
}

/// `weir`, built from this checkout if it is not, with the guest
/// toolchain's Python.
fn weir_command(root: &Path) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command
        .current_dir(root)
        .env("WEIR_PYTHON", python())
        .args(["run", "--quiet", "-p", "weir-host", "--bin", "weir", "--"]);
    command
}

/// Each SDK's and each example's native unit tests, under the language's
/// own runner (Vitest with tsc, pytest, the C/C++ runner): the SDKs' with
/// npm and pytest, the examples' with `weir test`, as a user runs them.
pub fn test_natively(root: &Path) -> Result<()> {
    run(npm(root).args(["test", "--workspace", "guest-sdk/js"]))?;
    let sdk = root.join("guest-sdk/python");
    run(Command::new(python())
        .current_dir(&sdk)
        .env("PYTHONPATH", &sdk)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"]))?;
    for language in [&TYPESCRIPT, &PYTHON, &C, &CPP] {
        for name in EXAMPLES {
            let project = root.join("examples").join(language.dir).join(name);
            run(weir_command(root).arg("test").arg("--dir").arg(project))?;
        }
    }
    Ok(())
}

/// Builds every example in every language to `<target>/guest-components`.
pub fn build_components(root: &Path, target: &Path) -> Result<()> {
    for language in [&TYPESCRIPT, &PYTHON, &C, &CPP] {
        for name in EXAMPLES {
            build_component(root, target, language, name)?;
        }
    }
    Ok(())
}

fn build_component(root: &Path, target: &Path, language: &Language, name: &str) -> Result<()> {
    let project = root.join("examples").join(language.dir).join(name);
    let sdk = root.join("guest-sdk").join(match language.dir {
        "ts" => "js",
        "cpp" => "c",
        other => other,
    });
    // `weir build`'s own code (all of the C build's).
    let weir = root.join("host/src/bin/weir");
    let out_dir = target.join("guest-components").join(language.dir);
    std::fs::create_dir_all(&out_dir)?;
    let output = out_dir.join(format!("{name}.wasm"));
    let stamp = out_dir.join(format!("{name}.inputs"));
    let mut hasher = DefaultHasher::new();
    field(&mut hasher, language.toolchain.as_bytes());
    // What else decides the output: another venv or WIT directory.
    for variable in ["WEIR_PYTHON_GUESTS", "WEIR_WIT"] {
        let value = std::env::var(variable).unwrap_or_default();
        field(&mut hasher, value.as_bytes());
    }
    for dir in [&project, &sdk, &root.join("wit")] {
        hash_tree(dir, &mut hasher)?;
    }
    hash_tree(&weir, &mut hasher)?;
    let digest = format!("{:016x}", hasher.finish());
    if output.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&digest) {
        eprintln!("{} is up to date", output.display());
        return Ok(());
    }
    // `weir build`, as a user builds the project; it writes `<name>.wasm`
    // beside the sources.
    run(weir_command(root).arg("build").arg("--dir").arg(&project))?;
    std::fs::rename(project.join(format!("{name}.wasm")), &output)?;
    std::fs::write(&stamp, digest)?;
    Ok(())
}

/// Hashes `bytes` with its length first, so that no two sequences of
/// fields hash the same bytes.
fn field(hasher: &mut DefaultHasher, bytes: &[u8]) {
    hasher.write_u64(bytes.len() as u64);
    hasher.write(bytes);
}

/// Hashes the paths and contents of the sources under `dir`, in order,
/// skipping installed packages, build outputs and caches.
fn hash_tree(dir: &Path, hasher: &mut DefaultHasher) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let skipped = [
            "node_modules",
            ".weir-build",
            "__pycache__",
            ".pytest_cache",
        ];
        if skipped.contains(&name.as_ref()) || name.ends_with(".wasm") {
            continue;
        }
        let path = entry.path();
        field(hasher, name.as_bytes());
        if entry.file_type()?.is_dir() {
            field(hasher, b"dir");
            hash_tree(&path, hasher)?;
            field(hasher, b"end");
        } else {
            field(hasher, &std::fs::read(&path)?);
        }
    }
    Ok(())
}
