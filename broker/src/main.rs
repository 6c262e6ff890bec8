//! `qbus-broker`: parse settings, start logging, run until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qbus_broker::{bind, run, Settings};
use qbus_server_kit::auth::tool::{self, Tool};
use qbus_server_kit::launch;

/// The qbus MQ broker.
#[derive(Parser)]
#[command(
    name = "qbus-broker",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// TOML file of settings (flags and QBUS_* variables override it)
    #[arg(long, env = "QBUS_CONFIG")]
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
    /// Print a new random token for scripts, and the `tokens = [...]` line that stores it
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
    launch::run("qbus-broker", config, |config, shutdown| async move {
        let listener = bind(&config).await?;
        tracing::info!(
            listen = %config.listen,
            store = %config.store.display(),
            fsync = %config.fsync,
            "starting qbus-broker {}",
            env!("CARGO_PKG_VERSION")
        );
        run(listener, config, shutdown).await
    })
}
