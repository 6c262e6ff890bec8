//! `qbus-tracker`: parse settings, start logging, run until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qbus_tracker::{bind, run, Settings};
use tokio_util::sync::CancellationToken;

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let settings = match &args.config {
        Some(path) => Settings::from_file(path).map(|file| args.settings.clone().or(file)),
        None => Ok(args.settings.clone()),
    };
    let config = match settings.and_then(Settings::resolve) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("qbus-tracker: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qbus-tracker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match bind(&config).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("qbus-tracker: {e}");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        tracing::info!(
            listen = %config.listen,
            lease_reports = config.lease_reports,
            "starting qbus-tracker {}",
            env!("CARGO_PKG_VERSION")
        );
        match run(listener, config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("qbus-tracker: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
