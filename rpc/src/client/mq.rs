//! MQ-RPC, the client side: a call goes to a broker MQ and its reply comes straight back on
//! the same connection, routed by the broker (see `docs/protocol.md`, "RPC commands").

use std::sync::Arc;

use qbus_client::Broker;

use crate::client::invoker::{exchange, Call, InvokeFuture, Invoker};

/// Calls whatever [`MqRpcService`](crate::MqRpcService) consumes an MQ, through any
/// [`Broker`] handle: one broker, brokers found through trackers (the call goes to a broker
/// holding the MQ), or the embedded broker. Cheap to clone.
///
/// A call to an MQ nobody consumes fails at once with
/// [`RpcError::NoResponders`](crate::RpcError::NoResponders).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use qbus_rpc::{MqInvoker, RpcClient};
/// let broker = qbus_client::Broker::connect("127.0.0.1:15555").await?;
/// let invoker = MqInvoker::new(broker, "greeter-rpc");
/// let greeting: String = RpcClient::new(invoker, "Greeter").call("hello", &("you",)).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MqInvoker {
    broker: Broker,
    mq: Arc<str>,
}

impl MqInvoker {
    /// An invoker sending calls to `mq` through `broker`.
    pub fn new(broker: Broker, mq: &str) -> MqInvoker {
        MqInvoker {
            broker,
            mq: mq.into(),
        }
    }

    /// The MQ calls go to.
    pub fn mq(&self) -> &str {
        &self.mq
    }

    /// The broker handle calls go through.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }
}

impl Invoker for MqInvoker {
    fn invoke(&self, call: Call) -> InvokeFuture {
        let (broker, mq) = (self.broker.clone(), self.mq.clone());
        // The frame is built inside the send so the future holds it once.
        Box::pin(async move {
            let encoding = call.encoding.header_value();
            let send = || broker.send_call(&mq, call.body.clone(), encoding, call.timeout);
            exchange(send, call.timeout, || format!("MQ {mq:?}")).await
        })
    }
}
