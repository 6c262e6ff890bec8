//! The invoker: what carries an encoded call to a server and brings its reply back. Clients
//! (generated or dynamic) work over any invoker: [`DirectInvoker`](crate::DirectInvoker),
//! [`MqInvoker`](crate::MqInvoker), [`HaInvoker`](crate::HaInvoker), or an
//! [`RpcProcessor`](crate::RpcProcessor) in this process.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use qbus_client::{CallReply, ClientError, PendingCall, Status};

use crate::codec::Encoding;
use crate::error::RpcError;

/// One call on its way out: an encoded request envelope and how long it may take.
#[derive(Debug, Clone)]
pub struct Call {
    /// The module (service) called; an HA invoker picks a server offering it.
    pub module: Arc<str>,
    /// The request envelope (see [`envelope`](crate::envelope)).
    pub body: Bytes,
    /// How `body` is encoded; the reply comes back the same way.
    pub encoding: Encoding,
    /// The deadline, relative to now.
    pub timeout: Duration,
}

/// The answer to a call: an encoded response envelope.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The response envelope.
    pub body: Bytes,
    /// How `body` is encoded.
    pub encoding: Encoding,
}

/// The future an invoker returns.
pub type InvokeFuture = Pin<Box<dyn Future<Output = Result<Reply, RpcError>> + Send + 'static>>;

/// Carries calls to a server and replies back.
///
/// ```
/// use qbus_rpc::{Call, Invoker, InvokeFuture, Reply, RpcError};
///
/// /// An invoker that refuses everything, to show the shape.
/// struct Nobody;
///
/// impl Invoker for Nobody {
///     fn invoke(&self, call: Call) -> InvokeFuture {
///         Box::pin(async move {
///             Err(RpcError::NoResponders { target: call.module.to_string(), reason: "nobody".into() })
///         })
///     }
/// }
/// ```
pub trait Invoker: Send + Sync + 'static {
    /// Sends `call` and resolves to its reply, within `call.timeout`.
    fn invoke(&self, call: Call) -> InvokeFuture;
}

impl<T: Invoker + ?Sized> Invoker for Arc<T> {
    fn invoke(&self, call: Call) -> InvokeFuture {
        (**self).invoke(call)
    }
}

impl<T: Invoker + ?Sized> Invoker for Box<T> {
    fn invoke(&self, call: Call) -> InvokeFuture {
        (**self).invoke(call)
    }
}

impl Reply {
    /// Reads a call's reply.
    fn from_call(reply: CallReply) -> Result<Reply, RpcError> {
        let encoding = Encoding::from_header(reply.encoding.as_deref())
            .map_err(|e| RpcError::Codec(format!("reply: {e}")))?;
        Ok(Reply {
            body: reply.body,
            encoding,
        })
    }
}

/// Sends with `send` (called once, inside) and waits for the reply, all within `timeout`;
/// `target` names the server or MQ in errors (built only when one occurs). The send future
/// is made here rather than passed in so it is stored once in this future, not twice.
pub(crate) async fn exchange<S, F>(
    send: S,
    timeout: Duration,
    target: impl FnOnce() -> String,
) -> Result<Reply, RpcError>
where
    S: FnOnce() -> F,
    F: Future<Output = Result<PendingCall, ClientError>>,
{
    // One timer for the send and the wait: a timer costs a registration per call.
    let outcome = tokio::time::timeout(timeout, async move { send().await?.await }).await;
    match outcome {
        Err(_) => Err(RpcError::Timeout(timeout)),
        Ok(Ok(reply)) => Reply::from_call(reply),
        Ok(Err(ClientError::Server {
            status: Status::DeadlineExceeded,
            ..
        })) => Err(RpcError::Timeout(timeout)),
        Ok(Err(e)) => Err(RpcError::from_client(e, &target())),
    }
}
