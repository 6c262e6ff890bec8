//! `qbus-tracker`: parse settings, start logging, run until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qbus_server_kit::auth::tool::{self, Tool};
use qbus_server_kit::launch;
use qbus_tracker::{bind, run, Settings};

/// The qbus tracker: the live topology of brokers, MQs and DirectRPC servers.
#[derive(Parser)]
#[command(
    name = "qbus-tracker",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// TOML file of settings (flags and QBUS_TRACKER_* variables override it)
    #[arg(long, env = "QBUS_TRACKER_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    tool: Option<Command>,
}

/// Helpers for the `[[users]]` of a settings file (README, "Security").
#[derive(Subcommand)]
enum Command {
    /// Read a password from stdin and print the `secret = ...` line that stores its
    /// argon2 hash
    HashSecret,
    /// Print a new random token, and the `tokens = [...]` line that stores it
    NewToken,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.tool {
        Some(Command::HashSecret) => return tool::run(Tool::HashSecret),
        Some(Command::NewToken) => return tool::run(Tool::NewToken),
        None => {}
    }
    launch::init_tracing();
    let config = launch::layered(args.settings, args.config.as_deref(), Settings::or)
        .and_then(Settings::resolve);
    launch::run("qbus-tracker", config, |config, shutdown| async move {
        let listener = bind(&config).await?;
        tracing::info!(
            listen = %config.listen,
            lease_reports = config.lease_reports,
            "starting qbus-tracker {}",
            env!("CARGO_PKG_VERSION")
        );
        run(listener, config, shutdown).await;
        Ok::<(), qbus_tracker::BindError>(())
    })
}
