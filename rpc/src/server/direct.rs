//! DirectRPC, the server side: an [`RpcServer`] listens on its own port and speaks the same
//! wire protocol as a broker, so the SDK's connections, heartbeats and framing serve it.

use std::net::SocketAddr;
use std::time::Duration;

use qbus_wire::link::{stream_link, tcp_link};
use qbus_wire::protocol::{Credentials, DEFAULT_MAX_FRAME};
use qbus_wire::serve::{accept, Connections};
use qbus_wire::tls::{Accepted, ClientTls, ServerTls};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::server::processor::{RpcProcessor, SHUTDOWN_GRACE};
use crate::server::registration::Registration;
use crate::server::session::{self, Limits};

/// How long a new connection has for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of an [`RpcServer`]. Build with the `with_*` methods.
///
/// ```
/// use qbus_rpc::RpcServerOptions;
/// let options = RpcServerOptions::default()
///     .with_trackers(["127.0.0.1:16666", "127.0.0.1:16667"])
///     .with_advertise("10.0.0.9:18000");
/// assert_eq!(options.trackers.len(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct RpcServerOptions {
    /// Largest frame accepted. Default 16 MiB.
    pub max_frame: usize,
    /// Calls one connection may have running at once; beyond it the connection is not read
    /// until one finishes. Default 1024.
    pub max_in_flight: usize,
    /// Trackers to register at, so [`HaInvoker`](crate::HaInvoker)s find this server.
    /// Default none.
    pub trackers: Vec<String>,
    /// The address clients dial, as registered at the trackers. Default: the address the
    /// server listens on (which must then not be a wildcard like `0.0.0.0`).
    pub advertise: Option<String>,
    /// How often the trackers hear from this server. Default 2 s.
    pub report_interval: Duration,
    /// TLS on the port: with it the server speaks TLS only (and with client certificates
    /// required, each session knows its client's name). Default `None`, plain TCP.
    pub tls: Option<ServerTls>,
    /// TLS towards the trackers. Default `None`, plain TCP.
    pub tracker_tls: Option<ClientTls>,
    /// The node credential this server logs in to the trackers with; a tracker with users
    /// takes its reports only if the user has the `register` permission. Default none.
    pub tracker_credentials: Option<Credentials>,
}

impl Default for RpcServerOptions {
    fn default() -> Self {
        RpcServerOptions {
            max_frame: DEFAULT_MAX_FRAME,
            max_in_flight: 1024,
            trackers: Vec::new(),
            advertise: None,
            report_interval: Duration::from_secs(2),
            tls: None,
            tracker_tls: None,
            tracker_credentials: None,
        }
    }
}

impl RpcServerOptions {
    /// Sets [`trackers`](RpcServerOptions::trackers).
    pub fn with_trackers<S: Into<String>>(mut self, trackers: impl IntoIterator<Item = S>) -> Self {
        self.trackers = trackers.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`tracker_credentials`](RpcServerOptions::tracker_credentials).
    pub fn with_tracker_credentials(mut self, credentials: Credentials) -> Self {
        self.tracker_credentials = Some(credentials);
        self
    }

    /// Sets [`advertise`](RpcServerOptions::advertise).
    pub fn with_advertise(mut self, addr: impl Into<String>) -> Self {
        self.advertise = Some(addr.into());
        self
    }

    /// Sets [`tls`](RpcServerOptions::tls).
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets [`tracker_tls`](RpcServerOptions::tracker_tls).
    pub fn with_tracker_tls(mut self, tls: ClientTls) -> Self {
        self.tracker_tls = Some(tls);
        self
    }

    /// Sets [`max_in_flight`](RpcServerOptions::max_in_flight).
    pub fn with_max_in_flight(mut self, calls: usize) -> Self {
        self.max_in_flight = calls.max(1);
        self
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum RpcServerError {
    /// The listen address is unusable.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Trackers were given but no address clients can dial is known.
    #[error("{0}")]
    Advertise(String),
}

/// A DirectRPC server: serves an [`RpcProcessor`] on a TCP port until shut down.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use qbus_rpc::{RpcProcessor, RpcServer, RpcServerOptions};
///
/// let mut processor = RpcProcessor::new();
/// processor
///     .module("Greeter")
///     .method("hello", |(name,): (String,)| async move { format!("Hello, {name}!") });
/// let options = RpcServerOptions::default().with_trackers(["127.0.0.1:16666"]);
/// let server = RpcServer::bind_with("127.0.0.1:18000", processor, options).await?;
/// println!("serving on {}", server.local_addr());
/// // ... later
/// server.shutdown().await;
/// # Ok(()) }
/// ```
pub struct RpcServer {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    accept: JoinHandle<()>,
    registration: Option<Registration>,
}

impl std::fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcServer")
            .field("local_addr", &self.local_addr)
            .field("registered", &self.registration.is_some())
            .finish()
    }
}

