//! DirectRPC, the client side: calls go straight to one [`RpcServer`](crate::RpcServer)
//! over one multiplexed connection (the SDK's, with its reconnects and heartbeats).

use qbus_client::link::TcpConnector;
use qbus_client::protocol::DEFAULT_MAX_FRAME;
use qbus_client::tls::ClientTls;
use qbus_client::{Connection, ConnectionOptions};

use crate::client::invoker::{exchange, Call, InvokeFuture, Invoker};
use crate::error::RpcError;

/// Calls an [`RpcServer`](crate::RpcServer) at one address. Cheap to clone; clones share
/// the connection, which carries any number of calls at once and reconnects when needed.
///
/// ```no_run
/// # async fn demo() -> Result<(), qbus_rpc::RpcError> {
/// use qbus_rpc::{DirectInvoker, RpcClient};
/// let invoker = DirectInvoker::connect("127.0.0.1:18000").await?;
/// let greeting: String = RpcClient::new(invoker, "Greeter").call("hello", &("you",)).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DirectInvoker {
    connection: Connection,
}

impl DirectInvoker {
    /// An invoker for the server at `addr` (`host:port`) with default connection options;
    /// it connects on the first call.
    pub fn new(addr: &str) -> DirectInvoker {
        DirectInvoker::with_options(addr, ConnectionOptions::default())
    }

    /// An invoker for `addr` with explicit connection options. The connect timeout bounds
    /// each connection attempt; a call's own deadline bounds the whole call.
    pub fn with_options(addr: &str, options: ConnectionOptions) -> DirectInvoker {
        DirectInvoker::with_tls(addr, options, None)
    }

    /// An invoker for `addr` with explicit connection options, over TLS with `tls`: the
    /// server's certificate must chain to its roots and name `addr`'s host.
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), qbus_client::tls::TlsError> {
    /// use std::path::Path;
    /// use qbus_client::tls::ClientTls;
    /// use qbus_rpc::DirectInvoker;
    /// let tls = ClientTls::from_pem_files(Path::new("ca.pem"), None)?;
    /// let invoker = DirectInvoker::with_tls("127.0.0.1:18000", Default::default(), Some(tls));
    /// # drop(invoker); Ok(()) }
    /// ```
    pub fn with_tls(
        addr: &str,
        options: ConnectionOptions,
        tls: Option<ClientTls>,
    ) -> DirectInvoker {
        let connector = TcpConnector::new(addr, DEFAULT_MAX_FRAME).with_tls(tls);
        DirectInvoker {
            connection: Connection::new(connector, options),
        }
    }

    /// Connects to `addr` now, so a server that is not there is reported here.
    pub async fn connect(addr: &str) -> Result<DirectInvoker, RpcError> {
        let invoker = DirectInvoker::new(addr);
        invoker
            .connection
            .ensure_connected()
            .await
            .map_err(|e| RpcError::from_client(e, addr))?;
        Ok(invoker)
    }

    /// The server's address.
    pub fn addr(&self) -> String {
        self.connection.addr()
    }

    /// True while connected.
    pub fn is_connected(&self) -> bool {
        self.connection.is_connected()
    }
}

impl Invoker for DirectInvoker {
    fn invoke(&self, call: Call) -> InvokeFuture {
        let connection = self.connection.clone();
        // The frame is built inside the send so the future holds it once.
        Box::pin(async move {
            let encoding = call.encoding.header_value();
            let send = || connection.send_call(call.body.clone(), encoding, call.timeout);
            exchange(send, call.timeout, || connection.addr()).await
        })
    }
}
