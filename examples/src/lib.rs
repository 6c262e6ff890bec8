//! Runnable examples live in `examples/`; code two of them share lives here.
//!
//! - [`greeter`]: the `Greeter` RPC service of the `rpc_server` and `rpc_client` examples.

pub mod greeter;
