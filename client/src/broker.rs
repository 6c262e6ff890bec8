//! The `Broker` handle: admin calls and the factory for producers and consumers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;

use tokio::sync::watch;

use crate::call::{call_frame, PendingCall};
use crate::connection::{Connection, ConnectionOptions};
use crate::consumer::ConsumerBuilder;
use crate::error::{decode_reply, ClientError, Result};
use crate::ha::{parse_trackers, Ha, HaOptions, HaStatus, TRACKER_SCHEME, TRACKER_TLS_SCHEME};
use crate::link::{Connector, TcpConnector};
use crate::producer::Producer;
use crate::protocol::{
    Command, Credentials, Frame, Header, MqInfo, MqOptions, RouteStats, TxOptions,
    DEFAULT_MAX_FRAME,
};
use crate::tls::ClientTls;
use crate::topology::Topology;
use crate::transaction::Transaction;
use crate::transport::Transport;

/// A handle on qbus: one broker over TCP (`host:port`, or `tls://host:port` over TLS), an embedded broker in this process
/// (see `qbus_broker::EmbeddedBroker`), or a cluster found through trackers
/// (`tracker://HOST:PORT[,HOST:PORT...]`, `tracker+tls://` over TLS, see [`ha`](crate::ha)). Producers, consumers and
/// admin calls work the same on all three. Cheap to clone; clones share the connections.
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
    transport: Transport,
}

impl Broker {
    /// Connects to `addr` with default options: a broker at `host:port`, `tcp://host:port`
    /// or `qbus://host:port`, or the brokers the trackers of
    /// `tracker://HOST:PORT[,HOST:PORT...]` know (waiting for the first topology, see
    /// [`HaOptions`]). Fails if the broker (or every tracker) cannot be reached within the
    /// connect deadline.
    ///
    /// Credentials may lead the address: `user:password@` logs in as a user, `:token@`
    /// with a token (`qbus://alice:s3cret@10.0.0.7:15555`,
    /// `tracker://:qbus_5f2e...@10.0.0.1:16666,10.0.0.2:16667`; the HA handle logs in to
    /// the trackers and every broker with them). Or set
    /// [`ConnectionOptions::credentials`].
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qbus_client::ClientError> {
    /// let single = qbus_client::Broker::connect("127.0.0.1:15555").await?;
    /// let cluster = qbus_client::Broker::connect("tracker://10.0.0.1:16666,10.0.0.2:16667").await?;
    /// let alice = qbus_client::Broker::connect("qbus://alice:s3cret@10.0.0.7:15555").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// `tls://host:port` and `tracker+tls://HOST:PORT[,...]` speak TLS, verifying each
    /// server's certificate for the host dialed with the CA in the PEM file named by the
    /// `QBUS_CA` environment variable (and presenting the client certificate of
    /// `QBUS_CLIENT_CERT` and `QBUS_CLIENT_KEY` when both are set); to give them in code,
    /// use [`connect_tls`](Broker::connect_tls) or [`HaOptions::with_tls`].
    pub async fn connect(addr: &str) -> Result<Broker> {
        if is_tracker_address(addr) {
            return Broker::connect_ha(addr, HaOptions::default()).await;
        }
        Broker::connect_with(addr, ConnectionOptions::default()).await
    }

    /// Connects with explicit options. For `tracker://` addresses the connect timeout
    /// bounds the wait for the first topology, and the broker connections use these options
    /// with each of them capped at its HA default (connect 1 s, request 10 s, heartbeat
    /// 250 ms; see [`HaOptions::connection`]) so failover stays fast; use
    /// [`connect_ha`](Broker::connect_ha) for full control.
    pub async fn connect_with(addr: &str, options: ConnectionOptions) -> Result<Broker> {
        Broker::connect_tls(addr, options, None).await
    }

    /// Connects as [`connect_with`](Broker::connect_with) does, over TLS with `tls` when it
    /// is given, whatever the address's scheme (`host:port`, `tls://`, `tracker://`,
    /// `tracker+tls://`); with `None`, only `tls://` and `tracker+tls://` addresses speak
    /// TLS, with the CA of `QBUS_CA`. Each server's certificate must chain to `tls`'s roots
    /// and name the host dialed (an IP address as an IP SAN); one that does not verify
    /// fails at once with a [`ClientError::Connect`] naming the reason. Over an HA handle
    /// every broker the trackers report is verified the same way, for the address it
    /// advertises.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qbus_client::ClientError> {
    /// use std::path::Path;
    /// use qbus_client::tls::ClientTls;
    /// let tls = ClientTls::from_pem_files(Path::new("ca.pem"), None)?;
    /// let options = Default::default();
    /// let broker = qbus_client::Broker::connect_tls("tls://127.0.0.1:15555", options, Some(tls)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_tls(
        addr: &str,
        mut options: ConnectionOptions,
        tls: Option<ClientTls>,
    ) -> Result<Broker> {
        let (credentials, addr) = split_credentials(addr);
        let addr = addr.as_str();
        if credentials.is_some() {
            options.credentials = credentials;
        }
        if is_tracker_address(addr) {
            let defaults = HaOptions::default();
            let ha = HaOptions {
                first_topology: options.connect_timeout,
                // A single broker's defaults (a 5 s heartbeat) would let a hung broker hold
                // up sends for 15 s before they fail over.
                connection: ConnectionOptions {
                    connect_timeout: options
                        .connect_timeout
                        .min(defaults.connection.connect_timeout),
                    request_timeout: options
                        .request_timeout
                        .min(defaults.connection.request_timeout),
                    heartbeat: options.heartbeat.min(defaults.connection.heartbeat),
                    credentials: options.credentials,
                },
                tls,
                ..defaults
            };
            return Broker::connect_ha(addr, ha).await;
        }
        let (target, tls_scheme) = parse_address(addr)?;
        let tls = match (tls, tls_scheme) {
            (Some(tls), _) => Some(tls),
            (None, true) => Some(tls_from_env(addr).await?),
            (None, false) => None,
        };
        Broker::connect_single(target, options, tls).await
    }

