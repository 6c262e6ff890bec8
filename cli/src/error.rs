//! The one error type of the tool; `main` prints it as `qbus: <error>`.

use qbus_client::ClientError;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The broker or the connection to it failed.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// Reading stdin or writing stdout failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// An argument cannot be used.
    #[error("{0}")]
    Usage(String),
    /// The command ran but did not achieve what was asked.
    #[error("{0}")]
    Failed(String),
}
