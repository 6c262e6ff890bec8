//! The MQ table of a store directory: opening every MQ at start, creating, removing, and the
//! periodic sweep for ack timeouts and retention.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use qbus_wire::protocol::{DeliveryToken, Durability, MqOptions};

use super::blocking;
use super::group::Group;
use super::group_commit::{CommitBatch, Committer, StoreWait};
use super::mq::{Limits, Mq};
use crate::config::Config;
use crate::error::{validate_name, BrokerError};
use crate::replica::copies::Copies;
use crate::store::fsio::{sync_parent, Fs};
use crate::store::lock::LOCK_FILE;
use crate::store::{FsRef, LogConfig, OsFs, StoreError, StoreLock};

/// Prefix of the directory a new MQ is made in before it is renamed into place.
const CREATING: &str = ".creating-";
/// Prefix an MQ's directory is renamed to before its files are deleted.
const REMOVING: &str = ".removing-";

/// Every MQ of one broker.
pub struct Registry {
    fs: FsRef,
    config: Config,
    committer: Committer,
    mqs: RwLock<HashMap<String, Arc<Mq>>>,
    /// Follower copies of other brokers' logs, named `MQ@LEADER` to clients.
    copies: Copies,
    /// The store held no MQ and no copy when opened: a new broker, or one whose disk was
    /// lost, which restores its MQs from their followers' copies.
    started_empty: bool,
    /// Serialises create and remove so two creators never open one directory twice.
    admin: tokio::sync::Mutex<()>,
    // None on a simulated disk in tests: the lock is the operating system's.
    _lock: Option<StoreLock>,
    /// Stops every MQ's timer (delayed delivery) when the broker stops.
    timers: super::timer::Timers,
}

impl Registry {
    /// Locks the store directory and opens every MQ in it. Blocking.
    pub fn open(config: Config, committer: Committer) -> Result<Registry, StoreError> {
        let lock = StoreLock::acquire(&config.store)?;
        Registry::open_on(OsFs::shared(), config, committer, Some(lock))
    }

