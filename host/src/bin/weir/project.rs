//! `weir new`, `weir build` and `weir test`: a function's project in Rust,
//! TypeScript, Python, C or C++, from a template to a component.
//!
//! `weir new` writes a template from `templates/<lang>` (compiled into the
//! binary) and a `weir.toml` saying the project's language, its name and the
//! Weir checkout whose SDKs and `wit/` it builds against. `weir build` and
//! `weir test` read that file and run the language's own toolchain: cargo;
//! npm with esbuild, componentize-js and Vitest; componentize-py and pytest;
//! clang with wasi-libc and a native test runner (`cbuild.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use figment::Figment;
use figment::providers::{Format, Toml};
use serde::{Deserialize, Serialize};

use crate::cbuild::Dialect;

/// The languages `weir new` has a template for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    Rust,
    Ts,
    Python,
    C,
    Cpp,
}

impl Lang {
    /// As `weir.toml` and `--lang` spell it.
    fn as_str(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Ts => "ts",
            Lang::Python => "python",
            Lang::C => "c",
            Lang::Cpp => "cpp",
        }
    }
}

#[derive(clap::Args)]
pub struct NewArgs {
    /// The function's name: lowercase letters, digits and `-`.
    name: String,
    #[arg(long, value_enum)]
    lang: Lang,
    /// Where to write the project (default: ./<name>).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The Weir checkout whose SDKs and wit/ the project uses (default: the
    /// one this `weir` was built from).
    #[arg(long, env = "WEIR_HOME")]
    weir_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ProjectArgs {
    /// The project's directory (holding weir.toml).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

/// `weir.toml`: what `weir build` and `weir test` need to know.
#[derive(Debug, Serialize, Deserialize)]
struct Project {
    name: String,
    lang: Lang,
    /// The Weir checkout the project builds against.
    weir: PathBuf,
}

/// A template's files: the path written (`.tmpl` dropped, `gitignore` as
/// `.gitignore`) and the text before substitution.
fn template(lang: Lang) -> &'static [(&'static str, &'static str)] {
    macro_rules! files {
        ($($path:literal),* $(,)?) => {
            &[$(($path, include_str!(concat!("../../../../templates/", $path)))),*]
        };
    }
    match lang {
        Lang::Rust => files![
            "rust/Cargo.toml.tmpl",
            "rust/src/lib.rs.tmpl",
            "rust/README.md.tmpl",
            "rust/gitignore.tmpl",
        ],
        Lang::Ts => files![
            "ts/package.json.tmpl",
            "ts/tsconfig.json",
            "ts/src/handler.ts",
            "ts/src/handler.test.ts",
            "ts/README.md.tmpl",
            "ts/gitignore.tmpl",
        ],
        Lang::C => files![
            "c/src/handler.c",
            "c/tests/test_handler.c",
            "c/README.md.tmpl",
            "c/gitignore.tmpl",
        ],
        Lang::Cpp => files![
            "cpp/src/handler.cpp",
            "cpp/tests/test_handler.cpp",
            "cpp/README.md.tmpl",
            "c/gitignore.tmpl",
        ],
        Lang::Python => files![
            "python/handler.py",
            "python/test_handler.py",
            "python/README.md.tmpl",
            "python/gitignore.tmpl",
        ],
    }
}

/// The Weir checkout this binary was built from.
fn built_from() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `text` as a quoted string that is valid both in JSON and as a TOML basic
/// string: `"` and `\\` escaped, control characters (DEL too, which TOML
/// refuses raw) as `\\uXXXX`.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c < ' ' || c == '\u{7f}' => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A name the API takes for a function that also starts with a letter, as
/// crate and package names must.
fn valid_name(name: &str) -> bool {
    weir_host::control::api::is_namespace_name(name)
        && name.starts_with(|c: char| c.is_ascii_lowercase())
}

/// Why the language's own tools would refuse `name` as a project's name.
fn toolchain_problem(lang: Lang, name: &str) -> Option<&'static str> {
    const RUST_RESERVED: &[&str] = &[
        "abstract",
        "alloc",
        "as",
        "async",
        "await",
        "become",
        "box",
        "break",
        "const",
        "continue",
        "core",
        "crate",
        "do",
        "dyn",
        "else",
        "enum",
        "extern",
        "false",
        "final",
        "fn",
        "for",
        "gen",
        "if",
        "impl",
        "in",
        "let",
        "loop",
        "macro",
        "match",
        "mod",
        "move",
        "mut",
        "override",
        "priv",
        "proc-macro",
        "pub",
        "ref",
        "return",
        "self",
        "static",
        "std",
        "struct",
        "super",
        "test",
        "trait",
        "true",
        "try",
        "type",
        "typeof",
        "unsafe",
        "unsized",
        "use",
        "virtual",
        "where",
        "while",
        "yield",
    ];
    // npm refuses a package that depends on a package of its own name.
    const NPM_DEPENDENCIES: &[&str] = &["esbuild", "typescript", "vitest"];
    match lang {
        Lang::Rust if RUST_RESERVED.contains(&name) => {
            Some("cargo refuses it as a crate name (a Rust keyword or a built-in crate)")
        }
        Lang::Ts if NPM_DEPENDENCIES.contains(&name) => {
            Some("npm refuses a package named like one of its dependencies")
        }
        _ => None,
    }
}

