//! The store directory's lock: one broker per directory.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::Path;

use super::error::StoreError;

/// Name of the lock file inside the store directory.
pub(crate) const LOCK_FILE: &str = "LOCK";

/// Exclusive advisory lock on a store directory, held until dropped.
///
/// The OS releases the lock when the process dies, so a crashed broker never leaves a stale
/// lock behind. The file holds the owner's pid for humans; nothing reads it back.
#[derive(Debug)]
pub struct StoreLock {
    // Closing the file releases the lock.
    _file: File,
}

impl StoreLock {
    /// Creates `dir` if missing and locks `<dir>/LOCK`; fails with [`StoreError::Locked`]
    /// when another process (or another `StoreLock` in this one) holds it.
    pub fn acquire(dir: &Path) -> Result<StoreLock, StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::io(dir))?;
        let path = dir.join(LOCK_FILE);
        // No truncate here: the pid of a running owner must survive a failed attempt.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(StoreError::io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    dir: dir.to_path_buf(),
                    lock: path,
                })
            }
            Err(TryLockError::Error(e)) => return Err(StoreError::io(&path)(e)),
        }
        // The pid is for humans only: a full disk that refuses it must not keep the broker
        // from starting and serving what it has.
        let written = file
            .set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        if let Err(e) = written {
            tracing::warn!(file = %path.display(), error = %e, "cannot write the pid into the lock file");
        }
        Ok(StoreLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_is_refused_until_the_first_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let lock = StoreLock::acquire(&dir).unwrap();
        let pid = std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());

        let err = StoreLock::acquire(&dir).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("is in use by another broker"), "{msg}");
        assert!(msg.contains("LOCK"), "{msg}");

        drop(lock);
        StoreLock::acquire(&dir).unwrap();
    }
}
