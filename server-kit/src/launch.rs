//! A server binary's `main`, written once: log to stderr, layer the settings, start the
//! runtime, serve until SIGINT or SIGTERM, and exit with 0 (stopped cleanly), 1 (could not
//! start or failed) or 2 (bad settings).
//!
//! ```no_run
//! # use qbus_server_kit::{launch, ConfigError};
//! # fn resolve(port: u16) -> Result<std::net::SocketAddr, ConfigError> { todo!() }
//! fn main() -> std::process::ExitCode {
//!     launch::init_tracing();
//!     let config = resolve(15555);
//!     launch::run("my-server", config, |addr, shutdown| async move {
//!         let listener = tokio::net::TcpListener::bind(addr).await?;
//!         // ... serve `listener` until `shutdown` fires
//!         # drop((listener, shutdown));
//!         Ok::<(), std::io::Error>(())
//!     })
//! }
//! ```

use std::fmt::Display;
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::config::{read_toml, ConfigError};
use crate::signals::stop_on_signal;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The settings of `flags` (command line and environment), their unset fields filled by
/// `or` from the TOML file at `file` when there is one.
pub fn layered<S: DeserializeOwned>(
    flags: S,
    file: Option<&Path>,
    or: impl FnOnce(S, S) -> S,
) -> Result<S, ConfigError> {
    match file {
        Some(path) => read_toml(path).map(|file| or(flags, file)),
        None => Ok(flags),
    }
}

/// Runs a server named `name` (the prefix of its error lines): with bad settings, says why
/// and exits with 2; otherwise runs `serve` on a new multi-threaded runtime with a token
/// that SIGINT and SIGTERM cancel, and exits with 0 when it returns `Ok`, else says why and
/// exits with 1.
pub fn run<C, F, Fut, E>(name: &str, config: Result<C, ConfigError>, serve: F) -> ExitCode
where
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        match serve(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file() {
        let dir = std::env::temp_dir().join(format!("qbus-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("settings.toml");
        std::fs::write(&path, "a = 1\nb = 2\n").unwrap();
        type Pair = std::collections::BTreeMap<String, u8>;
        let flags: Pair = [("a".to_owned(), 9)].into();
        let merged = layered(flags.clone(), Some(&path), |mut flags: Pair, file: Pair| {
            for (k, v) in file {
                flags.entry(k).or_insert(v);
            }
            flags
        })
        .unwrap();
        assert_eq!(merged, [("a".to_owned(), 9), ("b".to_owned(), 2)].into());
        assert_eq!(layered(flags.clone(), None, |f, _| f).unwrap(), flags);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