    async fn connect_single(
        target: String,
        options: ConnectionOptions,
        tls: Option<ClientTls>,
    ) -> Result<Broker> {
        let connector = TcpConnector::new(target, DEFAULT_MAX_FRAME).with_tls(tls);
        let connection = Connection::new(connector, options);
        connection.ensure_connected().await?;
        Ok(Broker {
            transport: Transport::single(connection),
        })
    }

    /// Connects to the brokers known to `trackers` (`tracker://HOST:PORT[,HOST:PORT...]`,
    /// the scheme optional), waiting up to `options.first_topology` for a tracker's answer.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qbus_client::ClientError> {
    /// use qbus_client::ha::{HaOptions, LeastLoaded};
    /// let options = HaOptions::default().with_selector(LeastLoaded::default());
    /// let broker = qbus_client::Broker::connect_ha("10.0.0.1:16666,10.0.0.2:16667", options).await?;
    /// for b in broker.topology().expect("an HA handle has a topology").brokers() {
    ///     println!("{} holds {} MQs", b.addr, b.mqs.len());
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// A `tracker+tls://` address needs TLS: without [`HaOptions::tls`] its CA comes from
    /// `QBUS_CA` as for [`connect`](Broker::connect).
    pub async fn connect_ha(trackers: &str, mut options: HaOptions) -> Result<Broker> {
        let (credentials, trackers) = split_credentials(trackers);
        if credentials.is_some() {
            options.connection.credentials = credentials;
        }
        if trackers.starts_with(TRACKER_TLS_SCHEME) && options.tls.is_none() {
            options.tls = Some(tls_from_env(&trackers).await?);
        }
        let trackers = parse_trackers(&trackers)?;
        Ok(Broker {
            transport: Transport::ha(Ha::connect(trackers, options).await?),
        })
    }

