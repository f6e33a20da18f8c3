//! `weir build` and `weir test` for C and C++ projects.
//!
//! Build: bindings for the `event-handler` world generated from Weir's
//! `wit/` with wit-bindgen's C generator, the sources compiled with clang
//! (clang++ and libc++ for C++, without exceptions) for `wasm32-wasi`
//! (wasi-libc) as a reactor, and the core module made a component with
//! WASI's preview-1 reactor adapter (what `wasm-tools component new
//! --adapt` does). Test: each `tests/*.c` (`*.cpp`) compiled natively with
//! `-DWEIR_TESTING` (the SDK's in-memory harness) and run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::project::run;

/// Which of the two languages a project is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    C,
    Cpp,
}

impl Dialect {
    fn extension(self) -> &'static str {
        match self {
            Dialect::C => "c",
            Dialect::Cpp => "cpp",
        }
    }

    /// Language flags for both the wasm32 and the native compiler.
    fn flags(self) -> &'static [&'static str] {
        match self {
            Dialect::C => &["-std=c11"],
            Dialect::Cpp => &["-std=c++17", "-fno-exceptions"],
        }
    }
}

/// A compiler for wasm32: `$WEIR_CLANG` (`$WEIR_CLANGXX`), else the first
/// of these on the PATH (Debian's clang-19 with lld-19, wasi-libc,
/// libclang-rt-19-dev-wasm32 and libc++-19-dev-wasm32 is what
/// `scripts/ensure-guest-toolchains.sh` installs).
fn clang(dialect: Dialect) -> Result<PathBuf> {
    let (variable, names): (&str, &[&str]) = match dialect {
        Dialect::C => ("WEIR_CLANG", &["clang-19", "clang"]),
        Dialect::Cpp => ("WEIR_CLANGXX", &["clang++-19", "clang++"]),
    };
    if let Some(path) = std::env::var_os(variable) {
        return Ok(PathBuf::from(path));
    }
    for name in names {
        if let Some(path) = std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join(name))
            .find(|p| p.exists())
        {
            return Ok(path);
        }
    }
    bail!(
        "no {} for wasm32: install clang-19, lld-19, wasi-libc, libclang-rt-19-dev-wasm32 and \
         libc++-19-dev-wasm32 (apt), or set {variable}",
        names[0]
    )
}

/// Writes the C bindings of `weir:function/event-handler` into `out`.
fn bindings(wit: &Path, out: &Path) -> Result<()> {
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve
        .push_dir(wit)
        .with_context(|| format!("reading the WIT in {}", wit.display()))?;
    let world = resolve.select_world(&[package], Some("event-handler"))?;
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default()
        .build()
        .generate(&mut resolve, world, &mut files)?;
    std::fs::create_dir_all(out)?;
    for (name, bytes) in files.iter() {
        std::fs::write(out.join(name), bytes)?;
    }
    Ok(())
}

/// The files with `extension` directly in `dir`, sorted.
fn sources(dir: &Path, extension: &str) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    found.sort();
    Ok(found)
}

/// Builds the project in `dir` into the component `output`.
pub fn build(dialect: Dialect, weir: &Path, dir: &Path, output: &Path) -> Result<()> {
    let work = dir.join(".weir-build");
    let generated = work.join("bindings");
    bindings(&weir.join("wit"), &generated)?;
    let handlers = sources(&dir.join("src"), dialect.extension())?;
    ensure!(
        !handlers.is_empty(),
        "no .{} files in {}",
        dialect.extension(),
        dir.join("src").display()
    );
    let wasm32 = ["--target=wasm32-wasi", "-O2"];
    let warnings = ["-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"];
    // The bindings are C whatever the handler is written in.
    let glue = work.join("event_handler.o");
    run(Command::new(clang(Dialect::C)?)
        .args(wasm32)
        .args(Dialect::C.flags())
        .arg("-c")
        .arg(generated.join("event_handler.c"))
        .arg("-o")
        .arg(&glue))?;
    let core = work.join("core.wasm");
    run(Command::new(clang(dialect)?)
        .args(wasm32)
        .arg("-mexec-model=reactor")
        .args(dialect.flags())
        .args(warnings)
        .arg("-I")
        .arg(weir.join("guest-sdk/c"))
        .arg("-I")
        .arg(&generated)
        .args(&handlers)
        .arg(&glue)
        .arg(generated.join("event_handler_component_type.o"))
        .args(["-Wl,--strip-debug", "-o"])
        .arg(&core))?;
    let module = std::fs::read(&core)?;
    let component = wit_component::ComponentEncoder::default()
        .validate(true)
        .module(&module)
        .context("reading the core module")?
        .adapter(
            "wasi_snapshot_preview1",
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )
        .context("adding the WASI preview-1 reactor adapter")?
        .encode()
        .context("making the component")?;
    std::fs::write(output, component)?;
    Ok(())
}

/// Compiles and runs each `tests/*.c` (`*.cpp`) natively against the SDK's
/// harness.
pub fn test(dialect: Dialect, weir: &Path, dir: &Path) -> Result<()> {
    let tests = sources(&dir.join("tests"), dialect.extension())?;
    ensure!(
        !tests.is_empty(),
        "no .{} files in {}",
        dialect.extension(),
        dir.join("tests").display()
    );
    let work = dir.join(".weir-build/tests");
    std::fs::create_dir_all(&work)?;
    let (variable, default) = match dialect {
        Dialect::C => ("CC", "cc"),
        Dialect::Cpp => ("CXX", "c++"),
    };
    let compiler = std::env::var_os(variable).unwrap_or_else(|| default.into());
    for test in tests {
        let stem = test.file_stem().context("a test file's name")?;
        let program = work.join(stem);
        run(Command::new(&compiler)
            .args(dialect.flags())
            .args(["-Wall", "-Wextra", "-Werror", "-DWEIR_TESTING"])
            .arg("-I")
            .arg(weir.join("guest-sdk/c"))
            .arg(&test)
            .arg("-o")
            .arg(&program))?;
        run(&mut Command::new(&program))?;
    }
    Ok(())
}
