//! The `weir` binary: `serve` runs functions from a config file, `dev` runs
//! the local stack with the examples, `fn logs` shows a function's guest log
//! lines.

mod dev;
mod logs;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use weir_host::config::HostConfig;
use weir_host::control::StaticFunctions;

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
    /// Check a config file and print it as the host understands it.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Work with deployed functions.
    #[command(name = "fn", subcommand)]
    Function(FunctionCommand),
}

#[derive(Subcommand)]
enum FunctionCommand {
    /// Show a function's guest log lines (`log` calls, stdout, stderr).
    Logs(logs::LogsArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    weir_host::telemetry::init_logging();
    match Cli::parse().command {
        Command::Serve { config } => {
            let config =
                HostConfig::load(config.as_deref()).context("loading the configuration")?;
            let functions = StaticFunctions(config.functions.clone());
            let shutdown = weir_host::shutdown::on_signal();
            weir_host::serve::serve(config, functions, shutdown).await?;
        }
        Command::Dev(args) => dev::run(args).await?,
        Command::Function(FunctionCommand::Logs(args)) => logs::run(args).await?,
        Command::CheckConfig { config } => {
            let config = HostConfig::load(Some(&config)).context("loading the configuration")?;
            println!("{config:#?}");
        }
    }
    Ok(())
}
