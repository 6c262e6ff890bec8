//! The set of MQs in a store directory: opening them at start, creating, removing, and the
//! periodic sweep for ack timeouts and retention.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use qbus_client::protocol::{DeliveryToken, Durability, MqOptions};

use super::group::{Group, Start};
use super::group_commit::{CommitBatch, Committer, StoreWait};
use super::mq::{Fetched, Limits, Mq};
use crate::config::Config;
use crate::error::{validate_name, BrokerError};
use crate::metrics::BrokerMetrics;
use crate::rpc::reply_table::ReplyTable;
use crate::store::{LogConfig, StoreError, StoreLock};

/// Longest long-poll a fetch may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Most records one fetch may ask for.
pub const MAX_FETCH_COUNT: usize = 1 << 16;

/// What a fetch asks for; the binary protocol and HTTP fill it from their own requests.
#[derive(Debug, Clone)]
pub struct FetchRequest<'a> {
    /// The MQ.
    pub mq: &'a str,
    /// The consumer group; the MQ's name when `None`.
    pub group: Option<&'a str>,
    /// Only records with this tag.
    pub tag: Option<&'a str>,
    /// Where the group starts if this fetch creates it.
    pub start: Start,
    /// Most records wanted (1 to [`MAX_FETCH_COUNT`]).
    pub count: usize,
    /// How long to wait for a record (at most [`MAX_WAIT`]).
    pub wait: Duration,
}

/// Every MQ of one broker.
pub struct Registry {
    config: Config,
    committer: Committer,
    mqs: RwLock<HashMap<String, Arc<Mq>>>,
    /// Serialises create and remove so two creators never open one directory twice.
    admin: tokio::sync::Mutex<()>,
    next_conn: AtomicU64,
    started: Instant,
    metrics: Arc<BrokerMetrics>,
    /// Bumped on every change the trackers must hear of (see [`Registry::watch_changes`]).
    changes: tokio::sync::watch::Sender<u64>,
    /// MQ-RPC callers awaiting a reply.
    routes: Arc<ReplyTable>,
    _lock: StoreLock,
}

