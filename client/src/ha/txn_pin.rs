//! Transactions over `tracker://`: each one is pinned to one broker for its whole life.
//!
//! A transaction's half messages, its commit and its rollback only mean something on the
//! broker that began it, so nothing of it may fail over. At [`begin`](crate::Broker::begin)
//! the handle picks one live broker of the topology (one not marked down): with a producer
//! group, the one the group's name hashes to (rendezvous hashing, as keyed messages), so a
//! group's transactions meet on one broker while the topology holds still; without one,
//! the one the handle's [`Selector`](super::Selector) picks. Every later request of the
//! transaction goes to that broker's connection (which reconnects to the same address:
//! a decision retried after a reconnect lands where the transaction is). Once that broker
//! has left the topology, or a request to it fails on the connection, the request fails
//! with [`ClientError::TxBrokerLost`]; the broker's check-back decides the transaction
//! when it is back. The MQs a transaction sends to must be on its broker: those created
//! over `tracker://` are on every live broker unless
//! [`HaOptions::create_on`](super::HaOptions::create_on) says otherwise.

use std::sync::Arc;

use super::{affinity, Ha};
use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::protocol::Frame;
use crate::topology::Candidate;

/// The broker a transaction is pinned to.
#[derive(Debug, Clone)]
pub(crate) struct Pin {
    ha: Ha,
    addr: Arc<str>,
}

impl Pin {
    /// Picks the broker for a new transaction of producer group `group`; its connection.
    pub(crate) fn choose(ha: &Ha, group: Option<&str>) -> Result<(Pin, Connection)> {
        let shared = &ha.shared;
        let topology = shared.topology.load();
        let live: Vec<Candidate> = topology
            .brokers()
            .filter(|b| b.is_broker() && !shared.pool.avoid(shared, &b.addr))
            .map(|b| Candidate {
                id: Arc::from(b.id.as_str()),
                addr: Arc::from(b.addr.as_str()),
                depth: 0,
                lag: 0,
                in_flight: 0,
            })
            .collect();
        if live.is_empty() {
            return Err(ClientError::NoBroker {
                mq: String::new(),
                reason: "a transaction needs a live broker and the topology has none".into(),
            });
        }
        let index = match group {
            Some(group) => affinity::owner(group, &live),
            None => shared.options.selector.select("", &live) % live.len(),
        };
        let addr = live[index].addr.clone();
        let connection = shared.pool.node(&addr).conn.clone();
        Ok((
            Pin {
                ha: ha.clone(),
                addr,
            },
            connection,
        ))
    }

    /// The pin of a transaction already on the broker at `addr` (one [`Pin::choose`] picked
    /// for it at its begin, named by [`Transaction::broker`](crate::Transaction::broker));
    /// its connection. Fails with [`ClientError::TxBrokerLost`] while that broker is not in
    /// the topology.
    pub(crate) fn on(ha: &Ha, addr: &str, txn: u64) -> Result<(Pin, Connection)> {
        let topology = ha.topology();
        let Some(broker) = topology.brokers().find(|b| b.is_broker() && b.addr == addr) else {
            let known: Vec<&str> = topology
                .brokers()
                .filter(|b| b.is_broker())
                .map(|b| b.addr.as_str())
                .collect();
            return Err(ClientError::TxBrokerLost {
                txn,
                broker: addr.to_owned(),
                reason: format!("it is not in the topology now (brokers: {known:?})"),
            });
        };
        let addr: Arc<str> = Arc::from(broker.addr.as_str());
        let connection = ha.shared.pool.node(&addr).conn.clone();
        Ok((
            Pin {
                ha: ha.clone(),
                addr,
            },
            connection,
        ))
    }

    /// The pinned broker's address.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `frame` of transaction `txn` over `connection` (the pinned broker's), failing
    /// with [`ClientError::TxBrokerLost`] when that broker is gone.
    pub(crate) async fn request(
        &self,
        connection: &Connection,
        txn: u64,
        frame: Frame,
    ) -> Result<Frame> {
        let lost = |reason: String| ClientError::TxBrokerLost {
            txn,
            broker: self.addr.to_string(),
            reason,
        };
        let present = self
            .ha
            .topology()
            .brokers()
            .any(|b| b.is_broker() && *b.addr == *self.addr);
        if !present {
            return Err(lost("it left the topology".into()));
        }
        connection.request(frame).await.map_err(|e| match e {
            ClientError::Connect { .. }
            | ClientError::Disconnected { .. }
            | ClientError::Timeout(_) => lost(e.to_string()),
            other => other,
        })
    }
}
