//! qbus RPC: call a remote service like a trait method, straight to its server or through a
//! broker queue.
//!
//! - [`service`]: the attribute on a trait of `async fn`s that generates the typed client
//!   proxy (`GreeterClient`) and the server side (`GreeterServer`).
//! - [`client`]: the calling half: [`RpcClient`] (typed and dynamic calls of one module),
//!   the [`Invoker`] trait and its kinds, [`DirectInvoker`] to one [`RpcServer`],
//!   [`MqInvoker`] through a broker MQ, [`HaInvoker`] among the servers at the trackers.
//! - [`server`]: the serving half: [`RpcProcessor`] (module + method → handler, deadlines
//!   enforced), [`RpcServer`] (DirectRPC on its own port, registered at trackers) and
//!   [`MqRpcService`] (serving the calls of an MQ).
//! - [`envelope`]: the request and response bodies and the stable error shape, shared by
//!   both halves; [`codec`]: MessagePack and JSON; [`error`]: [`RpcError`].
//!
//! ```
//! # async fn demo() -> Result<(), qbus_rpc::RpcError> {
//! use qbus_rpc::{service, RpcProcessor};
//!
//! #[derive(Debug, serde::Serialize, serde::Deserialize)]
//! pub enum GreetError {
//!     Empty,
//! }
//!
//! #[service]
//! pub trait Greeter {
//!     /// Greets `name`.
//!     async fn hello(&self, name: String) -> String;
//!     /// Fails for an empty name, with the application's own error.
//!     async fn strict(&self, name: String) -> Result<String, GreetError>;
//! }
//!
//! struct Friendly;
//!
//! impl Greeter for Friendly {
//!     async fn hello(&self, name: String) -> String {
//!         format!("Hello, {name}!")
//!     }
//!
//!     async fn strict(&self, name: String) -> Result<String, GreetError> {
//!         if name.is_empty() { Err(GreetError::Empty) } else { Ok(name) }
//!     }
//! }
//!
//! let mut processor = RpcProcessor::new();
//! processor.add(GreeterServer::new(Friendly));
//!
//! // Any invoker works: DirectInvoker, MqInvoker, HaInvoker, or the processor itself.
//! let greeter = GreeterClient::new(processor);
//! assert_eq!(greeter.hello("you".into()).await?, "Hello, you!");
//! assert!(matches!(greeter.strict(String::new()).await?, Err(GreetError::Empty)));
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod client;
pub mod codec;
pub mod envelope;
pub mod error;
pub mod server;

pub use client::direct::DirectInvoker;
pub use client::ha::HaInvoker;
pub use client::invoker::{Call, InvokeFuture, Invoker, Reply};
pub use client::mq::MqInvoker;
pub use client::rpc_client::{CallFuture, CallOptions, RpcClient};
pub use codec::{Encoding, UnknownEncoding};
pub use envelope::{ErrorCode, RemoteError, DEFAULT_TIMEOUT};
pub use error::RpcError;
/// Turns a trait of `async fn`s into an RPC service; see the [crate example](crate).
///
/// `#[service]` (or `#[service(name = "greeter")]` to choose the module name, by default
/// the trait's) on `trait Greeter` generates:
///
/// - the trait itself, each `async fn` rewritten to return `impl Future + Send` so the
///   server can run calls on any thread (implement it with plain `async fn`s);
/// - `GreeterClient`, the proxy: `GreeterClient::new(invoker)`, one method per trait
///   method returning `Result<T, RpcError>`, and `timeout`/`encoding`/`with_options` for
///   per-call settings;
/// - `GreeterServer<T>`, which installs an implementation in an [`RpcProcessor`] with
///   `processor.add(GreeterServer::new(implementation))`.
///
/// Methods take `&self` and owned arguments that are `Serialize + DeserializeOwned`; they
/// return such a value (or nothing). Anything else is refused with a compile error that
/// points at it.
pub use qbus_rpc_macros::service;
pub use server::direct::{RpcServer, RpcServerError, RpcServerOptions};
pub use server::mq::{MqRpcService, MqServiceOptions};
pub use server::processor::{
    HandlerFuture, Module, Request, RpcProcessor, Running, Service, Started,
};

/// Support for the code `#[service]` generates; not a public API.
#[doc(hidden)]
pub mod __private {
    /// What an argument or result of a service method must be.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot travel in an RPC call",
        label = "arguments and results of #[service] methods must be Serialize + DeserializeOwned + Send + 'static",
        note = "derive serde::Serialize and serde::Deserialize for it"
    )]
    pub trait Wire: serde::Serialize + serde::de::DeserializeOwned + Send + 'static {}

    impl<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static> Wire for T {}

    /// Compiles only for types that can travel.
    pub fn assert_wire<T: Wire>() {}
}
