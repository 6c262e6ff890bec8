//! What the requests of one HTTP connection share.

use std::sync::Arc;

use crate::auth::Peer;
use crate::core::Core;

/// The broker and the connection a request came on.
pub struct Context {
    /// Who the connection comes from (address, TLS certificate).
    pub(super) peer: Peer,
    pub(super) core: Arc<Core>,
    /// Deliveries made on this connection are held under this id until acked or timed out.
    pub(super) conn: u64,
    /// The address the client reached, shown on the monitor page.
    pub(super) local: String,
}
