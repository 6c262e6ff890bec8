//! High availability: brokers found through trackers, with a cached topology, load
//! balancing, key affinity and per-request failover.
//!
//! An HA [`Broker`](crate::Broker) is made from the address `tracker://HOST:PORT[,HOST:PORT...]`
//! (or [`Broker::connect_ha`](crate::Broker::connect_ha) for options). It subscribes to every
//! tracker, merges their views per broker by report version, and keeps the result in an
//! `ArcSwap`, so a send reads it without a lock and the cache outlives every tracker.
//!
//! Inside: `views` (the merging rules), `tracker_link` (one subscription per tracker),
//! `pool` (one connection per broker, local down marks and probes), `failover` (sending
//! with retry on another broker), `admin` (MQ admin across brokers), `consume` (a consumer
//! over every broker holding its MQ), `selector` ([`Selector`]), `affinity` (keys),
//! `txn_pin` (a transaction pinned to one broker) and `checkers` (a transaction checker
//! on every broker).
//!
//! Address form: `tracker://HOST:PORT[,HOST:PORT...]`, one or more trackers separated by
//! commas (see [`parse_trackers`]). All trackers are equal; two are the usual setup.
//!
//! What a user sees:
//! - `create_mq` creates the MQ on every live broker (or [`HaOptions::create_on`] of them).
//! - A message with a key goes to the broker its key hashes to among those holding the MQ
//!   (rendezvous hashing), so per-key order holds while that broker lives; other messages go
//!   where the [`Selector`] says (round-robin by default).
//! - A send that fails on a connection error, a timeout or a broker shutting down is sent
//!   again, with the very same record bytes, to another broker holding the MQ. The broker
//!   that failed is avoided until a background probe reaches it again. A broker that stops
//!   answering (hung, paused, its disk stuck) counts as failed once it has been silent for
//!   three to four heartbeats (0.75–1 s by default), and a broker the trackers drop from
//!   the topology at once: the sends waiting on it are sent elsewhere. A send whose broker
//!   may have stored it but did not confirm is in doubt, and sending it again may store it
//!   twice: duplicates are at most the sends in flight to the failed broker, and carry the
//!   same message id, key and body, so a consumer that must see each message once drops
//!   repeats by id.
//! - A transaction is pinned to one live broker (its producer group's, by rendezvous
//!   hashing) and never fails over: once that broker is gone, its requests fail with
//!   [`ClientError::TxBrokerLost`]. A transaction checker answers the checks of every
//!   broker of the topology, those that join later included.
//! - A consumer reads from every broker holding its MQ, picks up brokers that join and lets
//!   go of brokers that leave; each broker keeps its group's place.

mod admin;
mod affinity;
pub(crate) mod checkers;
pub(crate) mod consume;
pub(crate) mod failover;
mod pool;
mod selector;
mod tracker_link;
pub(crate) mod txn_pin;
mod views;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::connection::{Connection, ConnectionOptions};
use crate::error::{ClientError, Result};
use crate::link::TcpConnector;
use crate::protocol::{Command, Frame, Header, DEFAULT_MAX_FRAME};
use crate::tls::ClientTls;
use crate::topology::{Topology, TopologyUpdate};

pub use checkers::CheckerStatus;
pub use selector::{LeastLoaded, RoundRobin, Selector};

use pool::Pool;
use views::{Gap, Views};

/// The scheme of HA addresses.
pub const TRACKER_SCHEME: &str = "tracker://";
/// The scheme of HA addresses spoken over TLS: to the trackers and to every broker they
/// name (see [`HaOptions::tls`]).
pub const TRACKER_TLS_SCHEME: &str = "tracker+tls://";

/// Heartbeat of HA connections: short, because a hung broker holds up every send routed
/// to it until its silence is noticed (three to four of these), while the cost is a tiny
/// frame on a connection silent this long.
const HA_HEARTBEAT: Duration = Duration::from_millis(250);

