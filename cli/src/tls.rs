//! The TLS flags of every subcommand (`--ca`, `--cert`, `--key`): the CA that servers'
//! certificates must chain to and the client certificate to present, read once at start
//! and used by every connection the command makes.

use std::path::PathBuf;
use std::sync::OnceLock;

use clap::Args;
use qbus_client::tls::ClientTls;

use crate::error::CliError;

/// The TLS settings of this run, once [`TlsArgs::install`] has read them.
static CLIENT_TLS: OnceLock<Option<ClientTls>> = OnceLock::new();

#[derive(Debug, Args)]
pub struct TlsArgs {
    /// TLS: verify servers with the CA certificates in this PEM file; with it every
    /// connection (even to a host:port or tracker:// address) speaks TLS
    #[arg(
        long,
        global = true,
        env = "QBUS_CA",
        value_name = "PEM",
        help_heading = "Global options"
    )]
    pub ca: Option<PathBuf>,
    /// TLS: present this client certificate (PEM) to servers that require one (mTLS)
    #[arg(
        long,
        global = true,
        env = "QBUS_CLIENT_CERT",
        value_name = "PEM",
        requires = "key",
        help_heading = "Global options"
    )]
    pub cert: Option<PathBuf>,
    /// TLS: the private key of --cert (PEM)
    #[arg(
        long,
        global = true,
        env = "QBUS_CLIENT_KEY",
        value_name = "PEM",
        requires = "cert",
        help_heading = "Global options"
    )]
    pub key: Option<PathBuf>,
}

impl TlsArgs {
    /// Reads the files and keeps the result for [`client`].
    pub fn install(&self) -> Result<(), CliError> {
        let tls = match &self.ca {
            None if self.cert.is_some() => {
                return Err(CliError::Usage(
                    "--cert needs --ca, the CA that signed the server's certificate".into(),
                ))
            }
            None => None,
            Some(ca) => {
                let client = self.cert.as_deref().zip(self.key.as_deref());
                Some(
                    ClientTls::from_pem_files(ca, client)
                        .map_err(qbus_client::ClientError::from)?,
                )
            }
        };
        let _ = CLIENT_TLS.set(tls);
        Ok(())
    }

    /// The flags again, for a child process of this tool.
    pub fn child_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        for (flag, value) in [
            ("--ca", &self.ca),
            ("--cert", &self.cert),
            ("--key", &self.key),
        ] {
            if let Some(path) = value {
                args.push(flag.into());
                args.push(path.into());
            }
        }
        args
    }
}

/// The client TLS of this run: `None` without `--ca`.
pub fn client() -> Option<ClientTls> {
    CLIENT_TLS.get().cloned().flatten()
}
