//! The broker's storage engine: one append-only log per MQ, plus durable consumer cursors.
//!
//! - `error`: [`StoreError`], what a storage operation can fail with.
//! - [`fsio`]: the file operations behind the [`Fs`] trait, and the durable steps (sync the
//!   directory of a new name, replace a file by rename).
//! - [`lock`]: the `LOCK` file that keeps two brokers out of one store directory.
//! - `index`: the sparse offset index of one segment (`<base>.idx`).
//! - `segment`: one segment file pair (`<base>.log` + `<base>.idx`), writer side.
//! - `recovery`: reopening a log: load indexes, verify the tail, truncate a torn tail.
//! - `resync`: finding the next intact record past a damaged one.
//! - [`log`]: [`MqLog`], the writer of one MQ's log (append, sync, publish, retention).
//! - [`reader`]: [`LogReader`], the shared read side (verified batch reads by offset).
//! - [`epochs`]: leader epochs, which let followers copy records the leader has not synced.
//! - [`cursor`]: [`CursorFile`], a consumer group's committed offset, safe against torn writes.
//! - [`attempts`]: [`AttemptsFile`], a group's delivery counts, kept across restarts.
//! - [`key_log`]: [`KeyLog`](key_log::KeyLog), an MQ's durable key set (zbus's duplicate filter).
//! - [`timer_log`]: [`TimerLog`], the on-disk index of an MQ's delayed records by due time.
//! - [`txn_log`]: the broker's transaction log (begins, half messages, decisions).
//! - [`txn_log_writer`]: its writer thread, syncing concurrent appends together.
//! - `simdisk` (tests only): a simulated disk that keeps only what was synced, for the
//!   crash tests.
//!
//! The record format is the wire format (`qbus_wire::protocol::record`): the bytes a
//! producer sends are stamped with offset and time and written as they are, and a fetch
//! returns them as they lie in the file, checksum verified.

pub mod attempts;
pub mod cursor;
pub mod epochs;
mod error;
pub mod fsio;
mod index;
pub mod key_log;
pub mod lock;
pub mod log;
pub mod reader;
mod recovery;
mod resync;
mod segment;
#[cfg(test)]
pub(crate) mod simdisk;
pub(crate) mod tail;
#[cfg(test)]
mod testutil;
pub mod timer_log;
pub mod txn_log;
pub mod txn_log_writer;

pub use attempts::AttemptsFile;
pub use cursor::CursorFile;
pub use error::StoreError;
pub use fsio::{FsRef, OsFs};
pub use lock::StoreLock;
pub use log::{Appended, LogConfig, MqLog};
pub use reader::{LogReader, Lost, ReadBatch, ReadPos, Skip};
pub use timer_log::TimerLog;
