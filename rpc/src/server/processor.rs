//! The dispatch table: an [`RpcProcessor`] maps module + method to a handler and runs calls
//! against it, enforcing each call's deadline. The [`RpcServer`](crate::RpcServer) (DirectRPC)
//! and the [`MqRpcService`](crate::MqRpcService) (MQ-RPC) both hand it what they receive.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::client::invoker::{Call, InvokeFuture, Invoker, Reply};
use crate::client::rpc_client::{CallFuture, RpcClient};
use crate::codec::Encoding;
use crate::envelope::{
    error_body, read_head, read_params, ErrorCode, RemoteError, ResponseOut, DEFAULT_TIMEOUT,
};
use crate::error::RpcError;

/// How long calls running at shutdown may take to finish before they are stopped, on
/// either door.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What a handler resolves to: the encoded response envelope, or a framework error.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Bytes, RemoteError>> + Send>>;

/// A type-erased method: takes the call, returns its encoded response.
type Handler = Arc<dyn Fn(Request) -> HandlerFuture + Send + Sync>;

/// A call as a handler sees it: the request envelope and its encoding.
#[derive(Debug, Clone)]
pub struct Request {
    encoding: Encoding,
    body: Bytes,
    /// Where the params lie in `body`, when the head was scanned rather than decoded.
    params: Option<Range<usize>>,
}

impl Request {
    /// How the request (and so the response) is encoded.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The call's params as `P` (a tuple of the arguments); a `400` error when they do not
    /// fit.
    pub fn params<P: DeserializeOwned>(&self) -> Result<P, RemoteError> {
        read_params(self.encoding, &self.body, self.params.as_ref()).map_err(|e| {
            RemoteError::new(
                ErrorCode::BadRequest,
                format!(
                    "the params do not fit the method: expected {}",
                    std::any::type_name::<P>()
                ),
            )
            .with_detail(e)
        })
    }

    /// Encodes `value` as the call's successful response.
    pub fn respond<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, RemoteError> {
        self.encoding
            .encode(&ResponseOut::Result(value))
            .map(Bytes::from)
            .map_err(|e| {
                RemoteError::new(
                    ErrorCode::Internal,
                    format!("the result cannot be encoded as {}", self.encoding),
                )
                .with_detail(e)
            })
    }
}

/// The methods of one module.
#[derive(Clone, Default)]
pub struct Module {
    methods: HashMap<String, Handler>,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("methods", &self.method_names())
            .finish()
    }
}

impl Module {
    /// Adds (or replaces) method `name`: `handler` takes the decoded params, a tuple of
    /// the arguments such as `(String,)` or `(i64, i64)` (`[(); 0]` for none), and its
    /// future's output is the result sent back.
    ///
    /// ```
    /// let mut processor = qbus_rpc::RpcProcessor::new();
    /// processor
    ///     .module("math")
    ///     .method("add", |(a, b): (i64, i64)| async move { a + b })
    ///     .method("pi", |_: [(); 0]| async { std::f64::consts::PI });
    /// assert_eq!(processor.methods("math").unwrap(), ["add", "pi"]);
    /// ```
    pub fn method<P, R, F, Fut>(&mut self, name: &str, handler: F) -> &mut Module
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |request: Request| -> HandlerFuture {
            match request.params::<P>() {
                Ok(params) => {
                    let running = handler(params);
                    Box::pin(async move { request.respond(&running.await) })
                }
                Err(e) => Box::pin(std::future::ready(Err(e))),
            }
        });
        self.methods.insert(name.to_owned(), handler);
        self
    }

    /// The method names, sorted.
    pub fn method_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.methods.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

/// A service implementation that installs its methods in a module in one call; the
/// `GreeterServer` types that `#[service]` generates implement it.
pub trait Service: Send + Sync + 'static {
    /// The module name callers use.
    fn name(&self) -> &str;

    /// Adds every method to `module`.
    fn install(self, module: &mut Module);
}

