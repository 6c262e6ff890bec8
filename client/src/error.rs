//! Errors the SDK returns.

use std::time::Duration;

use crate::protocol::{Status, WireError};

/// Why a client call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// No connection could be made within the connect deadline.
    #[error("cannot connect to {addr} within {waited:?}: {reason}")]
    Connect {
        /// The address tried.
        addr: String,
        /// How long the client kept trying.
        waited: Duration,
        /// The last failure.
        reason: String,
    },
    /// The connection closed before the reply came. A request that was sent may or may not
    /// have taken effect: a produce may have been stored.
    #[error("connection to {addr} closed before the reply came")]
    Disconnected {
        /// The peer.
        addr: String,
    },
    /// No reply within the request timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The broker answered with an error status.
    #[error("broker replied {status}: {message}")]
    Server {
        /// The status code.
        status: Status,
        /// The broker's explanation.
        message: String,
    },
    /// A frame or record could not be encoded or decoded.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The address string is not understood.
    #[error("invalid broker address {addr:?}: {reason}")]
    Address {
        /// What was given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An HA client has no broker to send to: none holds the MQ in the topology, or every
    /// one holding it failed this request.
    #[error("no broker available for MQ {mq:?}: {reason}")]
    NoBroker {
        /// The MQ.
        mq: String,
        /// Why, and what to do about it.
        reason: String,
    },
    /// Over `tracker://`, listing the transactions of every live broker failed on one.
    #[error("listing the transactions of broker {broker}: {source} (retry, or ask that broker directly)")]
    TxList {
        /// The broker's address.
        broker: String,
        /// What it answered, or why it could not be asked.
        source: Box<ClientError>,
    },
    /// The TLS settings cannot be used (an unreadable CA or certificate file, a key that
    /// does not match its certificate).
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Over `tracker://`: the broker transaction `txn` is pinned to left the topology or
    /// its connection failed. The transaction is not moved to another broker (its half
    /// messages are on that one); the broker's check-back decides it once it is back, and
    /// a decision retried then goes to it.
    #[error("transaction {txn} is pinned to broker {broker}, which is unreachable ({reason}); its check-back will decide it there")]
    TxBrokerLost {
        /// The transaction.
        txn: u64,
        /// The broker it is on.
        broker: String,
        /// What failed.
        reason: String,
    },
    /// Transaction `txn` cannot be named by its id alone here: ids are unique per broker,
    /// and over `tracker://` the handle reaches several (or the broker named is not the one
    /// this handle reaches). Name its broker, the address [`Transaction::broker`] returned
    /// at its begin: [`Broker::transaction_on`](crate::Broker::transaction_on).
    ///
    /// [`Transaction::broker`]: crate::Transaction::broker
    #[error("transaction {txn}: {reason}")]
    TxNeedsBroker {
        /// The transaction.
        txn: u64,
        /// Why, and what to do instead.
        reason: String,
    },
    /// The handle was closed.
    #[error("client is closed")]
    Closed,
    /// Not fatal, a consumer's notice: records of the MQ were damaged on the broker's disk
    /// and the group went past them; the stream goes on after them. `detail` names the
    /// file and byte.
    #[error("MQ {mq:?}: offsets {first}..{end} are lost: {detail}")]
    RecordsLost {
        /// The MQ.
        mq: String,
        /// The first offset lost.
        first: u64,
        /// The offset after the last one lost.
        end: u64,
        /// What the broker said: the damaged file, the byte, what is wrong.
        detail: String,
    },
}

impl ClientError {
    /// The broker's status, for [`ClientError::Server`] errors.
    pub fn status(&self) -> Option<Status> {
        match self {
            ClientError::Server { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True when retrying on another connection may succeed (the broker was unreachable or
    /// went away), false for errors the broker reported about the request itself.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. }
                | ClientError::Disconnected { .. }
                | ClientError::Timeout(_)
        )
    }
}

impl From<WireError> for ClientError {
    fn from(e: WireError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

impl From<crate::protocol::record::RecordError> for ClientError {
    fn from(e: crate::protocol::record::RecordError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

/// Decodes a reply body (a MessagePack map or list of them); a body that does not decode
/// is the peer's protocol error.
pub(crate) fn decode_reply<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    rmp_serde::from_slice(body).map_err(|e| ClientError::Protocol(format!("bad reply body: {e}")))
}

/// Result alias for SDK calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
