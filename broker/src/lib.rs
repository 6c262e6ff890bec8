//! qbus broker.
pub mod store;