/// Settings of an HA broker handle. Build with the `with_*` methods.
///
/// ```
/// use std::time::Duration;
/// use qbus_client::ha::{HaOptions, LeastLoaded};
/// let options = HaOptions::default()
///     .with_first_topology(Duration::from_secs(2))
///     .with_selector(LeastLoaded::default())
///     .with_create_on(2);
/// assert_eq!(options.create_on, Some(2));
/// ```
#[derive(Debug, Clone)]
pub struct HaOptions {
    /// Options of the connections to brokers and trackers. Default: connect within 1 s (a
    /// broker that cannot be reached that fast is skipped); heartbeat after 250 ms of
    /// silence, so a broker that stops answering (a hung process, a paused VM) is taken as
    /// down after 0.75–1 s of silence and its requests fail over; a request still without
    /// a reply after 10 s (a broker that answers heartbeats but not the request) is retried
    /// on another broker.
    pub connection: ConnectionOptions,
    /// How long [`Broker::connect`](crate::Broker::connect) waits for a tracker's topology.
    /// Default 5 s.
    pub first_topology: Duration,
    /// Picks the broker for messages without a key. Default [`RoundRobin`].
    pub selector: Arc<dyn Selector>,
    /// On how many brokers `create_mq` creates an MQ: `None` for every live broker (the
    /// default), `Some(n)` for `n` of them, chosen by hashing the MQ name.
    pub create_on: Option<usize>,
    /// TLS for every connection the handle makes: to the trackers and to every broker (or
    /// RPC server) they report, each verified for the host of the address dialed, as the
    /// node advertises it. A cluster is reached either all over TLS or all in plain TCP.
    /// Default `None` (plain TCP, or for `tracker+tls://` addresses the CA in `QBUS_CA`).
    pub tls: Option<ClientTls>,
}

impl Default for HaOptions {
    fn default() -> Self {
        HaOptions {
            connection: ConnectionOptions {
                connect_timeout: Duration::from_secs(1),
                request_timeout: Duration::from_secs(10),
                heartbeat: HA_HEARTBEAT,
                credentials: None,
            },
            first_topology: Duration::from_secs(5),
            selector: Arc::new(RoundRobin::default()),
            create_on: None,
            tls: None,
        }
    }
}

impl HaOptions {
    /// Sets [`connection`](HaOptions::connection).
    pub fn with_connection(mut self, connection: ConnectionOptions) -> Self {
        self.connection = connection;
        self
    }

    /// Sets [`first_topology`](HaOptions::first_topology).
    pub fn with_first_topology(mut self, wait: Duration) -> Self {
        self.first_topology = wait;
        self
    }

    /// Sets [`selector`](HaOptions::selector).
    pub fn with_selector(mut self, selector: impl Selector) -> Self {
        self.selector = Arc::new(selector);
        self
    }

    /// Sets [`tls`](HaOptions::tls).
    pub fn with_tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets [`create_on`](HaOptions::create_on) to `Some(brokers)`.
    pub fn with_create_on(mut self, brokers: usize) -> Self {
        self.create_on = Some(brokers.max(1));
        self
    }
}

/// Parses `tracker://HOST:PORT[,HOST:PORT...]` (or `tracker+tls://`; the scheme is
/// optional) into tracker addresses.
///
/// ```
/// use qbus_client::ha::parse_trackers;
/// assert_eq!(
///     parse_trackers("tracker://10.0.0.1:16666,10.0.0.2:16667").unwrap(),
///     ["10.0.0.1:16666", "10.0.0.2:16667"]
/// );
/// assert!(parse_trackers("tracker://").is_err());
/// ```
pub fn parse_trackers(addr: &str) -> Result<Vec<String>> {
    let bad = |reason: String| ClientError::Address {
        addr: addr.to_owned(),
        reason,
    };
    let list = addr
        .strip_prefix(TRACKER_SCHEME)
        .or_else(|| addr.strip_prefix(TRACKER_TLS_SCHEME))
        .unwrap_or(addr);
    let mut trackers = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (host, port) = part
            .rsplit_once(':')
            .ok_or_else(|| bad(format!("tracker {part:?} lacks :port")))?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad(format!(
                "tracker {part:?} is not host:port with a port from 1 to 65535"
            )));
        }
        if !trackers.iter().any(|t| t == part) {
            trackers.push(part.to_owned());
        }
    }
    if trackers.is_empty() {
        return Err(bad(
            "no tracker given: use tracker://HOST:PORT[,HOST:PORT...]".into(),
        ));
    }
    Ok(trackers)
}