/// Module + method → handler, for several modules. Cheap to clone (clones share the
/// tables; registering on a clone copies them first). Also an [`Invoker`], for calls inside
/// this process.
///
/// ```
/// # async fn demo() -> Result<(), qbus_rpc::RpcError> {
/// use qbus_rpc::{RpcClient, RpcProcessor};
///
/// let mut processor = RpcProcessor::new();
/// processor
///     .module("Greeter")
///     .method("hello", |(name,): (String,)| async move { format!("Hello, {name}!") });
/// processor.module("Clock").method("now_ms", |_: [(); 0]| async { 1_700_000_000_000u64 });
/// assert_eq!(processor.modules(), ["Clock", "Greeter"]);
///
/// // The dynamic call of a caller that has no trait, here in-process:
/// let reply: String = RpcClient::new(processor, "Greeter").call("hello", &("you",)).await?;
/// assert_eq!(reply, "Hello, you!");
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct RpcProcessor {
    modules: Arc<HashMap<String, Module>>,
}

impl std::fmt::Debug for RpcProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.modules.iter()).finish()
    }
}

impl RpcProcessor {
    /// A processor with no modules.
    pub fn new() -> RpcProcessor {
        RpcProcessor::default()
    }

    /// The module `name`, created empty if new, to add methods to.
    pub fn module(&mut self, name: &str) -> &mut Module {
        Arc::make_mut(&mut self.modules)
            .entry(name.to_owned())
            .or_default()
    }

    /// Installs a service's methods under its name:
    /// `processor.add(GreeterServer::new(implementation))` for a `#[service]` trait (see the
    /// [crate example](crate)).
    pub fn add(&mut self, service: impl Service) -> &mut RpcProcessor {
        let name = service.name().to_owned();
        service.install(self.module(&name));
        self
    }

    /// The module names, sorted.
    pub fn modules(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.modules.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The methods of `module`, sorted; `None` when there is no such module.
    pub fn methods(&self, module: &str) -> Option<Vec<&str>> {
        self.modules.get(module).map(Module::method_names)
    }

    /// Calls `module.method` in this process, without a trait: `params` is a tuple (or
    /// array) of the arguments, `R` the result type (`serde_json::Value` takes any). The
    /// call goes through the same envelope, deadline and errors as a remote one; for a
    /// remote server, [`RpcClient`] does the same over any invoker.
    ///
    /// ```
    /// # async fn demo() -> Result<(), qbus_rpc::RpcError> {
    /// let mut processor = qbus_rpc::RpcProcessor::new();
    /// processor.module("math").method("neg", |(n,): (i64,)| async move { -n });
    /// let n: i64 = processor.invoke("math", "neg", &(7,)).await?;
    /// assert_eq!(n, -7);
    /// # Ok(()) }
    /// ```
    pub fn invoke<P, R>(&self, module: &str, method: &str, params: &P) -> CallFuture<R>
    where
        P: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        RpcClient::new(self.clone(), module).call(method.to_owned(), params)
    }

    /// Runs one call: `encoding` is the header's (or record tag's) encoding name, `body` the
    /// request envelope, `waited` how long the call already waited before it got here (an
    /// MQ-RPC request's time in its MQ). Always produces a reply, an error reply when the
    /// call cannot be decoded, routed or finished, except `None` when the call had waited
    /// past its deadline before it started: its caller has stopped waiting.
    pub async fn dispatch(
        &self,
        encoding: Option<&str>,
        body: Bytes,
        waited: Duration,
    ) -> Option<Reply> {
        match self.start(encoding, body, waited) {
            Started::Done(reply) => Some(reply),
            Started::Expired => None,
            Started::Running(running) => Some(running.finish().await),
        }
    }

