//! The `Broker` handle: admin calls and the factory for producers and consumers.

use bytes::Bytes;

use crate::connection::{Connection, ConnectionOptions};
use crate::consumer::ConsumerBuilder;
use crate::error::{ClientError, Result};
use crate::link::{Connector, TcpConnector};
use crate::producer::Producer;
use crate::protocol::{Command, Frame, Header, MqInfo, MqOptions, DEFAULT_MAX_FRAME};

/// A handle on a qbus broker: one address over TCP, or an embedded broker in this process
/// (see `qbus_broker::EmbeddedBroker`). Cheap to clone; all clones share one connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), qbus_client::ClientError> {
/// use qbus_client::{Broker, MqOptions};
/// let broker = Broker::connect("127.0.0.1:15555").await?;
/// broker.create_mq("orders", MqOptions::default()).await?;
/// for mq in broker.list_mqs().await? {
///     println!("{} holds {} messages", mq.name, mq.depth());
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Broker {
    connection: Connection,
}

impl Broker {
    /// Connects to the broker at `addr` (`host:port` or `tcp://host:port`) with default
    /// options; fails if it cannot be reached within the connect deadline.
    pub async fn connect(addr: &str) -> Result<Broker> {
        Broker::connect_with(addr, ConnectionOptions::default()).await
    }

    /// Connects with explicit options.
    pub async fn connect_with(addr: &str, options: ConnectionOptions) -> Result<Broker> {
        let target = parse_address(addr)?;
        let broker = Broker::from_connector(TcpConnector::new(target, DEFAULT_MAX_FRAME), options);
        broker.connection.ensure_connected().await?;
        Ok(broker)
    }

    /// A broker reached through `connector` (the embedded broker plugs in here). Connects
    /// lazily, on the first call.
    pub fn from_connector(connector: impl Connector, options: ConnectionOptions) -> Broker {
        Broker {
            connection: Connection::new(connector, options),
        }
    }

    /// A producer for `mq`.
    pub fn producer(&self, mq: &str) -> Producer {
        Producer::new(self.clone(), mq)
    }

    /// Starts building a consumer of `mq`.
    pub fn consumer(&self, mq: &str) -> ConsumerBuilder {
        ConsumerBuilder::new(self.clone(), mq)
    }

    /// Creates `mq`. Creating an MQ that exists succeeds and returns it as it is.
    pub async fn create_mq(&self, mq: &str, options: MqOptions) -> Result<MqInfo> {
        let body =
            rmp_serde::to_vec_named(&options).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let reply = self.admin(Command::CreateMq, Some(mq), body.into()).await?;
        decode(&reply.body)
    }

    /// Describes `mq`; a [`Status::NotFound`](crate::protocol::Status) error if it is absent.
    pub async fn query_mq(&self, mq: &str) -> Result<MqInfo> {
        let reply = self.admin(Command::QueryMq, Some(mq), Bytes::new()).await?;
        decode(&reply.body)
    }

    /// Describes every MQ, sorted by name.
    pub async fn list_mqs(&self) -> Result<Vec<MqInfo>> {
        let reply = self.admin(Command::ListMq, None, Bytes::new()).await?;
        decode(&reply.body)
    }

    /// Deletes `mq` with its messages and groups.
    pub async fn remove_mq(&self, mq: &str) -> Result<()> {
        self.admin(Command::RemoveMq, Some(mq), Bytes::new())
            .await
            .map(drop)
    }

    /// The connection that serves `mq`.
    pub(crate) fn connection_for(&self, _mq: &str) -> &Connection {
        &self.connection
    }

    async fn admin(&self, cmd: Command, mq: Option<&str>, body: Bytes) -> Result<Frame> {
        let frame = Frame::with_body(Header::request(cmd, mq), body);
        self.connection.request(frame).await
    }
}

fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    rmp_serde::from_slice(body).map_err(|e| ClientError::Protocol(format!("bad reply body: {e}")))
}

/// Checks an address string and returns the `host:port` to dial.
fn parse_address(addr: &str) -> Result<String> {
    let bad = |reason: &str| ClientError::Address {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let target = addr.strip_prefix("tcp://").unwrap_or(addr);
    if target.contains("://") {
        return Err(bad("expected host:port or tcp://host:port"));
    }
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| bad("missing :port"))?;
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    port.parse::<u16>()
        .map_err(|_| bad("port must be a number from 1 to 65535"))?;
    Ok(target.to_owned())
}

#[cfg(test)]
mod tests {
    use super::parse_address;

    #[test]
    fn addresses() {
        assert_eq!(parse_address("127.0.0.1:15555").unwrap(), "127.0.0.1:15555");
        assert_eq!(parse_address("tcp://localhost:1").unwrap(), "localhost:1");
        for bad in [
            "localhost",
            ":15555",
            "host:port",
            "host:99999",
            "http://x:1",
        ] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }
}
