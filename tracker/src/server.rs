//! Starting and stopping a tracker: the table, its lease sweeper and warm-up timer, and the
//! accept loop that sends each connection to the binary protocol or to HTTP by its first
//! byte.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qbus_server_kit::auth::Access;
use qbus_server_kit::listen::{self, BindError};
use qbus_server_kit::sniff::{is_http, read_first, Rewind};
use qbus_wire::link::{stream_link, tcp_link};
use qbus_wire::protocol::DEFAULT_MAX_FRAME;
use qbus_wire::serve::{accept, Connections};
use qbus_wire::tls::{Accepted, ServerTls};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http;
use crate::session;
use crate::table::Table;

/// How often leases are checked; a node is dropped at most this late.
const SWEEP_EVERY: Duration = Duration::from_millis(50);
/// How long connections may take to close at shutdown before they are stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Binds the configured address.
pub async fn bind(config: &Config) -> Result<TcpListener, BindError> {
    listen::bind(config.listen).await
}

/// Runs a tracker on `listener` until `shutdown` fires.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use qbus_tracker::{bind, run, Config};
/// let config = Config::local(16666);
/// let listener = bind(&config).await?;
/// let shutdown = tokio_util::sync::CancellationToken::new();
/// tokio::spawn(run(listener, config, shutdown.clone()));
/// // ... brokers report to 127.0.0.1:16666, clients use tracker://127.0.0.1:16666
/// shutdown.cancel();
/// # Ok(()) }
/// ```
pub async fn run(listener: TcpListener, config: Config, shutdown: CancellationToken) {
    let table = Arc::new(Table::new(config.lease_reports, config.warmup.is_zero()));
    let tls = config.tls.clone();
    let background = shutdown.child_token();
    tokio::spawn(sweep(table.clone(), background.clone()));
    if !config.warmup.is_zero() {
        tokio::spawn(warm_up(table.clone(), config.warmup, background.clone()));
    }
    let transport = match &tls {
        Some(tls) if tls.requires_client_cert() => "TLS only, client certificates required",
        Some(_) => "TLS only",
        None => "plain TCP (no TLS configured)",
    };
    tracing::info!(addr = ?listener.local_addr().ok(), warmup = ?config.warmup, transport, "tracker listening");
    tracing::info!(mode = %config.access.mode(), "access");
    let mut next_conn: u64 = 1;
    let mut connections = Connections::default();
    while let Some((stream, peer)) = accept(&listener, &shutdown).await {
        let conn = next_conn;
        next_conn += 1;
        connections.spawn(serve(
            table.clone(),
            config.access.clone(),
            stream,
            tls.clone(),
            conn,
            peer,
            shutdown.child_token(),
        ));
    }
    drop(listener);
    connections.close(SHUTDOWN_GRACE).await;
    tracing::info!("tracker stopped");
}

/// Serves one connection as HTTP or the binary protocol by its first byte; with TLS, after
/// the handshake, by the first decrypted byte.
async fn serve(
    table: Arc<Table>,
    access: Arc<Access>,
    stream: TcpStream,
    tls: Option<ServerTls>,
    conn: u64,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    // Shown by the stats: the listen address may be 0.0.0.0, this is what the client reached.
    let local = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let Some(tls) = tls else {
        return match is_http(&stream, http::TIMEOUT).await {
            Ok(true) => http::serve(table, stream, local, shutdown).await,
            Ok(false) => {
                let link = tcp_link(stream, DEFAULT_MAX_FRAME);
                session::serve(table, access, link, conn, peer, None, shutdown).await
            }
            Err(e) => tracing::debug!(%peer, error = %e, "connection dropped"),
        };
    };
    let Accepted {
        mut stream,
        identity,
    } = match tls.accept(stream, http::TIMEOUT).await {
        Ok(accepted) => accepted,
        Err(e) => return tracing::info!(%peer, error = %e, "TLS connection refused"),
    };
    match read_first(&mut stream, http::TIMEOUT).await {
        Ok((first, true)) => http::serve(table, Rewind::new(first, stream), local, shutdown).await,
        Ok((first, false)) => {
            let link = stream_link(Rewind::new(first, stream), DEFAULT_MAX_FRAME);
            session::serve(table, access, link, conn, peer, identity, shutdown).await
        }
        Err(e) => tracing::debug!(%peer, error = %e, "connection dropped"),
    }
}

async fn sweep(table: Arc<Table>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => table.expire(Instant::now()),
            _ = stop.cancelled() => return,
        }
    }
}

async fn warm_up(table: Arc<Table>, warmup: Duration, stop: CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(warmup) => table.set_ready(),
        _ = stop.cancelled() => {}
    }
}
