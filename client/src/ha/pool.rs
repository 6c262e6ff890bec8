//! One connection per broker in the topology, and what this client has seen of each
//! broker's health: a broker that failed a request is marked down and avoided until a
//! background probe gets an answer from it. This is what keeps a dead broker out of use
//! when no tracker is left to say it died.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use qbus_wire::Backoff;

use super::Shared;
use crate::connection::{Connection, ConnectionOptions};
use crate::error::ClientError;
use crate::link::TcpConnector;
use crate::protocol::{Command, Frame, Header, DEFAULT_MAX_FRAME};
use crate::tls::ClientTls;
use crate::topology::Topology;

/// First and longest wait between two probes of a down broker.
const PROBE_FIRST: Duration = Duration::from_millis(100);
const PROBE_MAX: Duration = Duration::from_secs(2);

/// A broker's connection and health.
pub(crate) struct Node {
    pub addr: Arc<str>,
    pub conn: Connection,
    /// Failed a request and has not answered a probe since.
    down: AtomicBool,
    /// A probe task is running.
    probing: AtomicBool,
    /// Was connected once: a lost link then means trouble, not a first connect.
    connected_once: AtomicBool,
}

impl Node {
    /// Records a request that got through.
    pub fn succeeded(&self) {
        self.connected_once.store(true, Ordering::Relaxed);
    }
}

/// Nodes by broker address; read on every send without a lock.
pub(crate) struct Pool {
    nodes: ArcSwap<HashMap<Arc<str>, Arc<Node>>>,
    options: ConnectionOptions,
    tls: Option<ClientTls>,
}

impl Pool {
    pub fn new(options: ConnectionOptions, tls: Option<ClientTls>) -> Pool {
        Pool {
            nodes: ArcSwap::from_pointee(HashMap::new()),
            options,
            tls,
        }
    }

    /// The node for `addr`, created if new.
    pub fn node(&self, addr: &Arc<str>) -> Arc<Node> {
        if let Some(node) = self.nodes.load().get(addr) {
            return node.clone();
        }
        let mut created = None;
        self.nodes.rcu(|nodes| {
            let mut nodes = HashMap::clone(nodes);
            let node = nodes
                .entry(addr.clone())
                .or_insert_with(|| Arc::new(self.new_node(addr)))
                .clone();
            created = Some(node);
            nodes
        });
        created.unwrap_or_else(|| Arc::new(self.new_node(addr)))
    }

    fn new_node(&self, addr: &Arc<str>) -> Node {
        Node {
            addr: addr.clone(),
            conn: Connection::new(
                TcpConnector::new(addr.to_string(), DEFAULT_MAX_FRAME).with_tls(self.tls.clone()),
                self.options.clone(),
            ),
            down: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            connected_once: AtomicBool::new(false),
        }
    }

    /// True when requests should go elsewhere than `addr` if they can: it failed a request,
    /// or its link dropped (then it is marked down and probed, so no send waits on its
    /// reconnection).
    pub fn avoid(&self, shared: &Arc<Shared>, addr: &str) -> bool {
        let nodes = self.nodes.load();
        let Some(node) = nodes.get(addr) else {
            return false;
        };
        if node.down.load(Ordering::Relaxed) {
            return true;
        }
        if node.connected_once.load(Ordering::Relaxed) && !node.conn.is_connected() {
            let lost = ClientError::Disconnected {
                addr: node.addr.to_string(),
            };
            self.failed(shared, node, &lost);
            return true;
        }
        false
    }

    fn contains(&self, node: &Arc<Node>) -> bool {
        self.nodes
            .load()
            .get(&node.addr)
            .is_some_and(|n| Arc::ptr_eq(n, node))
    }

    /// Addresses of the brokers marked down.
    pub fn unreachable(&self) -> Vec<String> {
        let mut down: Vec<String> = self
            .nodes
            .load()
            .values()
            .filter(|n| n.down.load(Ordering::Relaxed))
            .map(|n| n.addr.to_string())
            .collect();
        down.sort();
        down
    }

    /// Follows the topology: connects ahead of time to brokers that appeared and lets go
    /// of brokers that left (a broker that comes back starts with a clean slate). A broker
    /// leaves when the trackers stop hearing from it, which for a hung broker may come
    /// before this client notices its silence: its link is closed, so the requests waiting
    /// on it fail over now.
    pub fn sync(&self, shared: &Arc<Shared>, topology: &Topology) {
        let wanted: HashMap<Arc<str>, ()> = topology
            .brokers()
            .filter(|b| b.is_broker())
            .map(|b| (Arc::from(b.addr.as_str()), ()))
            .collect();
        let mut added = Vec::new();
        let mut left = Vec::new();
        self.nodes.rcu(|nodes| {
            added.clear();
            left = nodes
                .iter()
                .filter(|(addr, _)| !wanted.contains_key(*addr))
                .map(|(_, node)| node.clone())
                .collect();
            let mut next: HashMap<Arc<str>, Arc<Node>> = nodes
                .iter()
                .filter(|(addr, _)| wanted.contains_key(*addr))
                .map(|(addr, node)| (addr.clone(), node.clone()))
                .collect();
            for addr in wanted.keys() {
                next.entry(addr.clone()).or_insert_with(|| {
                    let node = Arc::new(self.new_node(addr));
                    added.push(node.clone());
                    node
                });
            }
            next
        });
        for node in left {
            if node.conn.drop_link() {
                tracing::info!(broker = %node.addr, "broker left the topology; its requests in flight go elsewhere");
            }
        }
        for node in added {
            let stop = shared.stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    connected = node.conn.ensure_connected() => match connected {
                        Ok(()) => node.succeeded(),
                        Err(e) => tracing::debug!(broker = %node.addr, error = %e, "early connect failed"),
                    },
                    _ = stop.cancelled() => {}
                }
            });
        }
    }

    /// Marks `node` down after a failed request and starts probing it.
    pub fn failed(&self, shared: &Arc<Shared>, node: &Arc<Node>, error: &ClientError) {
        if !node.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(broker = %node.addr, %error, "broker failed a request; avoiding it until it answers again");
        }
        if !node.probing.swap(true, Ordering::AcqRel) {
            tokio::spawn(probe(shared.clone(), node.clone()));
        }
    }
}

/// Heartbeats a down broker with backoff until it answers (then it is used again) or it
/// leaves the topology.
async fn probe(shared: Arc<Shared>, node: Arc<Node>) {
    let mut backoff = Backoff::new(PROBE_FIRST, PROBE_MAX);
    let limit =
        shared.options.connection.connect_timeout + shared.options.connection.request_timeout;
    loop {
        let wait = backoff.next_wait();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.stop.cancelled() => return,
        }
        if !shared.pool.contains(&node) {
            node.probing.store(false, Ordering::Release);
            return;
        }
        let heartbeat = Frame::new(Header::request(Command::Heartbeat, None));
        if let Ok(Ok(_)) = tokio::time::timeout(limit, node.conn.request(heartbeat)).await {
            node.succeeded();
            node.down.store(false, Ordering::Relaxed);
            node.probing.store(false, Ordering::Release);
            tracing::info!(broker = %node.addr, "broker answers again");
            // A failure that raced with this answer needs a probe of its own.
            if node.down.load(Ordering::Relaxed) && !node.probing.swap(true, Ordering::AcqRel) {
                backoff.reset();
                continue;
            }
            return;
        }
    }
}