impl RpcServer {
    /// Listens on `addr` (`host:port`; port 0 picks a free one) with default options.
    pub async fn bind(addr: &str, processor: RpcProcessor) -> Result<RpcServer, RpcServerError> {
        RpcServer::bind_with(addr, processor, RpcServerOptions::default()).await
    }

    /// Listens on `addr` with `options`.
    pub async fn bind_with(
        addr: &str,
        processor: RpcProcessor,
        options: RpcServerOptions,
    ) -> Result<RpcServer, RpcServerError> {
        let bind_error = |source| RpcServerError::Bind {
            addr: addr.to_owned(),
            source,
        };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        RpcServer::serve(listener, processor, options)
    }

    /// Serves on a listener already bound (tests bind `127.0.0.1:0`).
    pub fn serve(
        listener: TcpListener,
        processor: RpcProcessor,
        options: RpcServerOptions,
    ) -> Result<RpcServer, RpcServerError> {
        let local_addr = listener
            .local_addr()
            .map_err(|source| RpcServerError::Bind {
                addr: "<listener>".into(),
                source,
            })?;
        let registration = if options.trackers.is_empty() {
            None
        } else {
            let addr = match &options.advertise {
                Some(addr) => addr.clone(),
                None if local_addr.ip().is_unspecified() => {
                    return Err(RpcServerError::Advertise(format!(
                        "the server listens on {local_addr}, which clients cannot dial: set \
                         the address to register at the trackers (advertise)"
                    )))
                }
                None => local_addr.to_string(),
            };
            let services = processor.modules().into_iter().map(str::to_owned).collect();
            let trackers = options.trackers.clone();
            Some(Registration::start(
                trackers,
                options.tracker_tls.clone(),
                addr,
                services,
                options.report_interval,
                options.tracker_credentials.clone(),
            ))
        };
        let shutdown = CancellationToken::new();
        tracing::info!(
            addr = %local_addr,
            modules = ?processor.modules(),
            tls = options.tls.is_some(),
            "RPC server listening"
        );
        let limits = Limits {
            max_frame: options.max_frame,
            max_in_flight: options.max_in_flight,
        };
        let accept = tokio::spawn(accept_loop(
            listener,
            processor,
            limits,
            options.tls.clone(),
            shutdown.clone(),
        ));
        Ok(RpcServer {
            local_addr,
            shutdown,
            accept,
            registration,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops cleanly: leaves the trackers, stops accepting, lets running calls finish
    /// (within 5 s) and closes every connection.
    pub async fn shutdown(mut self) {
        if let Some(registration) = self.registration.take() {
            registration.stop().await;
        }
        self.shutdown.cancel();
        let _ = (&mut self.accept).await;
        tracing::info!(addr = %self.local_addr, "RPC server stopped");
    }

    /// Stops at once, as a crash would: connections close mid-call and no reply goes out.
    /// The trackers drop the server as soon as they see its reports' connections close.
    pub fn abort(mut self) {
        self.accept.abort();
        self.registration.take();
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Accepts connections until `shutdown`, then waits for them to finish.
async fn accept_loop(
    listener: TcpListener,
    processor: RpcProcessor,
    limits: Limits,
    tls: Option<ServerTls>,
    shutdown: CancellationToken,
) {
    let mut sessions = Connections::default();
    while let Some((stream, peer)) = accept(&listener, &shutdown).await {
        let (processor, tls, shutdown) = (processor.clone(), tls.clone(), shutdown.child_token());
        sessions.spawn(async move {
            let Some(tls) = tls else {
                let link = tcp_link(stream, limits.max_frame);
                return session::serve(link, peer.to_string(), None, processor, limits, shutdown)
                    .await;
            };
            match tls.accept(stream, HANDSHAKE_TIMEOUT).await {
                Ok(Accepted { stream, identity }) => {
                    let link = stream_link(stream, limits.max_frame);
                    let peer = peer.to_string();
                    session::serve(link, peer, identity, processor, limits, shutdown).await
                }
                Err(e) => tracing::info!(%peer, error = %e, "TLS connection refused"),
            }
        });
    }
    drop(listener);
    // Each session drains its calls within the grace period; this bound is a backstop.
    sessions
        .close(SHUTDOWN_GRACE + Duration::from_secs(1))
        .await;
}
