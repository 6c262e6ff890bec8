//! HA DirectRPC, the client side: an [`HaInvoker`] reads from the trackers which
//! [`RpcServer`](crate::RpcServer)s offer a module and calls one of them directly, the least
//! busy, moving on when one cannot be reached and avoiding one that failed for a while.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use qbus_client::ha::HaOptions;
use qbus_client::topology::Topology;
use qbus_client::{Broker, ConnectionOptions};

use crate::client::direct::DirectInvoker;
use crate::client::invoker::{Call, InvokeFuture, Invoker, Reply};
use crate::error::RpcError;

/// How long a server that failed a call is passed over (unless no other is left).
const AVOID_FOR: Duration = Duration::from_secs(5);

/// One server as the invoker tracks it.
struct Server {
    invoker: DirectInvoker,
    /// Calls sent and not yet answered.
    in_flight: AtomicUsize,
    /// When it last failed, in ms since `Shared::started` plus 1 (0: never).
    failed_at: AtomicU64,
}

struct Shared {
    /// The HA broker handle whose topology lists the servers.
    cluster: Broker,
    servers: ArcSwap<HashMap<Arc<str>, Arc<Server>>>,
    next: AtomicUsize,
    connection: ConnectionOptions,
    started: Instant,
}

/// Calls DirectRPC servers found through the trackers: each call goes to a server that
/// registered the call's module, the one with the fewest calls in flight. A server that
/// cannot be reached is skipped for the next one within the same call; a server whose
/// connection drops mid-call fails that call (it may have run) and is avoided by later
/// calls. Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> Result<(), qbus_rpc::RpcError> {
/// use qbus_rpc::{HaInvoker, RpcClient};
/// let invoker = HaInvoker::connect("tracker://127.0.0.1:16666,127.0.0.1:16667").await?;
/// let greeting: String = RpcClient::new(invoker, "Greeter").call("hello", &("you",)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HaInvoker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for HaInvoker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaInvoker")
            .field("servers", &self.shared.servers.load().len())
            .finish()
    }
}

impl HaInvoker {
    /// Subscribes to the trackers of `trackers` (`tracker://HOST:PORT[,HOST:PORT...]`) and
    /// waits for their topology.
    pub async fn connect(trackers: &str) -> Result<HaInvoker, RpcError> {
        let cluster = Broker::connect_ha(trackers, HaOptions::default())
            .await
            .map_err(|e| RpcError::from_client(e, trackers))?;
        HaInvoker::from_broker(cluster, HaOptions::default().connection)
    }