/// Asks the tracker at `addr` for its current view: a one-shot `QueryTopology`, nothing is
/// pushed later. For tools and scripts; an HA handle subscribes instead.
///
/// ```no_run
/// # async fn demo() -> Result<(), qbus_client::ClientError> {
/// use qbus_client::ha::query_tracker;
/// let view = query_tracker("127.0.0.1:16666", Default::default()).await?;
/// for broker in &view.brokers {
///     println!("{} holds {} MQs", broker.addr, broker.mqs.len());
/// }
/// # Ok(()) }
/// ```
pub async fn query_tracker(addr: &str, options: ConnectionOptions) -> Result<TopologyUpdate> {
    query_tracker_with(addr, options, None).await
}

/// [`query_tracker`] over TLS with `tls`.
pub async fn query_tracker_with(
    addr: &str,
    options: ConnectionOptions,
    tls: Option<ClientTls>,
) -> Result<TopologyUpdate> {
    let connector = TcpConnector::new(addr, DEFAULT_MAX_FRAME).with_tls(tls);
    let connection = Connection::new(connector, options);
    let reply = connection
        .request(Frame::new(Header::request(Command::QueryTopology, None)))
        .await?;
    rmp_serde::from_slice(&reply.body)
        .map_err(|e| ClientError::Protocol(format!("{addr} sent a bad topology: {e}")))
}

/// One tracker as an HA handle sees it; part of [`HaStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerStatus {
    /// Its address.
    pub addr: String,
    /// True while its subscription is open.
    pub connected: bool,
    /// Why the last attempt to reach it failed, if it did.
    pub last_error: Option<String>,
}

/// What an HA handle knows beyond the topology: its trackers and the brokers it avoids.
///
/// ```no_run
/// # async fn demo() -> Result<(), qbus_client::ClientError> {
/// let broker = qbus_client::Broker::connect("tracker://127.0.0.1:16666").await?;
/// if let Some(status) = broker.ha_status() {
///     for tracker in status.trackers.iter().filter(|t| !t.connected) {
///         eprintln!("tracker {} unreachable: {:?}", tracker.addr, tracker.last_error);
///     }
///     eprintln!("avoiding brokers {:?}", status.unreachable);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaStatus {
    /// Every configured tracker.
    pub trackers: Vec<TrackerStatus>,
    /// Brokers that failed a request and have not answered a probe since, by address.
    pub unreachable: Vec<String>,
}

/// State shared by the handle and its background tasks.
pub(crate) struct Shared {
    trackers: Vec<String>,
    options: HaOptions,
    topology: ArcSwap<Topology>,
    topology_tx: watch::Sender<Arc<Topology>>,
    /// Bumped on every tracker event, for the start-up wait.
    events: watch::Sender<u64>,
    views: Mutex<Views>,
    errors: Mutex<Vec<Option<String>>>,
    pool: Pool,
    stop: CancellationToken,
}

/// The HA kind of [`Broker`](crate::Broker): cheap to clone; the background tasks stop when
/// the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Ha {
    shared: Arc<Shared>,
    _stop: Arc<DropGuard>,
}

impl std::fmt::Debug for Ha {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ha")
            .field("trackers", &self.shared.trackers)
            .field("brokers", &self.shared.topology.load().len())
            .finish()
    }
}

