//! The `Greeter` service that the `rpc_server` example serves and the `rpc_client` example
//! calls. Both sides share this trait: the server implements it, the client uses the
//! `GreeterClient` proxy that `#[service]` generates from it.

use serde::{Deserialize, Serialize};

/// Why `strict_hello` refuses a name: the application's own error, which travels inside
/// the method's `Result` and arrives typed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GreetError {
    /// The name was empty.
    EmptyName,
    /// The server does not greet this name.
    Refused {
        /// The name refused.
        name: String,
    },
}

/// Greets people.
#[qbus_rpc::service]
pub trait Greeter {
    /// A friendly greeting for anyone.
    async fn hello(&self, name: String) -> String;
    /// A greeting only for names the server accepts.
    async fn strict_hello(&self, name: String) -> Result<String, GreetError>;
}
