//! qbus client: the wire protocol and the SDK.
pub mod protocol;
