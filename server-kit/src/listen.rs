//! Binding a server's listen address, with an error a user can act on.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;

/// The listen address is unusable: in use, not an address of this host, or not allowed.
#[derive(Debug)]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    pub source: io::Error,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot listen on {}: {}", self.addr, self.source)?;
        if self.source.kind() == io::ErrorKind::AddrInUse {
            f.write_str(
                " (another process holds this port: stop it, or choose another with --port)",
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for BindError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Binds `addr` for a server to accept on.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let taken = qbus_server_kit::listen::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
/// let again = qbus_server_kit::listen::bind(taken.local_addr().unwrap()).await.unwrap_err();
/// assert!(again.to_string().contains("choose another with --port"));
/// # }
/// ```
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}