    /// A broker reached through `connector` (the embedded broker plugs in here). Connects
    /// lazily, on the first call.
    pub fn from_connector(connector: impl Connector, options: ConnectionOptions) -> Broker {
        Broker {
            transport: Transport::single(Connection::new(connector, options)),
        }
    }

    /// The cluster as the trackers describe it, for an HA handle; `None` for one broker.
    pub fn topology(&self) -> Option<Arc<Topology>> {
        self.transport.topology()
    }

    /// A receiver that sees each new topology of an HA handle; `None` for one broker.
    pub fn watch_topology(&self) -> Option<watch::Receiver<Arc<Topology>>> {
        self.transport.watch_topology()
    }

    /// The TLS an HA handle reaches the trackers and every node they report with
    /// ([`HaOptions::tls`]); `None` over plain TCP and for one broker.
    pub fn tls(&self) -> Option<ClientTls> {
        self.transport.tls()
    }

    /// Trackers and unreachable brokers of an HA handle; `None` for one broker.
    pub fn ha_status(&self) -> Option<HaStatus> {
        self.transport.ha_status()
    }

    /// A producer for `mq`.
    pub fn producer(&self, mq: &str) -> Producer {
        Producer::new(self.transport.clone(), mq)
    }

    /// Starts building a consumer of `mq`.
    pub fn consumer(&self, mq: &str) -> ConsumerBuilder {
        ConsumerBuilder::new(self.transport.clone(), mq)
    }

    /// Creates `mq`. Creating an MQ that exists succeeds and returns it as it is. Over an
    /// HA handle, creates it on every live broker (or [`HaOptions::create_on`] of them).
    pub async fn create_mq(&self, mq: &str, options: MqOptions) -> Result<MqInfo> {
        self.transport.create_mq(mq, options).await
    }

    /// Describes `mq`; a [`Status::NotFound`](crate::protocol::Status) error if it is absent.
    /// Over an HA handle, the sum of its copies on every broker holding it.
    pub async fn query_mq(&self, mq: &str) -> Result<MqInfo> {
        self.transport.query_mq(mq).await
    }

    /// Makes a follower's copy of broker `leader`'s `mq` an ordinary, writable MQ named `mq`
    /// on the follower's broker, with the copy's messages and group cursors: for a broker
    /// whose machine is never coming back (`docs/replication.md`). Over HA it goes to the
    /// follower the topology says holds the copy; to one broker, to that broker. Fails
    /// (`409`) when that broker holds an `mq` of its own.
    pub async fn adopt_copy(&self, mq: &str, leader: &str) -> Result<MqInfo> {
        self.transport.adopt_copy(mq, leader).await
    }

    /// Describes every MQ, sorted by name (over an HA handle, summed over brokers).
    pub async fn list_mqs(&self) -> Result<Vec<MqInfo>> {
        self.transport.list_mqs().await
    }

    /// Deletes `mq` with its messages and groups (over an HA handle, on every broker).
    pub async fn remove_mq(&self, mq: &str) -> Result<()> {
        self.transport.remove_mq(mq).await
    }

    /// Deletes consumer group `group` of `mq`: its place in the MQ and its deliveries in
    /// flight; a consumer subscribing later under that name starts afresh. Refused with
    /// [`Status::Conflict`](crate::protocol::Status) while a consumer of the group is
    /// attached, [`Status::NotFound`](crate::protocol::Status) if there is no such group.
    /// Over an HA handle, on every broker that has it.
    ///
    /// ```no_run
    /// # async fn demo(broker: qbus_client::Broker) -> qbus_client::Result<()> {
    /// broker.remove_group("orders", "old-billing").await?;
    /// # Ok(()) }
    /// ```
    pub async fn remove_group(&self, mq: &str, group: &str) -> Result<()> {
        self.transport.remove_group(mq, group).await
    }