    /// Opens every MQ of the store on `fs`, `lock` keeping other brokers out. Leftovers of
    /// creations and removals a crash interrupted are deleted (each was never acknowledged,
    /// or acknowledged as gone). Writes nothing else, so that a broker starts on a full
    /// disk and serves what it has. Blocking.
    pub(crate) fn open_on(
        fs: FsRef,
        config: Config,
        committer: Committer,
        lock: Option<StoreLock>,
    ) -> Result<Registry, StoreError> {
        let started = Instant::now();
        let store = &config.store;
        fs.create_dir_all(store).map_err(StoreError::io(store))?;
        // The store directory's own name (and those of parents just created), durable
        // before anything in it is acknowledged: a few directory syncs per start.
        for dir in store.ancestors().filter(|d| d.parent().is_some()) {
            sync_parent(&*fs, dir)?;
        }
        let mut mqs = HashMap::new();
        for entry in fs.list(store).map_err(StoreError::io(store))? {
            let path = store.join(&entry.name);
            if !entry.is_dir {
                continue;
            }
            if entry.name.starts_with(CREATING) || entry.name.starts_with(REMOVING) {
                delete_leftover(&*fs, &path);
                continue;
            }
            if validate_name("MQ", &entry.name).is_err() {
                continue;
            }
            let mq = Mq::open(
                &fs,
                &entry.name,
                &path,
                log_config(&config),
                &limits(&config),
            )?;
            mqs.insert(entry.name, Arc::new(mq));
        }
        let copies = Copies::open(&fs, store, log_config(&config), limits(&config))?;
        let started_empty = mqs.is_empty() && copies.list().is_empty();
        tracing::info!(
            store = %config.store.display(),
            mqs = mqs.len(),
            took = ?started.elapsed(),
            "store opened"
        );
        Ok(Registry {
            fs,
            config,
            committer,
            mqs: RwLock::new(mqs),
            copies,
            started_empty,
            admin: tokio::sync::Mutex::new(()),
            _lock: lock,
            timers: super::timer::Timers::default(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The MQ `name`, or the follower copy `MQ@LEADER`.
    pub fn get(&self, name: &str) -> Result<Arc<Mq>, BrokerError> {
        if name.contains('@') {
            return self.copies.by_name(name);
        }
        self.own(name)
    }

    /// Puts `mq` in the table as `name` (replacing what was there) and returns it.
    fn publish(&self, name: &str, mq: Mq) -> Arc<Mq> {
        let mq = Arc::new(mq);
        self.mqs
            .write()
            .expect("mq table poisoned")
            .insert(name.to_owned(), mq.clone());
        mq
    }

    /// This broker's own MQ `name` (never a follower copy).
    pub fn own(&self, name: &str) -> Result<Arc<Mq>, BrokerError> {
        self.mqs
            .read()
            .expect("mq table poisoned")
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::NoSuchMq(name.to_owned()))
    }

    /// Whether the store held no MQ and no copy when opened.
    pub fn started_empty(&self) -> bool {
        self.started_empty
    }

    /// Makes MQ `name` anew, empty from offset `first`, to restore it from a follower's
    /// copy: its log takes records byte for byte, and produces are refused (`503`) until
    /// [`finish_restore`](Self::finish_restore). `None` when the MQ exists.
    pub async fn start_restore(
        &self,
        name: &str,
        options: &MqOptions,
        first: u64,
    ) -> Result<Option<Arc<Mq>>, BrokerError> {
        validate_name("MQ", name)?;
        let _admin = self.admin.lock().await;
        if self.get(name).is_ok() {
            return Ok(None);
        }
        let dir = self.config.store.join(name);
        let staging = self.config.store.join(format!("{CREATING}{name}"));
        let log_config = LogConfig {
            copy: true,
            ..log_config(&self.config)
        };
        let (fs, owned, options) = (self.fs.clone(), name.to_owned(), options.clone());
        let limits = limits(&self.config);
        let mq = blocking("restore", move || {
            if fs.list(&staging).is_ok() {
                fs.remove_dir_all(&staging)
                    .map_err(StoreError::io(&staging))?;
            }
            Mq::prepare_at(&fs, &staging, &options, first)?;
            fs.rename(&staging, &dir).map_err(StoreError::io(&dir))?;
            sync_parent(&*fs, &dir)?;
            Mq::open(&fs, &owned, &dir, log_config, &limits)
        })
        .await?;
        let mq = self.publish(name, mq);
        tracing::info!(mq = name, first, "restoring MQ from a follower's copy");
        Ok(Some(mq))
    }

    /// Ends the restore of `name`: it is reopened as an MQ of this broker's own, written by
    /// its producers from where the copy ended.
    pub async fn finish_restore(&self, name: &str) -> Result<Arc<Mq>, BrokerError> {
        let _admin = self.admin.lock().await;
        let restoring = self.own(name)?;
        self.committer.sync().await?;
        let (fs, owned, dir) = (self.fs.clone(), name.to_owned(), restoring.dir().to_owned());
        let (log_config, limits) = (log_config(&self.config), limits(&self.config));
        let mq = blocking("restore", move || {
            super::timer::index_whole_log(&fs, &dir)?;
            Mq::open(&fs, &owned, &dir, log_config, &limits)
        })
        .await?;
        let mq = self.publish(name, mq);
        super::timer::start(&mq, &self.committer, &self.timers).await;
        tracing::info!(mq = name, end = mq.reader().end_offset(), "MQ restored");
        Ok(mq)
    }

    /// Makes the follower copy `MQ@LEADER` an MQ of this broker's own named `MQ`, written
    /// by its producers from where the copy ends, with the copy's groups and cursors: for
    /// a leader that is never coming back. Refused while this broker holds an `MQ` of its
    /// own (the two logs cannot be joined).
    pub async fn adopt(&self, copy: &str) -> Result<Arc<Mq>, BrokerError> {
        let (name, leader) = copy.split_once('@').ok_or_else(|| {
            BrokerError::BadRequest(format!("{copy:?} names no follower copy (MQ@LEADER)"))
        })?;
        validate_name("MQ", name)?;
        let _admin = self.admin.lock().await;
        if self.own(name).is_ok() {
            return Err(BrokerError::Conflict(format!(
                "this broker holds an MQ {name:?} of its own; the copy stays readable as {copy:?}"
            )));
        }
        let (taken, _copies) = self
            .copies
            .take(leader, name)
            .await
            .ok_or_else(|| BrokerError::NoSuchMq(copy.to_owned()))?;
        // A pull still under way must not write into the files once they are the new MQ's:
        // closed under the log's lock, which every write takes.
        taken.log().lock().expect("log lock poisoned").close();
        self.committer.sync().await?;
        let (fs, owned, from) = (self.fs.clone(), name.to_owned(), taken.dir().to_owned());
        let dir = self.config.store.join(name);
        let (log_config, limits) = (log_config(&self.config), limits(&self.config));
        let adopted = blocking("adopt", move || {
            // Before the rename, so the MQ never exists without it.
            super::timer::index_whole_log(&fs, &from)?;
            fs.rename(&from, &dir).map_err(StoreError::io(&dir))?;
            sync_parent(&*fs, &from)?;
            sync_parent(&*fs, &dir)?;
            Mq::open(&fs, &owned, &dir, log_config, &limits)
        })
        .await;
        let adopted = match adopted {
            Ok(adopted) => self.publish(name, adopted),
            Err(e) => {
                self.copies.put_back(leader, name, taken);
                return Err(e);
            }
        };
        tracing::info!(
            mq = name,
            leader,
            end = adopted.reader().end_offset(),
            "follower copy adopted"
        );
        super::timer::start(&adopted, &self.committer, &self.timers).await;
        Ok(adopted)
    }

    /// The follower copies.
    pub fn copies(&self) -> &Copies {
        &self.copies
    }

    /// Every MQ and follower copy: what consumers may hold deliveries of.
    fn everything(&self) -> Vec<Arc<Mq>> {
        let mut all = self.list();
        all.extend(self.copies.list());
        all
    }

    /// Every MQ of this broker's own, sorted by name.
    pub fn list(&self) -> Vec<Arc<Mq>> {
        let mut all: Vec<_> = self
            .mqs
            .read()
            .expect("mq table poisoned")
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// Creates `name`, or finds it if it exists; true when it was created.
    pub async fn create(
        &self,
        name: &str,
        options: MqOptions,
    ) -> Result<(Arc<Mq>, bool), BrokerError> {
        validate_name("MQ", name)?;
        if name == LOCK_FILE {
            return Err(BrokerError::BadRequest(format!(
                "MQ name {LOCK_FILE:?} is reserved: the store directory's lock file has it"
            )));
        }
        if let Some(dlq) = &options.dead_letter_mq {
            validate_name("dead-letter MQ", dlq)?;
        }
        if options.is_memory() && options.replica_count() > 1 {
            return Err(BrokerError::BadRequest(format!(
                "MQ {name:?}: a memory MQ keeps its messages in this broker's memory only, so it takes no replicas; drop `memory` or `replicas`"
            )));
        }
        let _admin = self.admin.lock().await;
        if let Ok(mq) = self.get(name) {
            return Ok((mq, false));
        }
        let store = self.config.store.clone();
        let (log_config, limits) = (log_config(&self.config), limits(&self.config));
        let (owned, fs) = (name.to_owned(), self.fs.clone());
        let mq = blocking("create", move || {
            // Made aside and renamed into place: a crash or a full disk midway leaves only
            // a directory the next start deletes, never a half-made MQ.
            let staging = store.join(format!("{CREATING}{owned}"));
            let dir = store.join(&owned);
            let mut renamed = false;
            let made = (|| {
                if fs.list(&staging).is_ok() {
                    fs.remove_dir_all(&staging)
                        .map_err(StoreError::io(&staging))?;
                }
                Mq::prepare(&fs, &staging, &options)?;
                fs.rename(&staging, &dir).map_err(StoreError::io(&dir))?;
                renamed = true;
                sync_parent(&*fs, &dir)
            })();
            if let Err(e) = made {
                // Not acknowledged, so not created: nothing may stay in the way of a retry.
                delete_leftover(&*fs, if renamed { &dir } else { &staging });
                return Err(e);
            }
            Mq::open(&fs, &owned, &dir, log_config, &limits)
        })
        .await?;
        let mq = self.publish(name, mq);
        tracing::info!(mq = name, "MQ created");
        Ok((mq, true))
    }

    /// Deletes `name` with its data.
    pub async fn remove(&self, name: &str) -> Result<(), BrokerError> {
        let _admin = self.admin.lock().await;
        let mq = self
            .mqs
            .write()
            .expect("mq table poisoned")
            .remove(name)
            .ok_or_else(|| BrokerError::NoSuchMq(name.to_owned()))?;
        // Let appends already queued finish before the files go.
        let synced = self.committer.sync().await.map_err(BrokerError::from);
        let dir = mq.dir().to_owned();
        let fs = self.fs.clone();
        let doomed = self.config.store.join(format!("{REMOVING}{name}"));
        let renamed = match synced {
            Err(e) => Err(e),
            Ok(()) => {
                blocking("remove", move || {
                    // One rename, made durable, is the removal; deleting the files after it may
                    // take long, and what a crash leaves of them is deleted by the next start.
                    fs.rename(&dir, &doomed).map_err(StoreError::io(&dir))?;
                    let synced = sync_parent(&*fs, &doomed);
                    // Gone for this process either way; only a power cut could bring it back.
                    delete_leftover(&*fs, &doomed);
                    Ok(synced)
                })
                .await
            }
        };
        match renamed {
            Ok(synced) => synced?,
            Err(e) => {
                // Still in place (a halted store refuses the sync): keep serving it.
                self.mqs
                    .write()
                    .expect("mq table poisoned")
                    .insert(name.to_owned(), mq);
                return Err(e);
            }
        }
        tracing::info!(mq = name, "MQ removed");
        Ok(())
    }

    /// Deletes consumer group `group` of `mq`, refused while a consumer is attached.
    pub async fn remove_group(&self, mq: &str, group: &str) -> Result<(), BrokerError> {
        self.get(mq)?.remove_group(group).await?;
        tracing::info!(mq, group, "consumer group removed");
        Ok(())
    }

    /// Releases the deliveries of a closed connection.
    pub fn disconnect(&self, conn: u64) {
        for mq in self.everything() {
            mq.disconnect(conn);
        }
    }

    /// Stops counting a closed HTTP connection as a consumer. Unlike [`Registry::disconnect`]
    /// its deliveries stay held until acked or timed out: HTTP clients ack on later
    /// connections.
    pub fn detach(&self, conn: u64) {
        for mq in self.everything() {
            mq.detach(conn);
        }
    }

    /// Acknowledges deliveries of `group` (the MQ's name when `None`) on their own; returns
    /// how many were acknowledged and how durable the group's cursor is.
    pub async fn ack(
        &self,
        mq: &str,
        group: Option<&str>,
        tokens: &[DeliveryToken],
    ) -> Result<(usize, Durability), BrokerError> {
        let mut batch = CommitBatch::default();
        let (acked, stored) = self.stage_ack(&mut batch, mq, group, tokens)?;
        self.committer.submit(batch).await?;
        Ok((acked, stored.wait().await?))
    }

    /// Acknowledges deliveries; a store of the group's cursor, if it moved, joins `batch`.
    /// Returns how many were acknowledged and a wait for the cursor's durability.
    pub fn stage_ack(
        &self,
        batch: &mut CommitBatch,
        mq: &str,
        group: Option<&str>,
        tokens: &[DeliveryToken],
    ) -> Result<(usize, StoreWait<Durability>), BrokerError> {
        let (mq, group) = self.existing_group(mq, group)?;
        let (acked, stored) = mq.ack(&self.committer, batch, &group, tokens);
        mq.counters().acked(acked as u64);
        Ok((acked, stored))
    }

    /// Gives deliveries back for immediate redelivery; returns how many were released.
    /// `unseen`: the consumer never handed them to its application, so they do not count
    /// toward the delivery limit.
    pub fn nack(
        &self,
        mq: &str,
        group: Option<&str>,
        tokens: &[DeliveryToken],
        unseen: bool,
    ) -> Result<usize, BrokerError> {
        let (mq, group) = self.existing_group(mq, group)?;
        Ok(mq.nack(&group, tokens, unseen))
    }

    /// The MQ `mq` and its existing group `group` (the MQ's name when `None`).
    pub fn existing_group(
        &self,
        mq: &str,
        group: Option<&str>,
    ) -> Result<(Arc<Mq>, Arc<Group>), BrokerError> {
        let mq = self.get(mq)?;
        let name = group.unwrap_or(mq.name());
        let group = mq
            .existing_group(name)
            .ok_or_else(|| BrokerError::NoSuchGroup {
                mq: mq.name().to_owned(),
                group: name.to_owned(),
            })?;
        Ok((mq, group))
    }

    /// Starts the timers of the MQs that hold delayed records. Call once, inside the runtime,
    /// once the store is open.
    pub async fn start_timers(&self) {
        for mq in self.list() {
            super::timer::start(&mq, &self.committer, &self.timers).await;
        }
    }

    /// Readies `mq` for delayed records (see [`super::timer::enable`]).
    pub async fn enable_delays(&self, mq: &Arc<Mq>) -> Result<(), BrokerError> {
        if mq.ring().is_some() {
            // The timer keeps its schedule on disk, which a memory MQ never touches.
            return Err(BrokerError::BadRequest(format!(
                "MQ {:?} is a memory MQ: it takes no delayed messages (deliver_at / delay); send them to an MQ on disk",
                mq.name()
            )));
        }
        super::timer::enable(mq, &self.fs, &self.committer, &self.timers).await
    }

    /// Stops every timer.
    pub async fn stop_timers(&self) {
        self.timers.stop().await;
    }

    /// Releases deliveries past their ack deadline in every MQ.
    pub fn sweep(&self, now: Instant) {
        for mq in self.everything() {
            mq.sweep(now);
        }
    }

    /// Applies retention to every MQ.
    pub async fn retain(&self) {
        if self.config.retention_size.is_none() && self.config.retention_age.is_none() {
            return;
        }
        for mq in self.everything() {
            if let Err(e) = self.committer.retain(mq.log()).await {
                tracing::warn!(mq = mq.name(), error = %e, "retention failed");
            }
        }
    }
}

/// Deletes what an interrupted creation or a removal left; a failure only costs disk space
/// until the next start tries again.
fn delete_leftover(fs: &dyn Fs, path: &std::path::Path) {
    match fs.remove_dir_all(path) {
        Ok(()) => {
            let dir = path.display();
            tracing::info!(dir = %dir, "deleted the leftover of an MQ creation or removal");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            let dir = path.display();
            tracing::warn!(dir = %dir, error = %e, "cannot delete the leftover of an MQ creation or removal");
        }
    }
}

fn log_config(config: &Config) -> LogConfig {
    LogConfig {
        segment_bytes: config.segment_size,
        retention_bytes: config.retention_size,
        retention_ms: config.retention_age.map(|d| d.as_millis() as u64),
        copy: false,
    }
}

fn limits(config: &Config) -> Limits {
    Limits {
        ack_timeout: config.ack_timeout,
        max_deliveries: config.max_deliveries,
        max_in_flight: config.max_in_flight,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::queue::group::Start;
    use crate::queue::testutil::{produce, read, tokens, Commit};

    fn names(registry: &Registry) -> Vec<String> {
        registry
            .list()
            .iter()
            .map(|mq| mq.name().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn create_find_list_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Commit::start();
        let registry =
            Registry::open(Config::with_store(dir.path()), commit.committer.clone()).unwrap();
        assert!(names(&registry).is_empty());

        let (orders, created) = registry
            .create("orders", MqOptions::default())
            .await
            .unwrap();
        assert!(created);
        let (again, created) = registry
            .create("orders", MqOptions::default())
            .await
            .unwrap();
        assert!(
            !created && Arc::ptr_eq(&orders, &again),
            "create finds what exists"
        );
        registry
            .create("audit", MqOptions::default())
            .await
            .unwrap();
        assert_eq!(names(&registry), ["audit", "orders"]);
        assert!(Arc::ptr_eq(&registry.get("orders").unwrap(), &orders));
        assert!(matches!(
            registry.create("../x", MqOptions::default()).await,
            Err(BrokerError::BadRequest(_))
        ));

        registry.remove("orders").await.unwrap();
        assert!(!dir.path().join("orders").exists());
        assert!(matches!(
            registry.get("orders"),
            Err(BrokerError::NoSuchMq(_))
        ));
        assert!(matches!(
            registry.remove("orders").await,
            Err(BrokerError::NoSuchMq(_))
        ));
        assert_eq!(names(&registry), ["audit"]);
        commit.stop().await;
    }

    #[tokio::test]
    async fn one_store_one_registry() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Commit::start();
        let config = Config::with_store(dir.path());
        let registry = Registry::open(config.clone(), commit.committer.clone()).unwrap();
        let second = Registry::open(config.clone(), commit.committer.clone());
        assert!(matches!(second, Err(StoreError::Locked { .. })));
        drop(registry);
        Registry::open(config, commit.committer.clone()).unwrap();
        commit.stop().await;
    }

    #[tokio::test]
    async fn reopening_the_store_keeps_records_and_cursors() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Commit::start();
        let config = Config::with_store(dir.path());
        let registry = Registry::open(config.clone(), commit.committer.clone()).unwrap();
        let (mq, _) = registry
            .create("orders", MqOptions::default())
            .await
            .unwrap();
        let (records, count) = produce(&["a", "b", "c"]);
        mq.append(&commit.committer, records, count).await.unwrap();
        let group = mq
            .group(&commit.committer, "billing", Start::Earliest)
            .await
            .unwrap();
        let fetched = mq.fetch(&group, 1, 2, None, Duration::ZERO).await.unwrap();
        let acked = registry
            .ack(
                "orders",
                Some("billing"),
                &tokens(&fetched.body, &fetched.attempts),
            )
            .await
            .unwrap();
        assert_eq!(acked, (2, Durability::Synced));
        drop((group, mq, registry));

        let registry = Registry::open(config, commit.committer.clone()).unwrap();
        assert_eq!(names(&registry), ["orders"]);
        let (mq, group) = registry.existing_group("orders", Some("billing")).unwrap();
        assert_eq!(mq.info().groups[0].committed, 2);
        let fetched = mq.fetch(&group, 1, 10, None, Duration::ZERO).await.unwrap();
        assert_eq!(read(&fetched.body), [(2, "c".into())]);
        assert!(matches!(
            registry.existing_group("orders", Some("nobody")),
            Err(BrokerError::NoSuchGroup { .. })
        ));
        commit.stop().await;
    }
}
