//! Starting and stopping a broker: the store, the commit thread, the background sweeper, and
//! the TCP accept loop. The embedded broker uses the same [`Running`] broker without a
//! socket.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use qbus_server_kit::listen::{self, BindError};
use qbus_server_kit::sniff::{is_http, read_first};
use qbus_wire::link::{stream_link, tcp_link, Link};
use qbus_wire::serve::{accept, Connections};
use qbus_wire::tls::Accepted;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::auth::Peer;
use crate::config::Config;
use crate::core::Core;
use crate::http;
use crate::queue::group_commit::Committer;
use crate::replica;
use crate::reporter;
use crate::session;
use crate::store::StoreError;
use crate::zbus::{self, sniff::Rewind, Zbus};

/// How long connections may take to close at shutdown before they are stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a new connection may stay silent before its first byte tells HTTP from binary:
/// as long as the binary protocol lets an established connection idle.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened (locked by another broker, unreadable, corrupt).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The listen address is unusable.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A thread could not be started.
    #[error("cannot start the commit thread: {0}")]
    Thread(std::io::Error),
}

/// A running broker without its listener: its core, the commit thread, the background
/// tasks, and the connections it serves.
pub struct Running {
    core: Arc<Core>,
    commit_thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    shutdown: CancellationToken,
    /// The sweep and the rate sampler: waited for at shutdown, since the sweep writes
    /// (transaction checks, retention).
    background: tokio_util::task::TaskTracker,
    sessions: tokio::sync::Mutex<Connections>,
    /// What the zbus door's connections share.
    zbus: Arc<Zbus>,
}

impl Running {
    /// Opens the store and starts the background work. Call inside a Tokio runtime.
    pub async fn start(config: Config) -> Result<Running, StartError> {
        let (committer, commit_thread) =
            Committer::start(config.fsync).map_err(StartError::Thread)?;
        let core = tokio::task::spawn_blocking(move || Core::open(config, committer))
            .await
            .map_err(|e| StartError::Thread(std::io::Error::other(e)))??;
        let core = Arc::new(core);
        core.registry().start_timers().await;
        // Commits a crash interrupted are applied before anything new is served.
        core.txns().recover(core.registry(), core.committer()).await;
        let shutdown = CancellationToken::new();
        let background = tokio_util::task::TaskTracker::new();
        background.spawn(sweep(core.clone(), shutdown.clone()));
        background.spawn(sample_rates(core.clone(), shutdown.clone()));
        background.close();
        Ok(Running {
            core,
            commit_thread: std::sync::Mutex::new(Some(commit_thread)),
            shutdown,
            background,
            sessions: tokio::sync::Mutex::new(Connections::default()),
            zbus: Arc::new(Zbus::default()),
        })
    }

    /// The broker's core.
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Serves one client link in the background.
    pub async fn serve(&self, link: Link, peer: Peer) {
        let session = session::serve(self.core.clone(), link, peer, self.shutdown.child_token());
        self.spawn(session).await;
    }

    /// Serves one TCP connection in the background, as HTTP/1.1 or the binary protocol
    /// depending on its first byte (see `qbus_server_kit::sniff`), and HTTP-shaped
    /// connections as zbus or plain HTTP depending on their first request's head. With TLS
    /// configured, the handshake comes first and the same choice is made on the decrypted
    /// bytes.
    pub async fn accept(&self, stream: TcpStream, peer: SocketAddr) {
        let core = self.core.clone();
        let zbus = self.zbus.clone();
        let shutdown = self.shutdown.child_token();
        self.spawn(async move {
            let local = stream
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let Some(tls) = core.config().tls.clone() else {
                return match is_http(&stream, FIRST_BYTE_TIMEOUT).await {
                    Ok(true) => {
                        serve_http_or_zbus(stream, Peer::tcp(peer), local, core, zbus, shutdown)
                            .await
                    }
                    Ok(false) => {
                        let link = tcp_link(stream, core.config().max_frame);
                        session::serve(core, link, Peer::tcp(peer), shutdown).await
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "connection dropped"),
                };
            };
            let Accepted {
                mut stream,
                identity,
            } = match tls.accept(stream, FIRST_BYTE_TIMEOUT).await {
                Ok(accepted) => accepted,
                Err(e) => return tracing::info!(%peer, error = %e, "TLS connection refused"),
            };
            tracing::debug!(%peer, identity = identity.as_deref(), "TLS connection accepted");
            let peer = Peer {
                certificate: identity,
                ..Peer::tcp(peer)
            };
            match read_first(&mut stream, FIRST_BYTE_TIMEOUT).await {
                Ok((first, true)) => {
                    let stream = Rewind::new(first, stream);
                    serve_http_or_zbus(stream, peer, local, core, zbus, shutdown).await
                }
                Ok((first, false)) => {
                    let link = stream_link(Rewind::new(first, stream), core.config().max_frame);
                    session::serve(core, link, peer, shutdown).await
                }
                Err(e) => tracing::debug!(peer = %peer.addr, error = %e, "connection dropped"),
            }
        })
        .await;
    }

