//! The `weir` binary: `serve` runs functions from a config file, `dev` runs
//! the local stack with the examples, `fn` and `rollout` work with functions
//! through a host's API, `fn logs` shows a function's guest log lines, and
//! `new`, `build` and `test` make a function's project in Rust, TypeScript or
//! Python.

mod cbuild;
mod client;
mod dev;
mod logs;
mod project;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use weir_host::config::HostConfig;
use weir_host::control::{StaticFunctions, compile_job};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Run WebAssembly component functions over NATS JetStream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the functions of a config file until SIGINT/SIGTERM.
    Serve {
        /// TOML config file; `WEIR__*` environment variables override it.
        #[arg(long, short, env = "WEIR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// The local stack: examples deployed, events generated, results shown.
    Dev(dev::DevArgs),
    /// Write a new function project (handler, tests, build, README).
    New(project::NewArgs),
    /// Build the project here into a component (`<name>.wasm`).
    Build(project::ProjectArgs),
    /// Run the project's unit tests natively.
    Test(project::ProjectArgs),
    /// Check a config file and print it as the host understands it.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Work with deployed functions.
    #[command(name = "fn")]
    Function {
        #[command(flatten)]
        api: client::Api,
        #[command(subcommand)]
        command: FunctionCommand,
    },
    /// Choose which version of a function serves.
    Rollout {
        #[command(flatten)]
        api: client::Api,
        #[command(subcommand)]
        command: client::RolloutCommand,
    },
    /// A host's compile job (the host runs it; not for people).
    #[command(name = "compile-module", hide = true)]
    CompileModule(compile_job::ChildArgs),
}

#[derive(Subcommand)]
enum FunctionCommand {
    /// Upload a component, bind it, make a version and serve it.
    Deploy(client::DeployArgs),
    /// The namespace's functions and the version each serves.
    Ls,
    /// A function's binding and versions.
    Show { name: String },
    /// Remove a function and its versions.
    Rm { name: String },
    /// Show a function's guest log lines (`log` calls, stdout, stderr), or
    /// its dead letters; through the API when a token is set.
    Logs(logs::LogsArgs),
    /// Show a function's dead letters, with why each failed (through the
    /// API; the same as `fn logs --dead-letters`).
    DeadLetters(logs::LogsArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::CompileModule(args) = &cli.command {
        // No runtime and no logging: a compile job is one blocking call
        // under a memory limit.
        std::process::exit(compile_job::run_child(args));
    }
    let json_errors = match &cli.command {
        Command::Function { api, .. } | Command::Rollout { api, .. } => api.wants_json(),
        _ => false,
    };
    let ran = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli)));
    match ran {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            report(&error, json_errors);
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error as a person reads it (its causes, no backtrace whatever
/// `RUST_BACKTRACE` says), or as JSON for scripts.
fn report(error: &anyhow::Error, json: bool) {
    let refusal = error.downcast_ref::<client::ApiRefusal>();
    if json {
        let body = serde_json::json!({
            "error": refusal.map_or("failed", |r| r.code.as_str()),
            "status": refusal.map(|r| r.status),
            "message": format!("{error:#}"),
        });
        eprintln!("{body}");
    } else {
        eprintln!("error: {error:#}");
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    weir_host::telemetry::init_logging();
    match cli.command {
        Command::CompileModule(_) => unreachable!("handled before the runtime starts"),
        Command::Serve { config } => {
            let config =
                HostConfig::load(config.as_deref()).context("loading the configuration")?;
            let functions = StaticFunctions(config.functions.clone());
            let shutdown = weir_host::shutdown::on_signal();
            weir_host::serve::serve(config, functions, shutdown).await?;
        }
        Command::Dev(args) => dev::run(args).await?,
        Command::New(args) => project::new(args)?,
        Command::Build(args) => project::build(args)?,
        Command::Test(args) => project::test(args)?,
        Command::Function { api, command } => match command {
            FunctionCommand::Deploy(args) => client::deploy(&api, args).await?,
            FunctionCommand::Ls => client::list(&api).await?,
            FunctionCommand::Show { name } => client::show(&api, &name).await?,
            FunctionCommand::Rm { name } => client::remove(&api, &name).await?,
            FunctionCommand::Logs(args) => logs::run(&api, args).await?,
            FunctionCommand::DeadLetters(args) => {
                logs::run(&api, args.showing_dead_letters()).await?;
            }
        },
        Command::Rollout { api, command } => client::rollout(&api, command).await?,
        Command::CheckConfig { config } => {
            let config = HostConfig::load(Some(&config)).context("loading the configuration")?;
            println!("{config:#?}");
        }
    }
    Ok(())
}