impl Registry {
    /// Locks the store directory and opens every MQ in it. Blocking.
    pub fn open(config: Config, committer: Committer) -> Result<Registry, StoreError> {
        let lock = StoreLock::acquire(&config.store)?;
        let started = Instant::now();
        let mut mqs = HashMap::new();
        let io = |source| StoreError::Io {
            path: config.store.clone(),
            source,
        };
        for entry in std::fs::read_dir(&config.store).map_err(io)? {
            let entry = entry.map_err(io)?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !entry.path().is_dir() || validate_name("MQ", &name).is_err() {
                continue;
            }
            let mq = Mq::open(
                &name,
                &entry.path(),
                None,
                log_config(&config),
                &limits(&config),
            )?;
            mqs.insert(name, Arc::new(mq));
        }
        tracing::info!(
            store = %config.store.display(),
            mqs = mqs.len(),
            took = ?started.elapsed(),
            "store opened"
        );
        Ok(Registry {
            config,
            committer,
            mqs: RwLock::new(mqs),
            admin: tokio::sync::Mutex::new(()),
            next_conn: AtomicU64::new(1),
            started,
            metrics: Arc::new(BrokerMetrics::default()),
            changes: tokio::sync::watch::channel(0).0,
            routes: Arc::new(ReplyTable::new()),
            _lock: lock,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The commit thread.
    pub fn committer(&self) -> &Committer {
        &self.committer
    }

    /// When the broker started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// A fresh connection id.
    pub fn connection_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// The MQ `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Mq>, BrokerError> {
        self.mqs
            .read()
            .expect("mq table poisoned")
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::NoSuchMq(name.to_owned()))
    }

    /// Every MQ, sorted by name.
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

    /// Creates `name`, or returns it if it exists.
    pub async fn create(&self, name: &str, options: MqOptions) -> Result<Arc<Mq>, BrokerError> {
        validate_name("MQ", name)?;
        if let Some(dlq) = &options.dead_letter_mq {
            validate_name("dead-letter MQ", dlq)?;
        }
        let _admin = self.admin.lock().await;
        if let Ok(mq) = self.get(name) {
            return Ok(mq);
        }
        let dir = self.config.store.join(name);
        let (log_config, limits) = (log_config(&self.config), limits(&self.config));
        let owned = name.to_owned();
        let mq = tokio::task::spawn_blocking(move || {
            Mq::open(&owned, &dir, Some(options), log_config, &limits)
        })
        .await
        .map_err(|e| BrokerError::BadRequest(format!("create failed: {e}")))??;
        let mq = Arc::new(mq);
        self.mqs
            .write()
            .expect("mq table poisoned")
            .insert(name.to_owned(), mq.clone());
        tracing::info!(mq = name, "MQ created");
        self.changed();
        Ok(mq)
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
        self.committer.sync().await?;
        let dir = mq.dir().to_owned();
        tokio::task::spawn_blocking(move || {
            std::fs::remove_dir_all(&dir).map_err(|source| StoreError::Io { path: dir, source })
        })
        .await
        .map_err(|e| BrokerError::BadRequest(format!("remove failed: {e}")))??;
        tracing::info!(mq = name, "MQ removed");
        self.changed();
        Ok(())
    }

    /// Deletes consumer group `group` of `mq`, refused while a consumer is attached.
    pub async fn remove_group(&self, mq: &str, group: &str) -> Result<(), BrokerError> {
        self.get(mq)?.remove_group(group).await?;
        tracing::info!(mq, group, "consumer group removed");
        self.changed();
        Ok(())
    }

    /// Moves records that reached their delivery limit to the MQ's dead-letter MQ.
    pub async fn dead_letter(&self, mq: &Mq, offsets: &[u64]) -> Result<(), BrokerError> {
        let records = mq.read_records(offsets).await?;
        let dlq = self
            .create(&mq.dead_letter_mq(), MqOptions::default())
            .await?;
        dlq.append(&self.committer, records, offsets.len() as u32)
            .await?;
        tracing::info!(
            mq = mq.name(),
            dlq = dlq.name(),
            count = offsets.len(),
            "dead-lettered"
        );
        Ok(())
    }

    /// Releases the deliveries of a closed connection.
    pub fn disconnect(&self, conn: u64) {
        for mq in self.list() {
            mq.disconnect(conn);
        }
        self.changed();
    }

    /// A receiver that wakes on every change the trackers must hear of: an MQ created or
    /// removed, a group created, a consumer joining or leaving. The broker's reporter
    /// follows it (see [`crate::reporter`]).
    pub fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Records a change the trackers must hear of.
    pub fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Stops counting a closed HTTP connection as a consumer. Unlike [`Registry::disconnect`]
    /// its deliveries stay held until acked or timed out: HTTP clients ack on later
    /// connections.
    pub fn detach(&self, conn: u64) {
        for mq in self.list() {
            mq.detach(conn);
        }
        self.changed();
    }

    /// Connection and request counters.
    pub fn metrics(&self) -> &Arc<BrokerMetrics> {
        &self.metrics
    }

    /// The MQ-RPC callers awaiting a reply.
    pub fn routes(&self) -> &Arc<ReplyTable> {
        &self.routes
    }

    /// Hands records to connection `conn`, creating the group if new, and moves records past
    /// their delivery limit to the dead-letter MQ on the way. Returns when records are
    /// delivered or the wait ends (then empty).
    pub async fn fetch(
        &self,
        conn: u64,
        request: &FetchRequest<'_>,
    ) -> Result<Fetched, BrokerError> {
        let mq = self.get(request.mq)?;
        let group_name = request.group.unwrap_or(request.mq);
        let created = mq.existing_group(group_name).is_none();
        let group = mq.group(&self.committer, group_name, request.start).await?;
        if created {
            self.changed();
        }
        let count = request.count.clamp(1, MAX_FETCH_COUNT);
        let give_up = tokio::time::Instant::now() + request.wait.min(MAX_WAIT);
        loop {
            let wait = give_up.saturating_duration_since(tokio::time::Instant::now());
            let fetched = mq.fetch(&group, conn, count, request.tag, wait).await?;
            if !fetched.dead.is_empty() {
                self.dead_letter(&mq, &fetched.dead).await?;
                // Only dead records came out: look again for live ones (each round retires
                // at least one record, so this ends).
                if fetched.attempts.is_empty() {
                    continue;
                }
            }
            mq.counters()
                .delivered(fetched.attempts.len() as u64, fetched.body.len() as u64);
            return Ok(fetched);
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

    fn existing_group(
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

    /// Releases expired deliveries everywhere and drops MQ-RPC calls past their deadline.
    pub fn sweep(&self) {
        let now = Instant::now();
        for mq in self.list() {
            mq.sweep(now);
        }
        self.routes.expire(now);
    }

    /// Applies retention to every MQ.
    pub async fn retain(&self) {
        if self.config.retention_size.is_none() && self.config.retention_age.is_none() {
            return;
        }
        for mq in self.list() {
            if let Err(e) = self.committer.retain(mq.log()).await {
                tracing::warn!(mq = mq.name(), error = %e, "retention failed");
            }
        }
    }
}

fn log_config(config: &Config) -> LogConfig {
    LogConfig {
        segment_bytes: config.segment_size,
        retention_bytes: config.retention_size,
        retention_ms: config.retention_age.map(|d| d.as_millis() as u64),
    }
}

fn limits(config: &Config) -> Limits {
    Limits {
        ack_timeout: config.ack_timeout,
        max_deliveries: config.max_deliveries,
        max_in_flight: config.max_in_flight,
    }
}
