//! Errors of broker operations, each mapped to a wire status.

use qbus_server_kit::auth::Denied;
use qbus_wire::protocol::Status;

use crate::replica::leader::ReplicationError;
use crate::store::StoreError;

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The MQ does not exist.
    #[error("MQ {0:?} does not exist")]
    NoSuchMq(String),
    /// The consumer group does not exist.
    #[error("MQ {mq:?} has no consumer group {group:?}")]
    NoSuchGroup {
        /// The MQ.
        mq: String,
        /// The group asked for.
        group: String,
    },
    /// The consumer group has consumers attached, so it cannot be removed.
    #[error(
        "consumer group {group:?} of MQ {mq:?} has consumers attached; stop them first \
         (a consumer counts until 2 s after its last fetch)"
    )]
    GroupInUse {
        /// The MQ.
        mq: String,
        /// The group.
        group: String,
    },
    /// No transaction with this id (never begun here, or decided long ago and forgotten).
    #[error("no transaction {0} on this broker (never begun here, or decided long ago)")]
    NoSuchTxn(u64),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The request contradicts what the broker holds.
    #[error("{0}")]
    Conflict(String),
    /// The peer holds too much; it must ack first.
    #[error("{0}")]
    Overloaded(String),
    /// The broker failed, not the request (a task it ran panicked).
    #[error("{0}")]
    Internal(String),
    /// Storage failed.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// The broker is stopping.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// No credentials where they are needed, or bad ones (401), or credentials that do not
    /// allow the request (403).
    #[error("{0}")]
    Denied(#[from] Denied),
    /// A `replicated` produce could not reach enough followers.
    #[error("replication: {0}")]
    Replication(#[from] ReplicationError),
    /// The request may succeed if sent again (here or to another broker).
    #[error("{0}")]
    Unavailable(String),
}

impl BrokerError {
    /// The status code sent to the client.
    pub fn status(&self) -> Status {
        match self {
            BrokerError::NoSuchMq(_)
            | BrokerError::NoSuchGroup { .. }
            | BrokerError::NoSuchTxn(_) => Status::NotFound,
            BrokerError::GroupInUse { .. } | BrokerError::Conflict(_) => Status::Conflict,
            BrokerError::BadRequest(_) => Status::BadRequest,
            BrokerError::Overloaded(_) => Status::Overloaded,
            BrokerError::Store(e) if e.is_disk_full() => Status::InsufficientStorage,
            // Another broker holding the MQ can take the write (HA clients fail over on 503).
            BrokerError::Store(StoreError::Halted { .. }) => Status::Unavailable,
            // Restoring: the MQ takes produce again in a moment; the others take it now.
            BrokerError::Store(StoreError::ReadOnly { .. }) => Status::Unavailable,
            BrokerError::Internal(_) | BrokerError::Store(_) => Status::Internal,
            // A tracker:// producer moves on to another broker.
            BrokerError::ShuttingDown
            | BrokerError::Replication(_)
            | BrokerError::Unavailable(_) => Status::Unavailable,
            BrokerError::Denied(Denied::Unauthenticated(_)) => Status::Unauthorized,
            BrokerError::Denied(Denied::Forbidden(_)) => Status::Forbidden,
        }
    }
}

/// Checks an MQ or group name: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with a dot
/// (names become file names, so nothing else is safe).
pub fn validate_name(kind: &str, name: &str) -> Result<(), BrokerError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(BrokerError::BadRequest(format!(
            "invalid {kind} name {name:?}: use 1 to 128 of A-Z a-z 0-9 . _ - (not starting with '.')"
        )))
    }
}

/// A request field that must be there, or a `400` naming it.
pub(crate) fn required<'a>(value: &'a Option<String>, what: &str) -> Result<&'a str, BrokerError> {
    value
        .as_deref()
        .ok_or_else(|| BrokerError::BadRequest(format!("missing {what}")))
}

#[cfg(test)]
mod tests {
    use super::validate_name;

    #[test]
    fn names() {
        for good in ["orders", "a.b-c_d", "X1"] {
            assert!(validate_name("MQ", good).is_ok());
        }
        for bad in ["", ".hidden", "a/b", "..", "sp ace", &"x".repeat(129)] {
            assert!(validate_name("MQ", bad).is_err(), "{bad}");
        }
    }
}
