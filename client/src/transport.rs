//! What a [`Broker`](crate::Broker) handle and everything made from it talk through: one
//! broker (over TCP, or in this process through a connector) or the brokers found through
//! trackers. This is the one place that tells the kinds apart, so the handle, its producers
//! and its consumers work the same over all of them without asking which one they hold.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::connection::{Connection, PendingReply};
use crate::error::{decode_reply, ClientError, Result};
use crate::ha::failover::HaReply;
use crate::ha::txn_pin::Pin;
use crate::ha::{Ha, HaStatus};
use crate::protocol::{Command, Frame, Header, MqInfo, MqOptions};
use crate::topology::Topology;

/// The brokers behind a handle. Cheap to clone; clones share the connections (and, over
/// HA, keep the topology followed while one lives).
#[derive(Debug, Clone)]
pub(crate) struct Transport {
    kind: Kind,
}

/// Private so that no other module matches on it.
#[derive(Debug, Clone)]
enum Kind {
    /// One broker, over TCP or in this process.
    Single(Connection),
    /// Brokers found through trackers.
    Ha(Ha),
}

impl Transport {
    /// One broker, reached over `connection`.
    pub(crate) fn single(connection: Connection) -> Transport {
        Transport {
            kind: Kind::Single(connection),
        }
    }

    /// The brokers an HA handle finds through its trackers.
    pub(crate) fn ha(ha: Ha) -> Transport {
        Transport { kind: Kind::Ha(ha) }
    }

