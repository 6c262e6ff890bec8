//! `qbus-broker`: parse settings, start logging, run until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qbus_broker::{bind, run, Settings};
use qbus_server_kit::launch;

/// The qbus MQ broker.
#[derive(Parser)]
#[command(name = "qbus-broker", version, about)]
struct Args {
    /// TOML file of settings (flags and QBUS_* variables override it)
    #[arg(long, env = "QBUS_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

fn main() -> ExitCode {
    let args = Args::parse();
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
