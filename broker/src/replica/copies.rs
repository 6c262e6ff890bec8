//! The follower copies this broker holds of other brokers' logs, in the store directory's
//! `.replicas/` (a name no MQ can have): `.replicas/<leader>/<mq>/`, each an MQ directory
//! like any other whose log keeps its leader's records byte for byte. `<leader>` is the
//! leader's id with characters a file name should not have replaced; the exact id is in
//! the directory's `leader.id` file.
//!
//! Clients name a copy `MQ@LEADER` (`orders@10.0.0.7:15555`) to read it while its leader
//! is down; it is read-only to them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use qbus_wire::protocol::MqOptions;
use qbus_wire::topology::copy_name;

use crate::error::{validate_name, BrokerError};
use crate::queue::mq::{Limits, Mq};
use crate::store::fsio::{sync_parent, write_durably};
use crate::store::{FsRef, LogConfig, StoreError};

/// Held while a copy is being adopted.
pub type AdminGuard<'a> = tokio::sync::MutexGuard<'a, ()>;

/// Directory of the copies, inside the store directory.
pub const COPIES_DIR: &str = ".replicas";
const LEADER_FILE: &str = "leader.id";
/// A copy being removed is renamed to this prefix first (a name no MQ can have), so a
/// crash midway leaves nothing that opens as a copy; the next start deletes it.
const REMOVING: &str = ".removing-";

/// Every follower copy of one broker, by (leader id, MQ).
pub struct Copies {
    fs: FsRef,
    dir: PathBuf,
    log_config: LogConfig,
    limits: Limits,
    copies: RwLock<HashMap<(String, String), Arc<Mq>>>,
    /// When each copy was last read by someone else than its follower (a consumer while its
    /// leader is down, a leader restoring from it), or opened: a stale copy is removed only
    /// once nobody has used it for a while.
    used: Mutex<HashMap<(String, String), Instant>>,
    /// Serialises creating and resetting copies.
    admin: tokio::sync::Mutex<()>,
}

impl Copies {
    /// Opens every copy under `store`. Blocking.
    pub fn open(
        fs: &FsRef,
        store: &Path,
        log_config: LogConfig,
        limits: Limits,
    ) -> Result<Copies, StoreError> {
        let dir = store.join(COPIES_DIR);
        let log_config = LogConfig {
            copy: true,
            ..log_config
        };
        let mut copies = HashMap::new();
        if let Ok(leaders) = fs.list(&dir) {
            for leader_dir in leaders.iter().filter(|e| e.is_dir) {
                let leader_dir = dir.join(&leader_dir.name);
                let Some(leader) = read_leader(fs, &leader_dir) else {
                    continue;
                };
                for entry in fs.list(&leader_dir).map_err(StoreError::io(&leader_dir))? {
                    if entry.is_dir && entry.name.starts_with(REMOVING) {
                        let doomed = leader_dir.join(&entry.name);
                        if let Err(e) = fs.remove_dir_all(&doomed) {
                            tracing::warn!(dir = %doomed.display(), error = %e, "could not delete a removed copy's leftovers");
                        }
                        continue;
                    }
                    if !entry.is_dir || validate_name("MQ", &entry.name).is_err() {
                        continue;
                    }
                    let path = leader_dir.join(&entry.name);
                    let name = copy_name(&entry.name, &leader);
                    let mq = Mq::open(fs, &name, &path, log_config.clone(), &limits)?;
                    copies.insert((leader.clone(), entry.name), Arc::new(mq));
                }
            }
        }
        if !copies.is_empty() {
            tracing::info!(copies = copies.len(), "follower copies opened");
        }
        let now = Instant::now();
        let used = copies.keys().map(|key| (key.clone(), now)).collect();
        Ok(Copies {
            fs: fs.clone(),
            dir,
            log_config,
            limits,
            copies: RwLock::new(copies),
            used: Mutex::new(used),
            admin: tokio::sync::Mutex::new(()),
        })
    }

    /// The copy of `leader`'s `mq`.
    pub fn get(&self, leader: &str, mq: &str) -> Option<Arc<Mq>> {
        let key = (leader.to_owned(), mq.to_owned());
        self.copies
            .read()
            .expect("copies poisoned")
            .get(&key)
            .cloned()
    }

    /// The copy named `MQ@LEADER`, as clients and restoring leaders read it (which counts
    /// as a use, see [`idle`](Self::idle)).
    pub fn by_name(&self, name: &str) -> Result<Arc<Mq>, BrokerError> {
        let copy = name
            .split_once('@')
            .and_then(|(mq, leader)| Some((self.get(leader, mq)?, mq, leader)));
        let (copy, mq, leader) = copy.ok_or_else(|| BrokerError::NoSuchMq(name.to_owned()))?;
        self.touch(leader, mq);
        Ok(copy)
    }

    fn touch(&self, leader: &str, mq: &str) {
        let key = (leader.to_owned(), mq.to_owned());
        self.used
            .lock()
            .expect("copy uses poisoned")
            .insert(key, Instant::now());
    }

    /// How long since the copy of `leader`'s `mq` was last read through
    /// [`by_name`](Self::by_name), created or opened.
    pub fn idle(&self, leader: &str, mq: &str) -> Duration {
        let key = (leader.to_owned(), mq.to_owned());
        self.used
            .lock()
            .expect("copy uses poisoned")
            .get(&key)
            .map_or(Duration::MAX, Instant::elapsed)
    }