impl Ha {
    /// Subscribes to `trackers` and waits (up to `options.first_topology`) for a topology.
    pub async fn connect(trackers: Vec<String>, options: HaOptions) -> Result<Ha> {
        let empty = Arc::new(Topology::default());
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            views: Mutex::new(Views::new(trackers.len())),
            errors: Mutex::new(vec![None; trackers.len()]),
            pool: Pool::new(options.connection.clone(), options.tls.clone()),
            topology: ArcSwap::new(empty.clone()),
            topology_tx: watch::channel(empty).0,
            events: watch::channel(0).0,
            trackers,
            options,
            stop: stop.clone(),
        });
        for index in 0..shared.trackers.len() {
            tokio::spawn(tracker_link::follow(shared.clone(), index));
        }
        let ha = Ha {
            shared,
            _stop: Arc::new(stop.drop_guard()),
        };
        ha.first_topology().await?;
        Ok(ha)
    }

    async fn first_topology(&self) -> Result<()> {
        let shared = &self.shared;
        let started = tokio::time::Instant::now();
        let deadline = started + shared.options.first_topology;
        let mut events = shared.events.subscribe();
        loop {
            let (ready, any) = {
                let views = shared.views();
                (views.any_ready(), views.any_snapshot())
            };
            if ready {
                return Ok(());
            }
            tokio::select! {
                _ = events.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    if any {
                        tracing::warn!(
                            trackers = ?shared.trackers,
                            "no tracker is ready yet; starting from what they know so far"
                        );
                        return Ok(());
                    }
                    let reasons = shared.errors.lock().expect("errors poisoned").clone();
                    let reason = shared
                        .trackers
                        .iter()
                        .zip(reasons)
                        .map(|(t, e)| format!("{t}: {}", e.unwrap_or_else(|| "no answer".into())))
                        .collect::<Vec<_>>()
                        .join("; ");
                    return Err(ClientError::Connect {
                        addr: format!("{TRACKER_SCHEME}{}", shared.trackers.join(",")),
                        waited: started.elapsed(),
                        reason: format!("no tracker sent a topology ({reason})"),
                    });
                }
            }
        }
    }

    /// The merged topology now.
    pub fn topology(&self) -> Arc<Topology> {
        self.shared.topology.load_full()
    }

    /// A receiver that sees every new merged topology.
    pub fn watch(&self) -> watch::Receiver<Arc<Topology>> {
        self.shared.topology_tx.subscribe()
    }

    /// The TLS every connection of the handle uses.
    pub fn tls(&self) -> Option<ClientTls> {
        self.shared.options.tls.clone()
    }

    /// Trackers and unreachable brokers.
    pub fn status(&self) -> HaStatus {
        let connected = self.shared.views().connected();
        let errors = self.shared.errors.lock().expect("errors poisoned").clone();
        HaStatus {
            trackers: self
                .shared
                .trackers
                .iter()
                .zip(connected)
                .zip(errors)
                .map(|((addr, connected), last_error)| TrackerStatus {
                    addr: addr.clone(),
                    connected,
                    last_error,
                })
                .collect(),
            unreachable: self.shared.pool.unreachable(),
        }
    }
}

impl Shared {
    fn views(&self) -> std::sync::MutexGuard<'_, Views> {
        self.views.lock().expect("views poisoned")
    }

    /// Applies an update from tracker `index` and publishes the merged result.
    fn apply(self: &Arc<Self>, index: usize, update: TopologyUpdate) -> Result<(), Gap> {
        let mut views = self.views();
        views.apply(index, update)?;
        if let Some(slot) = self.errors.lock().expect("errors poisoned").get_mut(index) {
            *slot = None;
        }
        self.publish(views.merged());
        drop(views);
        self.events.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Tracker `index` is unreachable; its view stays as a cache.
    fn tracker_lost(self: &Arc<Self>, index: usize, reason: String) {
        let mut views = self.views();
        views.disconnected(index);
        if let Some(slot) = self.errors.lock().expect("errors poisoned").get_mut(index) {
            *slot = Some(reason);
        }
        self.publish(views.merged());
        drop(views);
        self.events.send_modify(|n| *n += 1);
    }

    /// Stores a new merged topology if it differs; called with the views locked, so
    /// publications happen in the order the views changed.
    fn publish(self: &Arc<Self>, merged: Topology) {
        if **self.topology.load() == merged {
            return;
        }
        let merged = Arc::new(merged);
        self.topology.store(merged.clone());
        self.pool.sync(self, &merged);
        self.topology_tx.send_replace(merged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_lists() {
        assert_eq!(parse_trackers("a:1, b:2,a:1").unwrap(), ["a:1", "b:2"]);
        for bad in [
            "",
            "tracker://",
            "tracker://a",
            "tracker://a:0",
            "tracker://:5",
            "a:x",
        ] {
            assert!(parse_trackers(bad).is_err(), "{bad}");
        }
    }
}
