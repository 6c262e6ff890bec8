//! What a storage operation can fail with.

use std::path::{Path, PathBuf};

use qbus_wire::protocol::record::RecordError;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O call failed on a file or directory.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process holds the store directory's lock.
    #[error("store directory {dir} is in use by another broker (lock file {lock})")]
    Locked {
        /// The store directory.
        dir: PathBuf,
        /// Its lock file.
        lock: PathBuf,
    },
    /// A stored record failed its checksum or structure check when read.
    #[error("corrupt record in {file} at byte {position}: {reason}")]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Byte position of the record in the file.
        position: u64,
        /// What is wrong with it.
        reason: RecordError,
    },
    /// A stored record is intact but carries another offset than its place in the log.
    #[error("record in {file} at byte {position} has offset {found}, expected {expected}")]
    OffsetMismatch {
        /// The segment file.
        file: PathBuf,
        /// Byte position of the record in the file.
        position: u64,
        /// The offset the record should have.
        expected: u64,
        /// The offset it has.
        found: u64,
    },
    /// An offset beyond the end of the log was requested.
    #[error("offset {offset} is beyond the end of the log ({end})")]
    OffsetOutOfRange {
        /// The requested offset.
        offset: u64,
        /// The end of the log (exclusive).
        end: u64,
    },
    /// The bytes given to `append` are not whole records back to back.
    #[error("append refused: {reason}")]
    InvalidBatch {
        /// The first structural problem found.
        reason: RecordError,
    },
    /// The store stopped taking writes after a failure that leaves the files' state
    /// unknown (a failed fsync: the kernel may have dropped the unsynced pages). Only a
    /// restart, which recovers from what is on disk, makes it write again.
    #[error(
        "the store refuses writes since {cause}; restart the broker to recover from what is on disk"
    )]
    Halted {
        /// The failure that stopped it.
        cause: String,
    },
    /// A produce to a log that only its leader's records go into: a follower's copy of
    /// another broker's MQ, or an MQ being restored from one.
    #[error("MQ {mq:?} takes no produce: it is a follower's copy of another broker's MQ (read-only) or is being restored from one")]
    ReadOnly {
        /// The MQ (or copy) name.
        mq: String,
    },
    /// One append batch does not fit in a segment (positions are 32-bit).
    #[error("append refused: a batch of {bytes} bytes does not fit in one segment")]
    BatchTooLarge {
        /// Size of the batch.
        bytes: usize,
    },
}

impl StoreError {
    /// True for a damaged record (checksum, structure or offset wrong): the log can be read
    /// on past it with `LogReader::skip_damage`.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            StoreError::Corrupt { .. } | StoreError::OffsetMismatch { .. }
        )
    }

    /// True when the disk is full or over quota: the write failed, nothing of it is
    /// stored, and the same write can succeed once space returns.
    pub fn is_disk_full(&self) -> bool {
        use std::io::ErrorKind::{QuotaExceeded, StorageFull};
        matches!(self, StoreError::Io { source, .. }
            if matches!(source.kind(), StorageFull | QuotaExceeded))
    }

    /// A copy for each waiter of one failed write or fsync (an `io::Error` is not `Clone`),
    /// keeping what callers look at: the variant, the path, the error kind and the message.
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Io { path, source } => StoreError::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            StoreError::Halted { cause } => StoreError::Halted {
                cause: cause.clone(),
            },
            other => StoreError::Io {
                path: "<commit thread>".into(),
                source: std::io::Error::other(other.to_string()),
            },
        }
    }

    /// Adapter for `map_err` that names the file an I/O error happened on.
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
