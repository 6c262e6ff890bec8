//! `qbus-tracker`: parse settings, start logging, run until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qbus_server_kit::launch;
use qbus_tracker::{bind, run, Settings};

/// The qbus tracker: the live topology of brokers, MQs and DirectRPC servers.
#[derive(Parser)]
#[command(name = "qbus-tracker", version, about)]
struct Args {
    /// TOML file of settings (flags and QBUS_TRACKER_* variables override it)
    #[arg(long, env = "QBUS_TRACKER_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

fn main() -> ExitCode {
    let args = Args::parse();
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