pub fn new(args: NewArgs) -> Result<()> {
    ensure!(
        valid_name(&args.name),
        "a function's name is 1 to 63 lowercase letters, digits and `-`, starting with a letter: {:?}",
        args.name
    );
    if let Some(problem) = toolchain_problem(args.lang, &args.name) {
        bail!(
            "{:?} cannot name a {} project: {problem}",
            args.name,
            args.lang.as_str()
        );
    }
    let weir = args.weir_dir.unwrap_or_else(built_from);
    let weir = weir.canonicalize().with_context(|| {
        format!(
            "the Weir checkout {} (pass --weir-dir or set WEIR_HOME)",
            weir.display()
        )
    })?;
    ensure!(
        weir.join("wit/function.wit").exists() && weir.join("guest-sdk").is_dir(),
        "{} is not a Weir checkout (no wit/function.wit and guest-sdk/): pass --weir-dir",
        weir.display()
    );
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    ensure!(
        !dir.exists() || dir.read_dir()?.next().is_none(),
        "{} exists and is not empty",
        dir.display()
    );
    let weir_text = weir
        .to_str()
        .context("the Weir checkout's path is not UTF-8")?;
    // Inside a JSON or TOML string the path is escaped (both take JSON's
    // escapes for `"`, `\\` and control characters).
    let weir_quoted = quoted(weir_text);
    let weir_escaped = &weir_quoted[1..weir_quoted.len() - 1];
    let substitute = |path: &str, text: &str| {
        let in_string = path.contains(".json") || path.contains(".toml");
        text.replace("{{name}}", &args.name)
            .replace("{{crate}}", &args.name.replace('-', "_"))
            .replace("{{weir}}", if in_string { weir_escaped } else { weir_text })
    };
    for (path, text) in template(args.lang) {
        let relative = path.split_once('/').map_or(*path, |(_, rest)| rest);
        let relative = relative.strip_suffix(".tmpl").unwrap_or(relative);
        let relative = if relative == "gitignore" {
            ".gitignore"
        } else {
            relative
        };
        let target = dir.join(relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&target, substitute(path, text))
            .with_context(|| format!("writing {}", target.display()))?;
    }
    let manifest = format!(
        "# Written by `weir new`; read by `weir build` and `weir test`.\nname = {}\nlang = {}\nweir = {}\n",
        quoted(&args.name),
        quoted(args.lang.as_str()),
        weir_quoted
    );
    std::fs::write(dir.join("weir.toml"), manifest)?;
    if args.lang == Lang::Rust {
        // Weir's lock file pins the dependency versions its SDK is tested
        // with; cargo keeps what the project uses and resolves the rest.
        let lock = weir.join("Cargo.lock");
        if lock.exists() {
            std::fs::copy(&lock, dir.join("Cargo.lock"))?;
        }
    }
    println!(
        "wrote {} ({:?}): cd there, then `weir test` and `weir build`",
        dir.display(),
        args.lang
    );
    Ok(())
}

fn load(dir: &Path) -> Result<Project> {
    let manifest = dir.join("weir.toml");
    ensure!(
        manifest.exists(),
        "no weir.toml in {}: is this a project `weir new` wrote?",
        dir.display()
    );
    let mut project: Project = Figment::from(Toml::file_exact(&manifest))
        .extract()
        .with_context(|| format!("reading {}", manifest.display()))?;
    // A relative checkout path is relative to the project; made absolute,
    // because the tools run in other directories.
    let weir = dir.join(&project.weir);
    project.weir = weir
        .canonicalize()
        .with_context(|| format!("the Weir checkout {} (weir.toml)", weir.display()))?;
    Ok(project)
}

pub(crate) fn run(command: &mut Command) -> Result<()> {
    eprintln!("+ {command:?}");
    let status = command
        .status()
        .with_context(|| format!("running {command:?} (is the language's toolchain installed?)"))?;
    ensure!(status.success(), "{command:?} failed with {status}");
    Ok(())
}

