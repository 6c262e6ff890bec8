//! zbus's duplicate filter on one MQ (`add_key`, `remove_key`, and a produce whose `key` is
//! present in its `key_group` refused): the durable key set of `store::key_log`, opened on
//! first use (an MQ that never sees a key reads nothing), changed one at a time off the
//! reactor threads.

use std::path::PathBuf;

use tokio::sync::Mutex;

use super::blocking;
use crate::error::BrokerError;
use crate::store::key_log::{Change, KeyError, KeyLog};
use crate::store::{FsRef, StoreError};

/// One MQ's key set.
pub struct KeyFilter {
    fs: FsRef,
    dir: PathBuf,
    /// `None` until first used, and while a change is being written.
    log: Mutex<Option<KeyLog>>,
}

/// A removal: one key, a group's keys, or every key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// `key` of `group`.
    Key { group: String, key: String },
    /// Every key of `group`.
    Group(String),
    /// Every key.
    All,
}

impl From<KeyError> for BrokerError {
    fn from(e: KeyError) -> BrokerError {
        match e {
            KeyError::TooLong(_) => BrokerError::BadRequest(e.to_string()),
            KeyError::Full => BrokerError::Conflict(e.to_string()),
            KeyError::Store(e) => BrokerError::Store(e),
        }
    }
}

impl KeyFilter {
    /// The key set of the MQ stored in `dir`.
    pub fn new(fs: FsRef, dir: PathBuf) -> KeyFilter {
        KeyFilter {
            fs,
            dir,
            log: Mutex::new(None),
        }
    }

    /// Adds `key` to `group`, durably; `false` when it was present already.
    pub async fn add(&self, group: String, key: String) -> Result<bool, BrokerError> {
        let added = self
            .change(move |log| {
                log.change(Change::Add {
                    group: &group,
                    key: &key,
                })
            })
            .await?;
        Ok(added == 1)
    }

    /// Removes keys, durably; returns how many were present.
    pub async fn remove(&self, removal: Removal) -> Result<u64, BrokerError> {
        self.change(move |log| {
            log.change(match &removal {
                Removal::Key { group, key } => Change::Remove { group, key },
                Removal::Group(group) => Change::RemoveGroup { group },
                Removal::All => Change::RemoveAll,
            })
        })
        .await
    }

    async fn change(
        &self,
        change: impl FnOnce(&mut KeyLog) -> Result<u64, KeyError> + Send + 'static,
    ) -> Result<u64, BrokerError> {
        let mut slot = self.log.lock().await;
        let (fs, dir, log) = (self.fs.clone(), self.dir.clone(), slot.take());
        let (log, outcome) = blocking("key set change", move || {
            let mut log = match log {
                Some(log) => log,
                None => KeyLog::open(&fs, &dir)?,
            };
            let outcome = change(&mut log);
            Ok::<_, StoreError>((log, outcome))
        })
        .await?;
        *slot = Some(log);
        Ok(outcome?)
    }
}
