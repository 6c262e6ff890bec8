//! The queue engine: every MQ of the store directory, how records are handed out and
//! acknowledged, and the thread that makes it durable.
//!
//! - [`registry`]: the MQ table: opening the store, creating and removing MQs, the sweep.
//! - [`mq`]: one MQ: its log, its groups, fetch and ack.
//! - [`dedupe`]: exactly-once produce: an MQ's dedupe ids, claimed, stored, rebuilt.
//! - [`dedupe_table`]: the table of dedupe ids itself, pure; [`dedupe_index`] its index.
//! - [`group`]: one live consumer group: its ledger, cursor file and waiting fetches.
//! - [`group_ledger`]: a group's delivery bookkeeping, pure (no I/O, no clock of its own).
//! - [`timer`]: delayed delivery: the MQ's timer that copies delayed records to the log's
//!   end when they come due.
//! - [`key_filter`]: zbus's duplicate filter, an MQ's durable key set behind an async lock.
//! - [`key_order`]: one record per key out at a time, for MQs ordered by key.
//! - [`ring`]: a memory MQ's messages, a bounded ring that never touches the disk.
//! - [`group_commit`]: the thread that writes and fsyncs for everyone at once (records of
//!   `sync: false` MQs are written by their session when nothing is in the way), and halts
//!   the store after a failed fsync.
//! - `crash_tests` (tests only): the engine on a simulated disk, cut by power loss at random
//!   points and given failing writes and syncs.

pub mod dedupe;
pub mod dedupe_index;
pub mod dedupe_table;
pub mod group;
pub mod group_commit;
pub mod group_ledger;
pub mod key_filter;
pub mod key_order;
pub mod mq;
mod offset_map;
pub mod registry;
pub mod ring;
pub mod timer;

use crate::error::BrokerError;
use crate::store::StoreError;

/// Runs file work that blocks on a thread of its own, off the async workers. Should that
/// task panic, the fault is the broker's, not the request's: it answers as an internal
/// error (`what failed: why`).
async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, BrokerError> {
    let done = tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| BrokerError::Internal(format!("{what} failed: {e}")))?;
    Ok(done?)
}

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
pub(crate) mod testutil;