    /// Deletes the copy of `leader`'s `mq` with its files (a stale copy, see
    /// `replica::cleanup`): one durable rename takes it out, then the files go.
    pub async fn remove(&self, leader: &str, mq: &str) -> Result<(), BrokerError> {
        let _admin = self.admin.lock().await;
        let key = (leader.to_owned(), mq.to_owned());
        let Some(copy) = self.copies.write().expect("copies poisoned").remove(&key) else {
            return Ok(());
        };
        self.used.lock().expect("copy uses poisoned").remove(&key);
        let (fs, dir) = (self.fs.clone(), copy.dir().to_owned());
        drop(copy);
        let doomed = dir.with_file_name(format!("{REMOVING}{mq}"));
        blocking(move || {
            fs.rename(&dir, &doomed).map_err(StoreError::io(&dir))?;
            sync_parent(&*fs, &doomed)?;
            fs.remove_dir_all(&doomed).map_err(StoreError::io(&doomed))
        })
        .await?;
        tracing::info!(leader, mq, "stale follower copy removed");
        Ok(())
    }

    /// Every copy, sorted by name.
    pub fn list(&self) -> Vec<Arc<Mq>> {
        let mut all: Vec<_> = self
            .copies
            .read()
            .expect("copies poisoned")
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// Takes the copy of `leader`'s `mq` out of the table (its files stay), for adoption;
    /// creating and resetting copies wait meanwhile.
    pub async fn take(&self, leader: &str, mq: &str) -> Option<(Arc<Mq>, AdminGuard<'_>)> {
        let admin = self.admin.lock().await;
        let key = (leader.to_owned(), mq.to_owned());
        let copy = self.copies.write().expect("copies poisoned").remove(&key)?;
        Some((copy, admin))
    }

    /// Puts back a copy [`take`](Self::take) took, when adopting it failed.
    pub fn put_back(&self, leader: &str, mq: &str, copy: Arc<Mq>) {
        let key = (leader.to_owned(), mq.to_owned());
        self.copies
            .write()
            .expect("copies poisoned")
            .insert(key, copy);
    }

    /// The copy of `leader`'s `mq`, made empty from offset `first` with `options` if there
    /// is none.
    pub async fn get_or_create(
        &self,
        leader: &str,
        mq: &str,
        options: &MqOptions,
        first: u64,
    ) -> Result<Arc<Mq>, BrokerError> {
        let _admin = self.admin.lock().await;
        if let Some(copy) = self.get(leader, mq) {
            return Ok(copy);
        }
        self.make(leader, mq, options, first).await
    }

    /// Replaces the copy of `leader`'s `mq` with an empty one from offset `first`: the
    /// leader no longer has the records the copy lacks (its retention deleted them).
    pub async fn reset(
        &self,
        leader: &str,
        mq: &str,
        options: &MqOptions,
        first: u64,
    ) -> Result<Arc<Mq>, BrokerError> {
        let _admin = self.admin.lock().await;
        let key = (leader.to_owned(), mq.to_owned());
        let old = self.copies.write().expect("copies poisoned").remove(&key);
        if let Some(old) = old {
            let (fs, dir) = (self.fs.clone(), old.dir().to_owned());
            drop(old);
            blocking(move || {
                fs.remove_dir_all(&dir).map_err(StoreError::io(&dir))?;
                sync_parent(&*fs, &dir)
            })
            .await?;
        }
        self.make(leader, mq, options, first).await
    }

    async fn make(
        &self,
        leader: &str,
        mq: &str,
        options: &MqOptions,
        first: u64,
    ) -> Result<Arc<Mq>, BrokerError> {
        validate_name("MQ", mq)?;
        let leader_dir = self.dir.join(file_name(leader));
        let dir = leader_dir.join(mq);
        let (fs, options, owned) = (self.fs.clone(), options.clone(), leader.to_owned());
        let (log_config, limits, name) = (
            self.log_config.clone(),
            self.limits.clone(),
            copy_name(mq, leader),
        );
        let copy = blocking(move || {
            fs.create_dir_all(&leader_dir)
                .map_err(StoreError::io(&leader_dir))?;
            let id_file = leader_dir.join(LEADER_FILE);
            if read_leader(&fs, &leader_dir).as_deref() != Some(owned.as_str()) {
                write_durably(&*fs, &id_file, owned.as_bytes())?;
                sync_parent(&*fs, &leader_dir)?;
            }
            if fs.list(&dir).is_ok() {
                fs.remove_dir_all(&dir).map_err(StoreError::io(&dir))?;
            }
            Mq::prepare_at(&fs, &dir, &options, first)?;
            sync_parent(&*fs, &dir)?;
            Mq::open(&fs, &name, &dir, log_config, &limits)
        })
        .await?;
        let copy = Arc::new(copy);
        let key = (leader.to_owned(), mq.to_owned());
        self.copies
            .write()
            .expect("copies poisoned")
            .insert(key, copy.clone());
        self.touch(leader, mq);
        tracing::info!(leader, mq, first, "follower copy created");
        Ok(copy)
    }
}

fn read_leader(fs: &FsRef, leader_dir: &Path) -> Option<String> {
    let bytes = fs.read(&leader_dir.join(LEADER_FILE)).ok()?;
    String::from_utf8(bytes).ok().filter(|id| !id.is_empty())
}

/// A broker id as a directory name: what is not A-Z a-z 0-9 . - becomes `_`.
fn file_name(leader: &str) -> String {
    let name: String = leader
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    // A leading dot would hide it (and "." or ".." would not be a directory of its own).
    format!("b_{name}")
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| BrokerError::Internal(format!("follower copy: {e}")))?
        .map_err(BrokerError::from)
}