    /// Sends an MQ-RPC call to `mq`: the broker stores it for whatever consumes the MQ and
    /// routes the responder's reply back here. `body` is the request envelope, `encoding` its
    /// `encoding` header (`None`: MessagePack), `timeout` its deadline on the broker. Over an
    /// HA handle the call goes to a holder of `mq` chosen as for a message without a key,
    /// moving on while it cannot be sent; once sent it is never sent again, since the
    /// service may have run it.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qbus_client::ClientError> {
    /// use std::time::Duration;
    /// let broker = qbus_client::Broker::connect("127.0.0.1:15555").await?;
    /// let request = r#"{"module":"Greeter","method":"hello","params":["you"]}"#;
    /// let pending = broker
    ///     .send_call("greeter-rpc", request.into(), Some("json".into()), Duration::from_secs(5))
    ///     .await?;
    /// let reply = pending.await?;
    /// println!("{}", String::from_utf8_lossy(&reply.body));
    /// # Ok(()) }
    /// ```
    pub fn send_call<'a>(
        &'a self,
        mq: &'a str,
        body: Bytes,
        encoding: Option<String>,
        timeout: Duration,
    ) -> impl Future<Output = Result<PendingCall>> + Send + 'a {
        // Not an `async fn`, so that a call's future is the send's own and no bigger.
        let frame = call_frame(Some(mq), body, encoding, timeout);
        self.transport
            .send_request(mq, frame)
            .map(|sent| sent.map(PendingCall::new))
    }

    /// Opens a transaction (protocol 4; see [`Transaction`]). Over `tracker://` it is
    /// pinned to one live broker (its producer group's, see
    /// [`ha`](crate::ha)), named by [`Transaction::broker`]; every later request of it goes
    /// there and fails with [`ClientError::TxBrokerLost`] once that broker is gone.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qbus_client::ClientError> {
    /// use qbus_client::TxOptions;
    /// let broker = qbus_client::Broker::connect("127.0.0.1:15555").await?;
    /// let options = TxOptions { timeout_ms: Some(10_000), ..TxOptions::default() };
    /// let tx = broker.begin(options).await?;
    /// tx.send("orders", "order #1").await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn begin(&self, options: TxOptions) -> Result<Transaction> {
        let (connection, pin) = self.transport.pin_transaction(options.group.as_deref())?;
        Transaction::begin(connection, pin, &options).await
    }

    /// A handle on transaction `id` of this broker, to commit or roll back one that
    /// another process (say, a producer that crashed) began. Ids are unique per broker, so
    /// over `tracker://` this fails with [`ClientError::TxNeedsBroker`]: use
    /// [`transaction_on`](Self::transaction_on) with the transaction's broker.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qbus_client::ClientError> {
    /// let broker = qbus_client::Broker::connect("127.0.0.1:15555").await?;
    /// broker.transaction(42)?.rollback().await?;
    /// # Ok(()) }
    /// ```
    pub fn transaction(&self, id: u64) -> Result<Transaction> {
        let (connection, pin) = self.transport.attach_transaction(None, id)?;
        Ok(Transaction::attach(connection, id, pin))
    }

    /// A handle on transaction `id` of the broker at `broker`: the address
    /// [`Transaction::broker`] returned when it began (over `tracker://`, the broker it was
    /// pinned to), which the producer keeps with the id, as a RocketMQ producer keeps a
    /// transaction's broker with its id. Over `tracker://` its requests go to that broker
    /// alone, and fail with [`ClientError::TxBrokerLost`] while it is not in the topology
    /// (retry once it is back: its transactions wait there); on a single broker's handle,
    /// `broker` must be that broker's address ([`ClientError::TxNeedsBroker`] otherwise,
    /// rather than decide another transaction of the same number).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qbus_client::ClientError> {
    /// use qbus_client::TxOptions;
    /// let cluster = qbus_client::Broker::connect("tracker://10.0.0.1:16666").await?;
    /// let tx = cluster.begin(TxOptions::default()).await?;
    /// let (broker, id) = (tx.broker(), tx.id()); // saved, say, next to the local work
    /// // ... later, maybe in another process ...
    /// cluster.transaction_on(&broker, id)?.commit().await?;
    /// # Ok(()) }
    /// ```
    pub fn transaction_on(&self, broker: &str, id: u64) -> Result<Transaction> {
        let (connection, pin) = self.transport.attach_transaction(Some(broker), id)?;
        Ok(Transaction::attach(connection, id, pin))
    }

    /// Answers the broker's checks of producer group `group`'s undecided transactions with
    /// `checker` (see [`TransactionChecker`](crate::TransactionChecker) for an example),
    /// also after reconnects, as long as this handle lives. A transaction belongs to the
    /// group named in its [`TxOptions::group`]; a producer restarted after a crash
    /// registers the same group to decide its predecessor's transactions. Over
    /// `tracker://` the checker answers for every broker of the topology, those that join
    /// later and those that restart included, wherever the group's transactions were
    /// begun. Fails with status `501` on a broker older than protocol 4 (over
    /// `tracker://`, on any broker there when it is called); over `tracker://`, a broker
    /// that refuses later (one joining afterwards) is listed by the returned status's
    /// [`refusals`](crate::ha::CheckerStatus::refusals).
    ///
    /// ```no_run
    /// # async fn demo(checker: impl qbus_client::TransactionChecker) -> qbus_client::Result<()> {
    /// let cluster = qbus_client::Broker::connect("tracker://10.0.0.1:16666").await?;
    /// cluster.register_checker("billing", checker).await?;
    /// # Ok(()) }
    /// ```
    pub async fn register_checker(
        &self,
        group: &str,
        checker: impl crate::TransactionChecker,
    ) -> Result<crate::ha::CheckerStatus> {
        self.transport.register_checker(group, checker).await
    }

    /// The broker's open transactions (and commits not yet applied), oldest first, each
    /// with its broker's address. Over `tracker://`, those of every live broker of the
    /// topology (each broker's oldest first); fails naming the broker when one of them
    /// cannot be asked.
    pub async fn transactions(&self) -> Result<Vec<crate::BrokerTx>> {
        self.transport.transactions().await
    }

    /// The table of MQ-RPC callers awaiting a reply on the broker holding `mq` (over an HA
    /// handle, one of them): how many wait now, the limits, and what became of past ones.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qbus_client::ClientError> {
    /// let broker = qbus_client::Broker::connect("127.0.0.1:15555").await?;
    /// let stats = broker.route_stats("greeter-rpc").await?;
    /// println!("{} of {} reply routes in use", stats.pending, stats.capacity);
    /// # Ok(()) }
    /// ```
    pub async fn route_stats(&self, mq: &str) -> Result<RouteStats> {
        let frame = Frame::new(Header::request(Command::QueryRoutes, Some(mq)));
        let reply = self.transport.send_request(mq, frame).await?.await?;
        decode_reply(&reply.body)
    }
}

