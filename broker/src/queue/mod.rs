//! The queue engine: every MQ of the store directory, how records are handed out and
//! acknowledged, and the thread that makes it durable.
//!
//! - [`registry`]: the MQ table: opening the store, creating and removing MQs, the sweep.
//! - [`mq`]: one MQ: its log, its groups, fetch and ack.
//! - [`group`]: one live consumer group: its ledger, cursor file and waiting fetches.
//! - [`group_ledger`]: a group's delivery bookkeeping, pure (no I/O, no clock of its own).
//! - [`group_commit`]: the thread that writes and fsyncs for everyone at once.

pub mod group;
pub mod group_commit;
pub mod group_ledger;
pub mod mq;
pub mod registry;