    /// Runs a connection's task in the set that shutdown waits for.
    async fn spawn(&self, connection: impl Future<Output = ()> + Send + 'static) {
        self.sessions.lock().await.spawn(connection);
    }

    /// Closes every session, writes and fsyncs what is queued, and stops the commit thread.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.background.wait().await;
        self.core.registry().stop_timers().await;
        let sessions = std::mem::take(&mut *self.sessions.lock().await);
        sessions.close(SHUTDOWN_GRACE).await;
        self.core.committer().stop().await;
        let thread = self
            .commit_thread
            .lock()
            .expect("thread slot poisoned")
            .take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        tracing::info!("broker stopped");
    }
}

/// Serves a connection that starts like HTTP: the zbus door when its first request names a
/// zbus command (`zbus::sniff`), the HTTP door otherwise; either reads the stream from its
/// first byte.
async fn serve_http_or_zbus<S>(
    mut stream: S,
    peer: Peer,
    local: String,
    core: Arc<Core>,
    zbus: Arc<Zbus>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The first byte came; the rest of the head has as long as HTTP gives any head.
    let head_limit = core.config().http_timeout;
    match zbus::sniff::first_head(&mut stream, head_limit).await {
        Ok((head, true)) => {
            let stream = Rewind::new(head, stream);
            zbus::session::serve(stream, peer, core, zbus, shutdown).await
        }
        Ok((head, false)) => {
            http::serve(Rewind::new(head, stream), peer, local, core, shutdown).await
        }
        Err(e) => tracing::debug!(peer = %peer.addr, error = %e, "connection dropped"),
    }
}

/// Redelivers expired deliveries and applies retention in the background.
async fn sweep(core: Arc<Core>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        core.sweep();
        core.txns().sweep(core.registry(), core.committer()).await;
        ticks += 1;
        if ticks.is_multiple_of(50) {
            core.registry().retain().await;
        }
    }
}

/// Samples every MQ's counters once a second until `shutdown` fires.
async fn sample_rates(core: Arc<Core>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // After a stall, resume the rhythm rather than taking a burst of back-to-back samples.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        core.sample_rates();
    }
}

/// Whether the port speaks TLS (`Some`) and then whether it requires client certificates.
fn config_tls(running: &Running) -> Option<bool> {
    running
        .core()
        .config()
        .tls
        .as_ref()
        .map(|tls| tls.requires_client_cert())
}

/// Binds the configured address.
pub async fn bind(config: &Config) -> Result<TcpListener, BindError> {
    listen::bind(config.listen).await
}

/// Runs a broker on `listener` until `shutdown` fires, then stops cleanly.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let reporting = config.reporting.clone();
    let running = Running::start(config).await?;
    let local = listener.local_addr().ok();
    match &config_tls(&running) {
        Some(true) => {
            tracing::info!(addr = ?local, "broker listening, TLS only, client certificates required")
        }
        Some(false) => tracing::info!(addr = ?local, "broker listening, TLS only"),
        None => tracing::info!(addr = ?local, "broker listening, plain TCP (no TLS configured)"),
    }
    tracing::info!(mode = %running.core().config().access.mode(), "access");
    if let (Some(reporting), Some(local)) = (reporting, local) {
        let addr = reporter::advertised(&reporting, local);
        // A child token: on shutdown the tracker connections close and the trackers drop
        // this broker at once.
        let core = running.core().clone();
        tokio::spawn(replica::run(
            reporting.clone(),
            core.clone(),
            addr.clone(),
            shutdown.child_token(),
        ));
        tokio::spawn(reporter::run(reporting, core, addr, shutdown.child_token()));
    }
    while let Some((stream, peer)) = accept(&listener, &shutdown).await {
        running.accept(stream, peer).await;
    }
    drop(listener);
    running.shutdown().await;
    Ok(())
}
