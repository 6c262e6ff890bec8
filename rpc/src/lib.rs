//! qbus RPC: call a remote service like a trait method, straight to its server or through a
//! broker queue.
//!
//! - [`service`]: the attribute on a trait of `async fn`s that generates the typed client
//!   proxy (`GreeterClient`) and the server side (`GreeterServer`).
//! - [`processor`]: [`RpcProcessor`], module + method → handler, deadlines enforced.
//! - [`client`]: [`RpcClient`], typed and dynamic calls of one module over any invoker.
//! - [`invoker`]: the [`Invoker`] trait; [`direct`]: [`DirectInvoker`] to one
//!   [`RpcServer`]; [`mq_invoker`]: [`MqInvoker`] through a broker MQ; [`ha`]:
//!   [`HaInvoker`] among the servers registered at the trackers.
//! - [`server`]: [`RpcServer`], DirectRPC on its own port (with `server_session` serving
//!   one connection and `registration` reporting to trackers).
//! - [`mq_service`]: [`MqRpcService`], serving the calls of an MQ.
//! - [`envelope`]: the request and response bodies and the stable error shape;
//!   [`codec`]: MessagePack and JSON; [`error`]: [`RpcError`].
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

pub mod client;
pub mod codec;
pub mod direct;
pub mod envelope;
pub mod error;
pub mod ha;
pub mod invoker;
pub mod mq_invoker;
pub mod mq_service;
pub mod processor;
mod registration;
pub mod server;
mod server_session;

pub use client::{CallFuture, CallOptions, RpcClient};
pub use codec::{Encoding, UnknownEncoding};
pub use direct::DirectInvoker;
pub use envelope::{ErrorCode, RemoteError, DEFAULT_TIMEOUT};
pub use error::RpcError;
pub use ha::HaInvoker;
pub use invoker::{Call, InvokeFuture, Invoker, Reply};
pub use mq_invoker::{route_stats, MqInvoker};
pub use mq_service::{MqRpcService, MqServiceOptions};
pub use processor::{HandlerFuture, Module, Request, RpcProcessor, Running, Service, Started};
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
pub use server::{RpcServer, RpcServerError, RpcServerOptions};

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