    /// True when several brokers stand behind it: a send may then be sent again to another
    /// broker (so its messages need ids, and a key picks the broker), and a broker may lack
    /// an MQ the topology, a report behind, says it holds.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Ha(_))
    }

    /// The largest frame the broker accepts, once a connection said it (over several
    /// brokers: not known, each may differ).
    pub(crate) fn max_frame(&self) -> Option<u64> {
        match &self.kind {
            Kind::Single(connection) => connection.server_info().map(|info| info.max_frame),
            Kind::Ha(_) => None,
        }
    }

    /// The cluster as the trackers describe it; `None` for one broker.
    pub(crate) fn topology(&self) -> Option<Arc<Topology>> {
        match &self.kind {
            Kind::Ha(ha) => Some(ha.topology()),
            Kind::Single(_) => None,
        }
    }

    /// The TLS of an HA handle's connections; `None` for one broker.
    pub(crate) fn tls(&self) -> Option<crate::tls::ClientTls> {
        match &self.kind {
            Kind::Ha(ha) => ha.tls(),
            Kind::Single(_) => None,
        }
    }

    /// A receiver of each new topology; `None` for one broker.
    pub(crate) fn watch_topology(&self) -> Option<watch::Receiver<Arc<Topology>>> {
        match &self.kind {
            Kind::Ha(ha) => Some(ha.watch()),
            Kind::Single(_) => None,
        }
    }

    /// Trackers and unreachable brokers; `None` for one broker.
    pub(crate) fn ha_status(&self) -> Option<HaStatus> {
        match &self.kind {
            Kind::Ha(ha) => Some(ha.status()),
            Kind::Single(_) => None,
        }
    }

    /// Creates `mq` (over HA on every live broker, or `create_on` of them).
    pub(crate) async fn create_mq(&self, mq: &str, options: MqOptions) -> Result<MqInfo> {
        let connection = match &self.kind {
            Kind::Ha(ha) => return ha.create_mq(mq, &options).await,
            Kind::Single(connection) => connection,
        };
        let body =
            rmp_serde::to_vec_named(&options).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let reply = admin(
            connection,
            Header::request(Command::CreateMq, Some(mq)),
            body.into(),
        )
        .await?;
        decode_reply(&reply.body)
    }

    /// Makes the follower copy of `leader`'s `mq` an MQ of its broker's own (over HA, on the
    /// follower holding it).
    pub(crate) async fn adopt_copy(&self, mq: &str, leader: &str) -> Result<MqInfo> {
        let connection = match &self.kind {
            Kind::Ha(ha) => return ha.adopt_copy(mq, leader).await,
            Kind::Single(connection) => connection,
        };
        let name = qbus_wire::topology::copy_name(mq, leader);
        let header = Header::request(Command::AdoptCopy, Some(&name));
        let reply = admin(connection, header, Bytes::new()).await?;
        decode_reply(&reply.body)
    }

    /// Describes `mq` (over HA, summed over its copies).
    pub(crate) async fn query_mq(&self, mq: &str) -> Result<MqInfo> {
        let connection = match &self.kind {
            Kind::Ha(ha) => return ha.query_mq(mq).await,
            Kind::Single(connection) => connection,
        };
        let reply = admin(
            connection,
            Header::request(Command::QueryMq, Some(mq)),
            Bytes::new(),
        )
        .await?;
        decode_reply(&reply.body)
    }

    /// Describes every MQ, sorted by name (over HA, summed over brokers).
    pub(crate) async fn list_mqs(&self) -> Result<Vec<MqInfo>> {
        let connection = match &self.kind {
            Kind::Ha(ha) => return ha.list_mqs().await,
            Kind::Single(connection) => connection,
        };
        let reply = admin(
            connection,
            Header::request(Command::ListMq, None),
            Bytes::new(),
        )
        .await?;
        decode_reply(&reply.body)
    }

    /// Deletes `mq` (over HA, on every broker).
    pub(crate) async fn remove_mq(&self, mq: &str) -> Result<()> {
        let connection = match &self.kind {
            Kind::Ha(ha) => return ha.remove_mq(mq).await,
            Kind::Single(connection) => connection,
        };
        admin(
            connection,
            Header::request(Command::RemoveMq, Some(mq)),
            Bytes::new(),
        )
        .await
        .map(drop)
    }

    /// Deletes group `group` of `mq` (over HA, on every broker that has it).
    pub(crate) async fn remove_group(&self, mq: &str, group: &str) -> Result<()> {
        let mut request = Header::request(Command::RemoveGroup, Some(mq));
        request.group = Some(group.to_owned());
        let connection = match &self.kind {
            Kind::Ha(ha) => return ha.remove_everywhere(mq, request).await,
            Kind::Single(connection) => connection,
        };
        admin(connection, request, Bytes::new()).await.map(drop)
    }

    /// The connection (and, over HA, the pin) of transaction `id` of the broker at `broker`
    /// (`None`: the one broker of a single handle).
    pub(crate) fn attach_transaction(
        &self,
        broker: Option<&str>,
        id: u64,
    ) -> Result<(Connection, Option<Pin>)> {
        match (&self.kind, broker) {
            (Kind::Single(connection), None) => Ok((connection.clone(), None)),
            (Kind::Single(connection), Some(addr)) if addr == connection.addr() => {
                Ok((connection.clone(), None))
            }
            // Ids are per broker: deciding it on another one could decide an unrelated
            // transaction of the same number.
            (Kind::Single(connection), Some(addr)) => Err(ClientError::TxNeedsBroker {
                txn: id,
                reason: format!(
                    "it is on broker {addr}, and this handle reaches {} only: connect to \
                     {addr}, or over tracker://",
                    connection.addr()
                ),
            }),
            (Kind::Ha(_), None) => Err(ClientError::TxNeedsBroker {
                txn: id,
                reason: "over tracker:// transaction ids are unique per broker only: name \
                         its broker with Broker::transaction_on(addr, id), addr being what \
                         Transaction::broker() returned (qbus tx ... --on ADDR)"
                    .into(),
            }),
            (Kind::Ha(ha), Some(addr)) => {
                let (pin, connection) = Pin::on(ha, addr, id)?;
                Ok((connection, Some(pin)))
            }
        }
    }

    /// The open transactions of the one broker, or over HA of every live broker.
    pub(crate) async fn transactions(&self) -> Result<Vec<crate::BrokerTx>> {
        match &self.kind {
            Kind::Single(connection) => {
                crate::transaction::list(connection, &connection.addr()).await
            }
            Kind::Ha(ha) => ha.transactions().await,
        }
    }

    /// Answers the checks of producer group `group` with `checker`: on the one broker, or
    /// over HA on every broker of the topology as it changes.
    pub(crate) async fn register_checker<C: crate::TransactionChecker>(
        &self,
        group: &str,
        checker: C,
    ) -> Result<crate::ha::CheckerStatus> {
        match &self.kind {
            Kind::Single(connection) => {
                crate::check_back::register(connection, group, Arc::new(checker)).await?;
                Ok(crate::ha::CheckerStatus::default())
            }
            Kind::Ha(ha) => crate::ha::checkers::register(ha, group, checker).await,
        }
    }

    /// The connection a new transaction of producer group `group` goes over: the one
    /// broker's, or over HA the broker it is pinned to (with its pin).
    pub(crate) fn pin_transaction(&self, group: Option<&str>) -> Result<(Connection, Option<Pin>)> {
        match &self.kind {
            Kind::Single(connection) => Ok((connection.clone(), None)),
            Kind::Ha(ha) => {
                let (pin, connection) = Pin::choose(ha, group)?;
                Ok((connection, Some(pin)))
            }
        }
    }

    /// Sends a request about `mq` once and returns its pending reply (over HA to a holder,
    /// moving on while it cannot be sent).
    pub(crate) async fn send_request(&self, mq: &str, frame: Frame) -> Result<PendingReply> {
        match &self.kind {
            Kind::Single(connection) => connection.send(frame).await,
            Kind::Ha(ha) => ha.send_request(mq, frame).await,
        }
    }

    /// Sends a produce frame for `mq` and returns its pending reply. Over HA `key` (the
    /// first message's) picks the broker, and the reply sends the frame again elsewhere if
    /// that broker fails before answering.
    pub(crate) async fn send(
        &self,
        mq: &Arc<str>,
        key: Option<String>,
        frame: Frame,
    ) -> Result<PendingFrame> {
        let waiting = match &self.kind {
            Kind::Single(connection) => Waiting::Single(connection.send(frame).await?),
            Kind::Ha(ha) => Waiting::Ha(Box::new(ha.send(mq, key, frame).await?)),
        };
        Ok(PendingFrame { waiting })
    }

    /// Sends a frame that gets no reply (over HA, failing over only while sending).
    pub(crate) async fn send_oneway(
        &self,
        mq: &Arc<str>,
        key: Option<&str>,
        frame: Frame,
    ) -> Result<()> {
        match &self.kind {
            Kind::Single(connection) => connection.send_oneway(frame).await,
            Kind::Ha(ha) => ha.send_oneway(mq, key, frame).await,
        }
    }

    /// Calls `start` with a connection to each broker holding `mq`, the name to read there, a
    /// clone of `tx` and the token that stops what it started: once for one broker; over HA
    /// for every holder (and follower copies standing in for missing leaders), then for
    /// brokers that join while `tx`'s receiver lives, stopping those that leave.
    pub(crate) fn follow_holders<T, F>(&self, mq: &str, tx: mpsc::Sender<T>, start: F)
    where
        T: Send + 'static,
        F: Fn(Connection, String, mpsc::Sender<T>, CancellationToken) + Send + 'static,
    {
        match &self.kind {
            Kind::Single(connection) => start(
                connection.clone(),
                mq.to_owned(),
                tx,
                CancellationToken::new(),
            ),
            Kind::Ha(ha) => crate::ha::consume::follow_holders(ha, mq, tx, start),
        }
    }
}

/// The reply to a frame sent with [`Transport::send`]; over HA, waiting for it may send the
/// frame again to another broker.
#[derive(Debug)]
pub(crate) struct PendingFrame {
    waiting: Waiting,
}

#[derive(Debug)]
enum Waiting {
    Single(PendingReply),
    Ha(Box<HaReply>),
}

impl PendingFrame {
    /// Waits for the reply.
    pub(crate) async fn wait(self) -> Result<Frame> {
        match self.waiting {
            Waiting::Single(reply) => reply.await,
            Waiting::Ha(reply) => reply.wait().await,
        }
    }
}

async fn admin(connection: &Connection, request: Header, body: Bytes) -> Result<Frame> {
    connection.request(Frame::with_body(request, body)).await
}
