//! Reporting a node's state to trackers: what a broker (or a DirectRPC server) runs so the
//! trackers, and through them the clients, know it is there and what it holds.
//!
//! Each tracker is reported to independently, over its own connection: the full state at
//! once, again on every change, and every interval even without one (that is the lease the
//! tracker holds the node by). A tracker that cannot be reached is retried every interval;
//! closing the connection (the node stopping) makes the tracker drop the node at once.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::connection::{Connection, ConnectionOptions};
use crate::link::TcpConnector;
use crate::protocol::{Command, Credentials, Frame, Header, DEFAULT_MAX_FRAME};
use crate::tls::ClientTls;
use crate::topology::NodeState;

/// Reports the latest value of `state` to every tracker in `trackers` (over TLS with `tls`) until `stop` fires or
/// the sender of `state` is dropped. Publish a new state (with a higher `seq`) on every
/// change; it goes out at once. `credentials` log the node in at each tracker (a tracker
/// with users accepts reports only from users with the `register` permission).
///
/// ```no_run
/// # async fn demo() {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use qbus_client::reporter::report;
/// use qbus_client::topology::{NodeState, NodeKind};
///
/// let state = NodeState {
///     id: "10.0.0.9:18000".into(),
///     addr: "10.0.0.9:18000".into(),
///     kind: NodeKind::RpcServer,
///     epoch: 1,
///     seq: 1,
///     report_interval_ms: 2000,
///     services: vec!["calculator".into()],
///     ..NodeState::default()
/// };
/// let (_publish, watch) = tokio::sync::watch::channel(Arc::new(state));
/// let stop = tokio_util::sync::CancellationToken::new();
/// let trackers = vec!["10.0.0.1:16666".to_string(), "10.0.0.2:16667".to_string()];
/// tokio::spawn(report(trackers, None, None, watch, Duration::from_secs(2), stop.clone()));
/// // ... later
/// stop.cancel();
/// # }
/// ```
pub async fn report(
    trackers: Vec<String>,
    tls: Option<ClientTls>,
    credentials: Option<Credentials>,
    state: watch::Receiver<Arc<NodeState>>,
    interval: Duration,
    stop: CancellationToken,
) {
    let interval = interval.max(Duration::from_millis(10));
    let mut tasks = JoinSet::new();
    for tracker in trackers {
        let credentials = credentials.clone();
        tasks.spawn(report_to(
            tracker,
            tls.clone(),
            credentials,
            state.clone(),
            interval,
            stop.clone(),
        ));
    }
    while tasks.join_next().await.is_some() {}
}

async fn report_to(
    tracker: String,
    tls: Option<ClientTls>,
    credentials: Option<Credentials>,
    mut state: watch::Receiver<Arc<NodeState>>,
    interval: Duration,
    stop: CancellationToken,
) {
    let connection = Connection::new(
        TcpConnector::new(tracker.clone(), DEFAULT_MAX_FRAME).with_tls(tls),
        ConnectionOptions {
            // One attempt per interval, so a tracker that comes back hears from us within it.
            connect_timeout: interval,
            request_timeout: interval.max(Duration::from_secs(1)),
            heartbeat: interval.max(Duration::from_secs(1)),
            credentials,
        },
    );
    let mut reachable: Option<bool> = None;
    loop {
        let current = state.borrow_and_update().clone();
        let body = match rmp_serde::to_vec_named(&*current) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the state report");
                return;
            }
        };
        let frame = Frame::with_body(Header::request(Command::Report, None), body.into());
        let sent = tokio::select! {
            sent = connection.request(frame) => sent,
            _ = stop.cancelled() => return,
        };
        match (sent, reachable) {
            (Ok(_), Some(true)) => {}
            (Ok(_), _) => {
                tracing::info!(%tracker, "reporting to tracker");
                reachable = Some(true);
            }
            (Err(e), Some(false)) => {
                tracing::debug!(%tracker, error = %e, "tracker still unreachable");
            }
            (Err(e), _) => {
                tracing::warn!(%tracker, error = %e, retry_every = ?interval, "cannot report to tracker");
                reachable = Some(false);
            }
        }
        // Jitter keeps brokers started together from reporting in lockstep.
        let wait = interval.mul_f64(rand::thread_rng().gen_range(0.9..1.0));
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}