/// The scheme of single-broker addresses spoken over TLS.
pub const TLS_SCHEME: &str = "tls://";

fn is_tracker_address(addr: &str) -> bool {
    addr.starts_with(TRACKER_SCHEME) || addr.starts_with(TRACKER_TLS_SCHEME)
}

/// The client TLS settings of the environment, for `addr`'s TLS scheme: the CA file in
/// `QBUS_CA`, the client certificate in `QBUS_CLIENT_CERT` and `QBUS_CLIENT_KEY`.
async fn tls_from_env(addr: &str) -> Result<ClientTls> {
    let var = |name: &str| std::env::var_os(name).map(std::path::PathBuf::from);
    let Some(ca) = var("QBUS_CA") else {
        return Err(ClientError::Address {
            addr: addr.to_owned(),
            reason: "TLS needs the CA that signed the server's certificate: set QBUS_CA to \
                     its PEM file, or give it with Broker::connect_tls or HaOptions::with_tls"
                .into(),
        });
    };
    let client = var("QBUS_CLIENT_CERT").zip(var("QBUS_CLIENT_KEY"));
    // Reading the files blocks: not on a reactor thread.
    tokio::task::spawn_blocking(move || {
        let client = client.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        ClientTls::from_pem_files(&ca, client)
    })
    .await
    .map_err(|e| ClientError::Protocol(format!("loading the TLS files failed: {e}")))?
    .map_err(ClientError::from)
}