    /// Uses the topology of an HA broker handle the application already has; the server
    /// connections use the handle's TLS (see `HaOptions::tls`) and `connection` (its connect timeout bounds how long an unreachable
    /// server holds up a call before the next is tried).
    pub fn from_broker(
        cluster: Broker,
        connection: ConnectionOptions,
    ) -> Result<HaInvoker, RpcError> {
        let Some(mut changes) = cluster.watch_topology() else {
            return Err(RpcError::Unreachable {
                addr: "the broker handle".into(),
                reason: "it is a single broker, not tracker://...: it has no topology to find \
                         RPC servers in"
                    .into(),
            });
        };
        let shared = Arc::new(Shared {
            cluster,
            servers: ArcSwap::default(),
            next: AtomicUsize::new(0),
            connection,
            started: Instant::now(),
        });
        // Let go of servers that left the topology, until the invoker is dropped.
        let weak: Weak<Shared> = Arc::downgrade(&shared);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(shared) = weak.upgrade() else { return };
                let topology = changes.borrow_and_update().clone();
                shared.forget_departed(&topology);
            }
        });
        Ok(HaInvoker { shared })
    }

    /// The addresses of the servers offering `module` now, sorted.
    pub fn servers(&self, module: &str) -> Vec<String> {
        let topology = self.topology();
        let mut addrs: Vec<String> = topology
            .providers(module)
            .into_iter()
            .map(|node| node.addr.clone())
            .collect();
        addrs.sort();
        addrs
    }

    fn topology(&self) -> Arc<Topology> {
        self.shared.cluster.topology().unwrap_or_default()
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn server(&self, addr: &str) -> Arc<Server> {
        if let Some(server) = self.servers.load().get(addr) {
            return server.clone();
        }
        let fresh = Arc::new(Server {
            invoker: DirectInvoker::with_tls(addr, self.connection.clone(), self.cluster.tls()),
            in_flight: AtomicUsize::new(0),
            failed_at: AtomicU64::new(0),
        });
        self.servers.rcu(|servers| {
            let mut next = HashMap::clone(servers);
            next.entry(Arc::from(addr)).or_insert_with(|| fresh.clone());
            next
        });
        // Another call may have added the server first: use the one in the table.
        self.servers.load().get(addr).cloned().unwrap_or(fresh)
    }

    fn forget_departed(&self, topology: &Topology) {
        let current = self.servers.load();
        if current
            .keys()
            .all(|addr| topology.brokers().any(|node| *node.addr == **addr))
        {
            return;
        }
        self.servers.rcu(|servers| {
            servers
                .iter()
                .filter(|(addr, _)| topology.brokers().any(|node| *node.addr == ***addr))
                .map(|(addr, server)| (addr.clone(), server.clone()))
                .collect::<HashMap<_, _>>()
        });
    }

    fn avoided(&self, server: &Server) -> bool {
        match server.failed_at.load(Ordering::Relaxed) {
            0 => false,
            at => self.now_ms().saturating_sub(at - 1) < AVOID_FOR.as_millis() as u64,
        }
    }

    /// The server for the next attempt at `module`: among those offering it and not yet
    /// tried, the healthy ones if any, the least busy of them.
    fn pick(&self, module: &str, tried: &[Arc<str>]) -> Result<(Arc<str>, Arc<Server>), RpcError> {
        let topology = self.cluster.topology().unwrap_or_default();
        let candidates: Vec<(Arc<str>, Arc<Server>)> = topology
            .providers(module)
            .into_iter()
            .filter(|node| !tried.iter().any(|t| **t == *node.addr))
            .map(|node| (Arc::from(node.addr.as_str()), self.server(&node.addr)))
            .collect();
        if candidates.is_empty() {
            let reason = if tried.is_empty() {
                "no RPC server registered at the trackers offers it".to_owned()
            } else {
                format!(
                    "every server offering it failed this call ({})",
                    tried.join(", ")
                )
            };
            return Err(RpcError::NoResponders {
                target: format!("module {module:?}"),
                reason,
            });
        }
        let healthy: Vec<&(Arc<str>, Arc<Server>)> = candidates
            .iter()
            .filter(|(_, s)| !self.avoided(s))
            .collect();
        let pool: Vec<&(Arc<str>, Arc<Server>)> = if healthy.is_empty() {
            candidates.iter().collect()
        } else {
            healthy
        };
        // Start the scan at a rotating place so equally busy servers take turns.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let chosen = (0..pool.len())
            .map(|i| pool[(start + i) % pool.len()])
            .min_by_key(|(_, server)| server.in_flight.load(Ordering::Relaxed))
            .unwrap_or(pool[0]);
        Ok(chosen.clone())
    }
}

/// Counts a call in flight on a server for as long as it lives.
struct InFlight(Arc<Server>);

impl InFlight {
    fn new(server: Arc<Server>) -> InFlight {
        server.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(server)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Invoker for HaInvoker {
    fn invoke(&self, call: Call) -> InvokeFuture {
        let shared = self.shared.clone();
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + call.timeout;
            let mut tried: Vec<Arc<str>> = Vec::new();
            loop {
                let (addr, server) = shared.pick(&call.module, &tried)?;
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return Err(RpcError::Timeout(call.timeout));
                }
                let attempt = Call {
                    timeout: left,
                    ..call.clone()
                };
                let outcome: Result<Reply, RpcError> = {
                    let _counted = InFlight::new(server.clone());
                    server.invoker.invoke(attempt).await
                };
                match outcome {
                    Ok(reply) => return Ok(reply),
                    Err(RpcError::Timeout(_)) => return Err(RpcError::Timeout(call.timeout)),
                    Err(e) => {
                        let lost = matches!(
                            e,
                            RpcError::Unreachable { .. } | RpcError::Disconnected { .. }
                        );
                        if lost {
                            server
                                .failed_at
                                .store(shared.now_ms() + 1, Ordering::Relaxed);
                            tracing::warn!(server = %addr, error = %e, "RPC server failed; avoiding it");
                        }
                        // Only a call that was never sent may go to another server.
                        if !e.is_unsent() {
                            return Err(e);
                        }
                        tried.push(addr);
                    }
                }
            }
        })
    }
}
