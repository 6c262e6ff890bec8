//! What a call can fail with, apart from the method's own `Result<T, E>`.

use std::time::Duration;

use qbus_client::protocol::Status;
use qbus_client::ClientError;

use crate::envelope::{ErrorCode, RemoteError};

/// Why an RPC call failed in the framework or the transport. A method's application errors
/// are not here: they arrive as the `Err` of the method's own `Result<T, E>` inside `Ok`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// No reply within the call's deadline (the server stops work past it too).
    #[error("no reply within {0:?} (the call's deadline; raise it with .timeout(...))")]
    Timeout(Duration),
    /// Nobody can take the call: nothing consumes the MQ, or no server offers the service.
    #[error("no responders for {target}: {reason}")]
    NoResponders {
        /// The MQ or service.
        target: String,
        /// Why, and what to do about it.
        reason: String,
    },
    /// The server (or broker) could not be reached; the call was not sent.
    #[error("cannot reach {addr}: {reason}")]
    Unreachable {
        /// The address tried.
        addr: String,
        /// The last failure.
        reason: String,
    },
    /// The connection closed after the call was sent: it may or may not have run.
    #[error("connection to {addr} closed before the reply came; the call may or may not have run")]
    Disconnected {
        /// The peer.
        addr: String,
    },
    /// The call could not be encoded, or its reply decoded, here.
    #[error("codec error: {0}")]
    Codec(String),
    /// The server answered with a framework error: unknown module or method, bad params,
    /// deadline exceeded, a panicking handler.
    #[error("server error {0}")]
    Remote(RemoteError),
    /// The broker or server refused the request itself (a status other than 200).
    #[error("refused with {status}: {message}")]
    Refused {
        /// The status of the reply.
        status: Status,
        /// The explanation.
        message: String,
    },
}

impl RpcError {
    /// The code of a [`RpcError::Remote`] error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            RpcError::Remote(e) => Some(e.code),
            _ => None,
        }
    }

    /// True when the call certainly did not run and another server may take it.
    pub fn is_unsent(&self) -> bool {
        matches!(
            self,
            RpcError::Unreachable { .. } | RpcError::NoResponders { .. }
        )
    }

    /// Maps an SDK error met while calling `target` (an MQ or a server address).
    pub(crate) fn from_client(error: ClientError, target: &str) -> RpcError {
        match error {
            ClientError::Connect { addr, reason, .. } => RpcError::Unreachable { addr, reason },
            ClientError::Address { addr, reason } => RpcError::Unreachable { addr, reason },
            ClientError::Tls(e) => RpcError::Unreachable {
                addr: target.to_owned(),
                reason: e.to_string(),
            },
            ClientError::Disconnected { addr } => RpcError::Disconnected { addr },
            ClientError::Closed => RpcError::Disconnected {
                addr: target.to_owned(),
            },
            ClientError::Timeout(limit) => RpcError::Timeout(limit),
            ClientError::NoBroker { mq, reason } => RpcError::NoResponders { target: mq, reason },
            ClientError::Server { status, message } => match status {
                // A broker answers 503 when nothing consumes the MQ, 404 when there is no
                // such MQ: either way nobody will answer.
                Status::Unavailable | Status::NotFound => RpcError::NoResponders {
                    target: target.to_owned(),
                    reason: message,
                },
                status => RpcError::Refused { status, message },
            },
            ClientError::Protocol(message) => RpcError::Codec(message),
            // A consumer's notice and a transaction's error: a call never gets them.
            other @ (ClientError::RecordsLost { .. }
            | ClientError::TxBrokerLost { .. }
            | ClientError::TxList { .. }
            | ClientError::TxNeedsBroker { .. }) => RpcError::Codec(other.to_string()),
        }
    }
}

impl From<RemoteError> for RpcError {
    fn from(e: RemoteError) -> Self {
        RpcError::Remote(e)
    }
}