/// Builds the project's component into `<dir>/<name>.wasm`.
pub fn build(args: ProjectArgs) -> Result<()> {
    let project = load(&args.dir)?;
    let output = args.dir.join(format!("{}.wasm", project.name));
    match project.lang {
        Lang::Rust => {
            run(Command::new(cargo()).current_dir(&args.dir).args([
                "build",
                "--target",
                "wasm32-wasip2",
                "--release",
            ]))?;
            // Where cargo put it: CARGO_TARGET_DIR (relative to the
            // project, as cargo reads it there), or the project's target/.
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| args.dir.join("target"), |dir| args.dir.join(dir));
            let built = target
                .join("wasm32-wasip2/release")
                .join(format!("{}.wasm", project.name.replace('-', "_")));
            std::fs::copy(&built, &output)
                .with_context(|| format!("copying {}", built.display()))?;
        }
        Lang::Ts => {
            npm_install_once(&args.dir)?;
            run(Command::new("npm")
                .current_dir(&args.dir)
                .args(["run", "build"]))?;
        }
        Lang::Python => run(python(&project, &args.dir)?
            .args(["-m", "weir_sdk.build", "handler", "-o"])
            .arg(format!("{}.wasm", project.name)))?,
        Lang::C => crate::cbuild::build(Dialect::C, &project.weir, &args.dir, &output)?,
        Lang::Cpp => crate::cbuild::build(Dialect::Cpp, &project.weir, &args.dir, &output)?,
    }
    ensure!(output.exists(), "the build wrote no {}", output.display());
    println!("built {}", output.display());
    Ok(())
}

/// Runs the project's native unit tests.
pub fn test(args: ProjectArgs) -> Result<()> {
    let project = load(&args.dir)?;
    match project.lang {
        Lang::Rust => run(Command::new(cargo()).current_dir(&args.dir).arg("test")),
        Lang::Ts => {
            npm_install_once(&args.dir)?;
            run(Command::new("npm").current_dir(&args.dir).arg("test"))
        }
        Lang::Python => run(python(&project, &args.dir)?.args(["-m", "pytest", "-q"])),
        Lang::C => crate::cbuild::test(Dialect::C, &project.weir, &args.dir),
        Lang::Cpp => crate::cbuild::test(Dialect::Cpp, &project.weir, &args.dir),
    }
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs `npm install` unless the project's packages are installed, here or
/// in an enclosing npm workspace (where node resolves them from too).
fn npm_install_once(dir: &Path) -> Result<()> {
    let absolute = dir.canonicalize()?;
    if absolute
        .ancestors()
        .any(|d| d.join("node_modules/.bin/weir-build").exists())
    {
        return Ok(());
    }
    run(Command::new("npm")
        .current_dir(dir)
        .args(["install", "--no-audit", "--no-fund"]))
}

/// The Python to build and test with: `$WEIR_PYTHON`, the project's
/// `.venv`, or Weir's guest toolchain; with the SDK on `PYTHONPATH`.
fn python(project: &Project, dir: &Path) -> Result<Command> {
    let candidates = [
        std::env::var_os("WEIR_PYTHON").map(PathBuf::from),
        Some(dir.join(".venv/bin/python")),
        Some(PathBuf::from(
            "/opt/weir-tools/python-guests-0.25.1/bin/python",
        )),
    ];
    let Some(interpreter) = candidates.into_iter().flatten().find(|p| p.exists()) else {
        bail!(
            "no Python with componentize-py: set WEIR_PYTHON, make a .venv here \
             (python3 -m venv .venv && .venv/bin/pip install componentize-py==0.25.1 pytest), \
             or run {}/scripts/ensure-guest-toolchains.sh",
            project.weir.display()
        );
    };
    let mut command = Command::new(interpreter);
    command
        .current_dir(dir)
        .env("PYTHONPATH", project.weir.join("guest-sdk/python"))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_reads_back_whatever_the_checkout_path_holds() {
        let path = "/tmp/we\"ir\\x\u{301}\u{7f}\ty";
        let text = format!(
            "name = {}\nlang = {}\nweir = {}\n",
            quoted("my-fn"),
            quoted(Lang::Ts.as_str()),
            quoted(path)
        );
        let project: Project = Figment::from(Toml::string(&text))
            .extract()
            .expect("valid TOML");
        assert_eq!(project.weir, PathBuf::from(path));
        assert_eq!(project.lang, Lang::Ts);
        let json: serde_json::Value =
            serde_json::from_str(&format!("{{\"dep\": {}}}", quoted(path))).expect("valid JSON");
        assert_eq!(json["dep"], path);
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("fraud-2"));
        for bad in ["", "2fraud", "Fraud", "a_b", "a/b", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(toolchain_problem(Lang::Rust, "match").is_some());
        assert!(toolchain_problem(Lang::Rust, "test").is_some());
        assert!(toolchain_problem(Lang::Ts, "esbuild").is_some());
        assert!(toolchain_problem(Lang::Python, "match").is_none());
        assert!(toolchain_problem(Lang::Rust, "my-match").is_none());
    }
}