/// Takes the credentials (`user:password@` or `:token@`) off the front of an address
/// (after its scheme), returning them and the address without them. The last `@` ends
/// them, so a password may hold `@` or `:`; a user name cannot hold `:`.
pub(crate) fn split_credentials(addr: &str) -> (Option<Credentials>, String) {
    let (scheme, rest) = match addr.split_once("://") {
        Some((scheme, rest)) => (&addr[..scheme.len() + 3], rest),
        None => ("", addr),
    };
    let Some((userinfo, hosts)) = rest.rsplit_once('@') else {
        return (None, addr.to_owned());
    };
    let credentials = match userinfo.split_once(':') {
        Some(("", token)) => Credentials::token(token),
        Some((user, password)) => Credentials::password(user, password),
        None => Credentials::password(userinfo, ""),
    };
    (Some(credentials), format!("{scheme}{hosts}"))
}

/// Checks an address string and returns the `host:port` to dial, and whether it is a
/// `tls://` address.
fn parse_address(addr: &str) -> Result<(String, bool)> {
    let bad = |reason: &str| ClientError::Address {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let (target, tls) = match addr.strip_prefix(TLS_SCHEME) {
        Some(target) => (target, true),
        None => (
            addr.strip_prefix("tcp://")
                .or_else(|| addr.strip_prefix("qbus://"))
                .unwrap_or(addr),
            false,
        ),
    };
    if target.contains("://") {
        return Err(bad(
            "expected host:port, tcp://host:port, qbus://host:port, tls://host:port or \
             tracker[+tls]://host:port[,host:port...]",
        ));
    }
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| bad("missing :port"))?;
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    port.parse::<u16>()
        .map_err(|_| bad("port must be a number from 1 to 65535"))?;
    Ok((target.to_owned(), tls))
}

#[cfg(test)]
mod tests {
    use super::{parse_address, split_credentials};
    use crate::protocol::Credentials;

    #[test]
    fn credentials_in_addresses() {
        assert_eq!(
            split_credentials("qbus://alice:p@ss:w@10.0.0.7:15555"),
            (
                Some(Credentials::password("alice", "p@ss:w")),
                "qbus://10.0.0.7:15555".to_owned()
            )
        );
        assert_eq!(
            split_credentials("tracker://:qbus_1@a:1,b:2"),
            (
                Some(Credentials::token("qbus_1")),
                "tracker://a:1,b:2".to_owned()
            )
        );
        assert_eq!(split_credentials("a:1"), (None, "a:1".to_owned()));
    }

    #[test]
    fn addresses() {
        let plain = |addr: &str| (addr.to_owned(), false);
        assert_eq!(
            parse_address("127.0.0.1:15555").unwrap(),
            plain("127.0.0.1:15555")
        );
        assert_eq!(
            parse_address("tcp://localhost:1").unwrap(),
            plain("localhost:1")
        );
        assert_eq!(
            parse_address("tls://localhost:1").unwrap(),
            ("localhost:1".to_owned(), true)
        );
        for bad in [
            "localhost",
            ":15555",
            "host:port",
            "host:99999",
            "http://x:1",
            "tls://tcp://x:1",
        ] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }
}
