//! The client side of a module: typed or dynamic calls over any invoker. The proxies that
//! `#[service]` generates (`GreeterClient`) are thin wrappers around an [`RpcClient`].

use std::borrow::Cow;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::client::invoker::{Call, InvokeFuture, Invoker};
use crate::codec::Encoding;
use crate::envelope::{ErrorCode, RequestOut, ResponseIn, DEFAULT_TIMEOUT};
use crate::error::RpcError;

/// How calls are made; every field has a default and a builder method on the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallOptions {
    /// The deadline of each call, sent with it; the server stops work past it. Default 10 s.
    pub timeout: Duration,
    /// The encoding of requests (and so of replies). Default [`Encoding::MsgPack`].
    pub encoding: Encoding,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            timeout: DEFAULT_TIMEOUT,
            encoding: Encoding::MsgPack,
        }
    }
}

/// Calls the methods of one module through an invoker. Cheap to clone; clones share the
/// invoker. Use it directly to call a service without its trait (a dynamic call), or
/// through a generated proxy.
///
/// ```
/// # async fn demo() -> Result<(), qbus_rpc::RpcError> {
/// use std::time::Duration;
/// use qbus_rpc::{RpcClient, RpcProcessor};
///
/// let mut processor = RpcProcessor::new();
/// processor
///     .module("math")
///     .method("add", |(a, b): (i64, i64)| async move { a + b });
///
/// // An RpcProcessor is itself an invoker (calls stay in this process); any other works
/// // the same way.
/// let math = RpcClient::new(processor, "math").timeout(Duration::from_secs(1));
/// let sum: i64 = math.call("add", &(2, 3)).await?;
/// assert_eq!(sum, 5);
/// let any: serde_json::Value = math.call("add", &serde_json::json!([4, 5])).await?;
/// assert_eq!(any, serde_json::json!(9));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RpcClient {
    invoker: Arc<dyn Invoker>,
    module: Arc<str>,
    options: CallOptions,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("module", &self.module)
            .field("options", &self.options)
            .finish()
    }
}

impl RpcClient {
    /// A client of `module` calling through `invoker`, with default options.
    pub fn new(invoker: impl Invoker, module: &str) -> RpcClient {
        RpcClient::from_shared(Arc::new(invoker), module)
    }

    /// A client of `module` over an invoker already shared.
    pub fn from_shared(invoker: Arc<dyn Invoker>, module: &str) -> RpcClient {
        RpcClient {
            invoker,
            module: module.into(),
            options: CallOptions::default(),
        }
    }

    /// The module called.
    pub fn module(&self) -> &str {
        &self.module
    }

    /// The invoker calls go through.
    pub fn invoker(&self) -> &Arc<dyn Invoker> {
        &self.invoker
    }

    /// The options in force.
    pub fn options(&self) -> CallOptions {
        self.options
    }

    /// This client with `options`.
    pub fn with_options(mut self, options: CallOptions) -> RpcClient {
        self.options = options;
        self
    }

    /// This client with another deadline for each call (default 10 s):
    /// `client.clone().timeout(Duration::from_millis(200)).call(...)` for one call.
    pub fn timeout(mut self, timeout: Duration) -> RpcClient {
        self.options.timeout = timeout;
        self
    }

    /// This client sending requests in `encoding` (default MessagePack).
    pub fn encoding(mut self, encoding: Encoding) -> RpcClient {
        self.options.encoding = encoding;
        self
    }

    /// Calls `method` with `params`, a tuple (or array) of its arguments in order, and
    /// decodes its result as `R` (`serde_json::Value` takes any result). The params are
    /// encoded before this returns, so the future borrows nothing and can be spawned.
    pub fn call<P, R>(&self, method: impl Into<Cow<'static, str>>, params: &P) -> CallFuture<R>
    where
        P: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let method = method.into();
        let request = RequestOut {
            module: &self.module,
            method: &method,
            params,
            timeout_ms: u64::try_from(self.options.timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let encoding = self.options.encoding;
        let sent = match encoding.encode(&request) {
            Ok(body) => Ok(self.invoker.invoke(Call {
                module: self.module.clone(),
                body: body.into(),
                encoding,
                timeout: self.options.timeout,
            })),
            Err(e) => Err(RpcError::Codec(format!(
                "cannot encode the params of {}.{method}: {e}",
                self.module
            ))),
        };
        CallFuture {
            span: tracing::debug_span!("rpc_call", module = %self.module, %method),
            sent: Some(sent),
            timeout: self.options.timeout,
            module: self.module.clone(),
            method,
            result: PhantomData,
        }
    }
}

/// The reply to one call, decoded as `R`; `.await` it. Dropping it abandons the call.
#[must_use = "a call does nothing unless awaited"]
pub struct CallFuture<R> {
    span: tracing::Span,
    /// The invoker's future, or why the call could not be sent; `None` once resolved.
    sent: Option<Result<InvokeFuture, RpcError>>,
    timeout: Duration,
    module: Arc<str>,
    method: Cow<'static, str>,
    result: PhantomData<fn() -> R>,
}

impl<R> std::fmt::Debug for CallFuture<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallFuture")
            .field("module", &self.module)
            .field("method", &self.method)
            .finish()
    }
}

impl<R: DeserializeOwned> Future for CallFuture<R> {
    type Output = Result<R, RpcError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let _entered = this.span.enter();
        let reply = match this.sent.take() {
            None => {
                return Poll::Ready(Err(RpcError::Codec("call polled after it finished".into())))
            }
            Some(Err(e)) => return Poll::Ready(Err(e)),
            Some(Ok(mut invoked)) => match invoked.as_mut().poll(cx) {
                Poll::Pending => {
                    this.sent = Some(Ok(invoked));
                    return Poll::Pending;
                }
                Poll::Ready(reply) => reply,
            },
        };
        Poll::Ready(reply.and_then(
            |reply| match reply.encoding.decode::<ResponseIn<R>>(&reply.body) {
                Ok(ResponseIn::Result(value)) => Ok(value),
                // The server's deadline is the caller's, so whichever notices first, the
                // caller sees the same error.
                Ok(ResponseIn::Error(error)) if error.code == ErrorCode::DeadlineExceeded => {
                    Err(RpcError::Timeout(this.timeout))
                }
                Ok(ResponseIn::Error(error)) => Err(RpcError::Remote(error)),
                Err(e) => Err(RpcError::Codec(format!(
                    "cannot decode the reply of {}.{} as {}: {e}",
                    this.module,
                    this.method,
                    std::any::type_name::<R>()
                ))),
            },
        ))
    }
}
