//! The broker's side of the permission model (`qbus_server_kit::auth`): who the peer of a
//! connection is, and which operation each binary request asks for. Every door (binary,
//! HTTP, zbus, the RPC gateway) asks the one [`Access`] of the broker's config.

use std::net::{IpAddr, SocketAddr};

use qbus_server_kit::auth::{Access, Denied, Identity, Operation};
use qbus_wire::protocol::{Command, Header, FLAG_ROUTE_ACK};

/// Where a connection comes from, as the door that accepted it saw it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// For the logs.
    pub addr: String,
    /// The peer's address; `None` for an in-process (embedded) client, which is trusted
    /// like a loopback one.
    pub ip: Option<IpAddr>,
    /// The name in the peer's verified TLS client certificate, when a TLS layer checked
    /// one: it is the peer's identity, no login needed.
    pub certificate: Option<String>,
}

impl Peer {
    /// A TCP peer.
    pub fn tcp(addr: SocketAddr) -> Peer {
        Peer {
            addr: addr.to_string(),
            ip: Some(addr.ip()),
            certificate: None,
        }
    }

    /// A client in this process.
    pub fn in_process() -> Peer {
        Peer {
            addr: "in-process".into(),
            ip: None,
            certificate: None,
        }
    }

    /// Who the peer is before it logs in: its certificate's user, anonymous if its
    /// address is served without credentials, or no one.
    pub fn identity(&self, access: &Access) -> Result<Option<Identity>, Denied> {
        match &self.certificate {
            Some(name) => access.certificate(name).map(Some),
            None => Ok(access.anonymous(self.ip)),
        }
    }
}

/// What a binary request must be allowed.
#[derive(Debug, PartialEq, Eq)]
pub enum Needs<'a> {
    /// Nothing (handshake, heartbeat, errors).
    Nothing,
    /// `op` on `mq` (in `group`).
    On(Operation, &'a str, Option<&'a str>),
    /// Consuming `mq` in `group`, which an RPC server of the MQ may do too.
    Take(&'a str, &'a str),
    /// `op` on some MQ (an RPC reply: its route stands for the MQ).
    Some(Operation),
    /// Any identity at all (the list of MQs, filtered to what it may read).
    Identity,
}

/// What `header`'s command needs. A request without its MQ needs nothing here: it is
/// refused as a bad request.
pub fn needs(header: &Header) -> Needs<'_> {
    let Some(mq) = header.mq.as_deref() else {
        return match header.cmd {
            Command::ListMq => Needs::Identity,
            Command::Route => Needs::Some(Operation::RpcServe),
            // A transaction's messages are checked MQ by MQ as they are sent (TxProduce
            // names its MQ); opening and deciding one needs a producer somewhere.
            Command::TxBegin
            | Command::TxCommit
            | Command::TxRollback
            | Command::TxCheckerReady => Needs::Some(Operation::Produce),
            Command::TxList => Needs::Some(Operation::Read),
            _ => Needs::Nothing,
        };
    };
    let group = header.group.as_deref();
    match header.cmd {
        Command::Produce | Command::TxProduce => Needs::On(Operation::Produce, mq, None),
        Command::TxBegin | Command::TxCommit | Command::TxRollback | Command::TxCheckerReady => {
            Needs::Some(Operation::Produce)
        }
        Command::TxList => Needs::Some(Operation::Read),
        Command::Fetch | Command::Ack | Command::Nack => Needs::Take(mq, group.unwrap_or(mq)),
        Command::CreateMq | Command::RemoveMq | Command::RemoveGroup => {
            Needs::On(Operation::Admin, mq, None)
        }
        Command::QueryMq | Command::QueryRoutes => Needs::On(Operation::Read, mq, None),
        Command::ListMq => Needs::Identity,
        Command::Call => Needs::On(Operation::RpcCall, mq, None),
        // A reply that also acknowledges its call serves that MQ, so it needs `rpc-serve`
        // on it (which an ack of the MQ accepts too).
        Command::Route if header.has_flag(FLAG_ROUTE_ACK) => {
            Needs::On(Operation::RpcServe, mq, None)
        }
        Command::Route => Needs::Some(Operation::RpcServe),
        // Brokers following this one's copy read its whole log and cursors: a node's
        // permission, as registering with a tracker is.
        Command::ReplicaRead | Command::ReplicaEpoch | Command::ReplicaCursor => {
            Needs::On(Operation::Register, mq, None)
        }
        Command::AdoptCopy => Needs::On(Operation::Admin, mq, None),
        _ => Needs::Nothing,
    }
}

/// Checks `needs` for `who`.
pub fn permit(access: &Access, who: Option<&Identity>, needs: Needs<'_>) -> Result<(), Denied> {
    match needs {
        Needs::Nothing => Ok(()),
        Needs::On(op, mq, group) => access.check(who, op, mq, group),
        Needs::Take(mq, group) => access
            .check(who, Operation::Consume, mq, Some(group))
            .or_else(|denied| {
                access
                    .check(who, Operation::RpcServe, mq, None)
                    .map_err(|_| denied)
            }),
        Needs::Some(op) => access.check_some(who, op),
        Needs::Identity => access.check_lists(who),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_name_their_operation() {
        let mut header = Header::request(Command::Fetch, Some("orders"));
        assert_eq!(needs(&header), Needs::Take("orders", "orders"));
        header.group = Some("billing".into());
        assert_eq!(needs(&header), Needs::Take("orders", "billing"));
        let route = Header::request(Command::Route, None);
        assert_eq!(needs(&route), Needs::Some(Operation::RpcServe));
        let remove = Header::request(Command::RemoveGroup, Some("orders"));
        assert_eq!(needs(&remove), Needs::On(Operation::Admin, "orders", None));
        // Reading the raw log for a copy is a node's right, not anyone's.
        for cmd in [Command::ReplicaRead, Command::ReplicaCursor] {
            let read = Header::request(cmd, Some("orders"));
            assert_eq!(needs(&read), Needs::On(Operation::Register, "orders", None));
        }
        let adopt = Header::request(Command::AdoptCopy, Some("orders"));
        assert_eq!(needs(&adopt), Needs::On(Operation::Admin, "orders", None));
        let half = Header::request(Command::TxProduce, Some("orders"));
        assert_eq!(needs(&half), Needs::On(Operation::Produce, "orders", None));
        for cmd in [
            Command::TxBegin,
            Command::TxCommit,
            Command::TxRollback,
            Command::TxCheckerReady,
        ] {
            let decide = Header::request(cmd, None);
            assert_eq!(needs(&decide), Needs::Some(Operation::Produce));
        }
        assert_eq!(
            needs(&Header::request(Command::Heartbeat, None)),
            Needs::Nothing
        );
    }
}