    /// Begins one call (see [`dispatch`](RpcProcessor::dispatch)) and runs its handler as far
    /// as it goes without waiting: most calls finish right here, and only a handler that
    /// waits on something comes back as [`Started::Running`], for the caller to finish on a
    /// task of its own. A server thus spawns a task only for the calls that need one.
    pub fn start(&self, encoding: Option<&str>, body: Bytes, waited: Duration) -> Started {
        let encoding = match Encoding::from_header(encoding) {
            Ok(encoding) => encoding,
            Err(e) => {
                let error = RemoteError::new(ErrorCode::UnsupportedEncoding, e.to_string());
                return Started::Done(error_reply(Encoding::MsgPack, &error));
            }
        };
        let (head, params) = match read_head(encoding, &body) {
            Ok(read) => read,
            Err(e) => {
                let error = RemoteError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "the request is not a {encoding} request envelope \
                         {{module, method, params, timeout_ms}}"
                    ),
                )
                .with_detail(e);
                return Started::Done(error_reply(encoding, &error));
            }
        };
        let timeout = head
            .timeout_ms
            .map_or(DEFAULT_TIMEOUT, Duration::from_millis);
        if !waited.is_zero() && waited >= timeout {
            tracing::debug!(module = %head.module, method = %head.method, ?waited, ?timeout, "call expired before it started");
            return Started::Expired;
        }
        let handler = match self.handler(&head.module, &head.method) {
            Ok(handler) => handler,
            Err(error) => return Started::Done(error_reply(encoding, &error)),
        };
        let request = Request {
            encoding,
            body: body.clone(),
            params,
        };
        // A handler that panics, even before its first await, fails its call only.
        let first = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut future = handler(request);
            let mut cx = Context::from_waker(Waker::noop());
            match future.as_mut().poll(&mut cx) {
                Poll::Ready(outcome) => Ok(outcome),
                Poll::Pending => Err(future),
            }
        }));
        let name = || format!("{}.{}", head.module, head.method);
        match first {
            Ok(Ok(outcome)) => Started::Done(reply(outcome, encoding, name)),
            Ok(Err(future)) => Started::Running(Running {
                future,
                encoding,
                timeout,
                left: timeout - waited,
                name: name(),
            }),
            Err(panic) => Started::Done(reply(Err(panicked(&panic, &name())), encoding, name)),
        }
    }

    fn handler(&self, module: &str, method: &str) -> Result<Handler, RemoteError> {
        // zbus callers name no module by default: a server with one module knows which.
        let only = (module.is_empty() && self.modules.len() == 1)
            .then(|| self.modules.values().next())
            .flatten();
        let Some(methods) = only.or_else(|| self.modules.get(module)) else {
            return Err(RemoteError::new(
                ErrorCode::NotFound,
                format!("no module {module:?} here"),
            )
            .with_detail(format!("modules: {}", self.modules().join(", "))));
        };
        methods.methods.get(method).cloned().ok_or_else(|| {
            RemoteError::new(
                ErrorCode::NotFound,
                format!("module {module:?} has no method {method:?}"),
            )
            .with_detail(format!("methods: {}", methods.method_names().join(", ")))
        })
    }
}

/// A call begun by [`RpcProcessor::start`].
#[derive(Debug)]
pub enum Started {
    /// The reply, ready now.
    Done(Reply),
    /// The call had waited past its deadline before it started (only calls that waited, as
    /// MQ-RPC calls do, can): its caller has stopped waiting, so nothing is sent.
    Expired,
    /// The handler waits on something; [`finish`](Running::finish) it.
    Running(Running),
}

/// A call whose handler is waiting on something.
pub struct Running {
    future: HandlerFuture,
    encoding: Encoding,
    timeout: Duration,
    /// What is left of the deadline.
    left: Duration,
    /// `Module.method`, for messages.
    name: String,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("call", &self.name).finish()
    }
}

impl Running {
    /// Runs the handler to its end or its deadline, whichever comes first (a handler past
    /// its deadline is dropped: the server stops work no one waits for).
    pub async fn finish(self) -> Reply {
        let Running {
            future,
            encoding,
            timeout,
            left,
            name,
        } = self;
        let outcome = match tokio::time::timeout(left, AssertUnwindSafe(future).catch_unwind()).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(panic)) => Err(panicked(&panic, &name)),
            Err(_) => Err(RemoteError::new(
                ErrorCode::DeadlineExceeded,
                format!("the call did not finish within its deadline of {timeout:?}; the server stopped it"),
            )),
        };
        reply(outcome, encoding, || name.clone())
    }
}

/// The error of a handler that panicked with `panic`.
fn panicked(panic: &Box<dyn std::any::Any + Send>, name: &str) -> RemoteError {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".into());
    tracing::error!(call = %name, panic = %what, "handler panicked");
    RemoteError::new(ErrorCode::Internal, "the handler panicked").with_detail(what)
}

/// The reply for a handler's outcome; error messages are prefixed with `Module.method`.
fn reply(
    outcome: Result<Bytes, RemoteError>,
    encoding: Encoding,
    name: impl FnOnce() -> String,
) -> Reply {
    match outcome {
        Ok(body) => Reply { body, encoding },
        Err(mut error) => {
            error.message = format!("{}: {}", name(), error.message);
            error_reply(encoding, &error)
        }
    }
}

fn error_reply(encoding: Encoding, error: &RemoteError) -> Reply {
    Reply {
        body: error_body(encoding, error).into(),
        encoding,
    }
}

impl Invoker for RpcProcessor {
    fn invoke(&self, call: Call) -> InvokeFuture {
        let processor = self.clone();
        Box::pin(async move {
            let encoding = call.encoding.header_value();
            processor
                .dispatch(encoding.as_deref(), call.body, Duration::ZERO)
                .await
                .ok_or(RpcError::Timeout(call.timeout))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn processor() -> RpcProcessor {
        let mut processor = RpcProcessor::new();
        processor
            .module("m")
            .method("echo", |(text,): (String,)| async move { text })
            .method("boom", |_: [(); 0]| async {
                panic!("kaboom");
                #[allow(unreachable_code)]
                ()
            })
            .method("slow", |_: [(); 0]| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            });
        processor
    }

    fn code(e: RpcError) -> ErrorCode {
        e.code()
            .unwrap_or_else(|| panic!("not a remote error: {e}"))
    }

    #[tokio::test]
    async fn an_empty_module_names_the_only_one() {
        let echoed: String = RpcClient::new(processor(), "")
            .call("echo", &("hi",))
            .await
            .unwrap();
        assert_eq!(echoed, "hi");
        let mut two = processor();
        two.module("other").method("echo", |_: [(); 0]| async {});
        let e = RpcClient::new(two, "").call::<_, String>("echo", &("a",));
        assert_eq!(code(e.await.unwrap_err()), ErrorCode::NotFound);
    }

    #[tokio::test]
    async fn calls_and_framework_errors() {
        let client = RpcClient::new(processor(), "m");
        let echoed: String = client.call("echo", &("hi",)).await.unwrap();
        assert_eq!(echoed, "hi");
        let e = client.call::<_, String>("nope", &()).await.unwrap_err();
        assert_eq!(code(e.clone()), ErrorCode::NotFound);
        assert!(e.to_string().contains("boom, echo, slow"), "{e}");
        let e = client.call::<_, String>("echo", &(5,)).await.unwrap_err();
        assert_eq!(code(e.clone()), ErrorCode::BadRequest);
        assert!(e.to_string().contains("m.echo"), "{e}");
        let e = RpcClient::new(processor(), "x").call::<_, String>("echo", &("a",));
        assert_eq!(code(e.await.unwrap_err()), ErrorCode::NotFound);
        let e = client.call::<_, ()>("boom", &[(); 0]).await.unwrap_err();
        assert_eq!(code(e.clone()), ErrorCode::Internal);
        assert!(e.to_string().contains("kaboom"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_stops_the_handler() {
        let client = RpcClient::new(processor(), "m").timeout(Duration::from_millis(250));
        let started = tokio::time::Instant::now();
        // The processor answers 504 at the deadline; the client reports the caller's timeout.
        let e = client.call::<_, ()>("slow", &[(); 0]).await.unwrap_err();
        assert!(
            matches!(e, RpcError::Timeout(t) if t == Duration::from_millis(250)),
            "{e}"
        );
        assert_eq!(started.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test]
    async fn undecodable_requests_get_error_replies() {
        let processor = processor();
        for (encoding, body) in [
            (None, &b"\xc1garbage"[..]),
            (Some("json"), &b"{not json"[..]),
            (Some("json"), &br#"{"module":"m"}"#[..]),
        ] {
            let reply = processor
                .dispatch(encoding, Bytes::from_static(body), Duration::ZERO)
                .await
                .unwrap();
            let error: crate::envelope::ResponseIn<()> =
                reply.encoding.decode(&reply.body).unwrap();
            assert!(
                matches!(error, crate::envelope::ResponseIn::Error(e) if e.code == ErrorCode::BadRequest)
            );
        }
        let reply = processor
            .dispatch(Some("xml"), Bytes::from_static(b"<a/>"), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(reply.encoding, Encoding::MsgPack);
        let error: crate::envelope::ResponseIn<()> = reply.encoding.decode(&reply.body).unwrap();
        assert!(
            matches!(error, crate::envelope::ResponseIn::Error(e) if e.code == ErrorCode::UnsupportedEncoding)
        );
    }

    #[tokio::test]
    async fn every_msgpack_envelope_form_runs_as_before() {
        // {"method": "echo", "params": ["x"], "timeout_ms": T}: with T a positive fixint the
        // head is scanned and the params decoded from their range; a signed 100 (which
        // rmp-serde accepts) goes through serde.
        let map = |timeout: &[u8]| {
            let mut body = b"\x83\xa6method\xa4echo\xa6params\x91\xa1x\xaatimeout_ms".to_vec();
            body.extend_from_slice(timeout);
            body
        };
        let processor = processor();
        for body in [map(&[0x64]), map(&[0xd0, 0x64])] {
            let reply = processor
                .dispatch(None, body.into(), Duration::ZERO)
                .await
                .unwrap();
            let echoed: crate::envelope::ResponseIn<String> =
                reply.encoding.decode(&reply.body).unwrap();
            assert!(
                matches!(echoed, crate::envelope::ResponseIn::Result(ref s) if s == "x"),
                "{echoed:?}"
            );
        }
        // A field given twice is refused, as serde refuses it.
        let twice = b"\x83\xa6method\xa4echo\xa6method\xa4echo\xa6params\x91\xa1x".to_vec();
        let reply = processor
            .dispatch(None, twice.into(), Duration::ZERO)
            .await
            .unwrap();
        let error: crate::envelope::ResponseIn<()> = reply.encoding.decode(&reply.body).unwrap();
        assert!(
            matches!(error, crate::envelope::ResponseIn::Error(e) if e.code == ErrorCode::BadRequest)
        );
    }

    #[tokio::test]
    async fn a_call_that_waited_past_its_deadline_is_skipped() {
        let body = Encoding::Json
            .encode(&serde_json::json!({"module": "m", "method": "echo", "params": ["x"], "timeout_ms": 100}))
            .unwrap();
        let processor = processor();
        let late = processor
            .dispatch(
                Some("json"),
                body.clone().into(),
                Duration::from_millis(150),
            )
            .await;
        assert!(late.is_none());
        let reply = processor
            .dispatch(Some("json"), body.into(), Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(&reply.body[..], br#"{"result":"x"}"#);
    }
}
