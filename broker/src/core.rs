//! The broker core every door works on (binary sessions, HTTP, the RPC gateway, the
//! reporter): the MQ table, the commit thread's handle, the MQ-RPC reply table, the
//! counters, the change feed the trackers follow, and connection ids. What touches more than
//! one of them lives here; each door only decodes, calls in and encodes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qbus_wire::protocol::MqOptions;
use tokio::sync::watch;

use crate::config::Config;
use crate::error::BrokerError;
use crate::metrics::BrokerMetrics;
use crate::queue::group::Start;
use crate::queue::group_commit::Committer;
use crate::queue::mq::{DeadLetters, Fetched, Mq};
use crate::queue::registry::Registry;
use crate::rpc::reply_table::ReplyTable;
use crate::store::StoreError;

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
    /// Whether the caller can be told of offsets lost to damage: then a fetch that goes
    /// past damaged records returns at once, empty, naming them ([`Fetched::lost`]);
    /// otherwise it goes on looking for records as if they had never been there.
    pub report_loss: bool,
}

/// One broker's shared state.
pub struct Core {
    registry: Registry,
    committer: Committer,
    /// MQ-RPC callers awaiting a reply.
    replies: Arc<ReplyTable>,
    metrics: Arc<BrokerMetrics>,
    /// Bumped on every change the trackers must hear of (see [`Core::watch_changes`]).
    changes: watch::Sender<u64>,
    next_conn: AtomicU64,
    started: Instant,
}

impl Core {
    /// Locks the store directory and opens every MQ in it. Blocking.
    pub fn open(config: Config, committer: Committer) -> Result<Core, StoreError> {
        let started = Instant::now();
        let registry = Registry::open(config, committer.clone())?;
        Ok(Core {
            registry,
            committer,
            replies: Arc::new(ReplyTable::new()),
            metrics: Arc::new(BrokerMetrics::default()),
            changes: watch::channel(0).0,
            next_conn: AtomicU64::new(1),
            started,
        })
    }

    /// The MQs.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        self.registry.config()
    }

    /// The commit thread.
    pub fn committer(&self) -> &Committer {
        &self.committer
    }

    /// The MQ-RPC callers awaiting a reply.
    pub fn replies(&self) -> &Arc<ReplyTable> {
        &self.replies
    }

    /// Connection and request counters.
    pub fn metrics(&self) -> &Arc<BrokerMetrics> {
        &self.metrics
    }

    /// When the store was opened.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// A fresh connection id.
    pub fn connection_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// A receiver that wakes on every change the trackers must hear of: an MQ created or
    /// removed, a group created, a consumer joining or leaving. The broker's reporter
    /// follows it.
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Records a change the trackers must hear of.
    pub fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Creates `name`, or returns it if it exists.
    pub async fn create(&self, name: &str, options: MqOptions) -> Result<Arc<Mq>, BrokerError> {
        if options.replica_count() > 1 && self.config().reporting.is_none() {
            // Followers are found through the trackers: without them no produce could
            // ever be acknowledged.
            return Err(BrokerError::BadRequest(format!(
                "MQ {name:?} with replicas {}: this broker reports to no tracker (--tracker), so no broker can follow it",
                options.replica_count()
            )));
        }
        let (mq, created) = self.registry.create(name, options).await?;
        if created {
            self.changed();
        }
        Ok(mq)
    }

    /// Deletes `name` with its data.
    pub async fn remove(&self, name: &str) -> Result<(), BrokerError> {
        self.registry.remove(name).await?;
        self.changed();
        Ok(())
    }

    /// Deletes consumer group `group` of `mq`, refused while a consumer is attached.
    pub async fn remove_group(&self, mq: &str, group: &str) -> Result<(), BrokerError> {
        self.registry.remove_group(mq, group).await?;
        self.changed();
        Ok(())
    }

    /// Releases the deliveries of a closed connection.
    pub fn disconnect(&self, conn: u64) {
        self.registry.disconnect(conn);
        self.changed();
    }

    /// Stops counting a closed HTTP connection as a consumer, keeping its deliveries held
    /// (see [`Registry::detach`]).
    pub fn detach(&self, conn: u64) {
        self.registry.detach(conn);
        self.changed();
    }

    /// Hands records to connection `conn`, creating the group if new, and moves records past
    /// their delivery limit (and expired ones, if the MQ says so) to the dead-letter MQ on
    /// the way. Returns when records are
    /// delivered or the wait ends (then empty).
    pub async fn fetch(
        &self,
        conn: u64,
        request: &FetchRequest<'_>,
    ) -> Result<Fetched, BrokerError> {
        let mq = self.registry.get(request.mq)?;
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
            let mut fetched = mq.fetch(&group, conn, count, request.tag, wait).await?;
            if !fetched.expired.records.is_empty() {
                self.dead_letter(&mq, std::mem::take(&mut fetched.expired))
                    .await?;
                if fetched.attempts.is_empty() && fetched.dead.is_empty() {
                    continue;
                }
            }
            if !fetched.dead.is_empty() {
                self.dead_letter(&mq, std::mem::take(&mut fetched.dead))
                    .await?;
                // Only dead records came out: look again for live ones (each round retires
                // at least one record, so this ends).
                if fetched.attempts.is_empty() {
                    continue;
                }
            }
            // Each round moves the group past a damaged stretch, so this ends too.
            if (fetched.lost.is_some() || fetched.dropped.is_some()) && !request.report_loss {
                continue;
            }
            mq.counters()
                .delivered(fetched.attempts.len() as u64, fetched.body.len() as u64);
            return Ok(fetched);
        }
    }

    /// Appends records `mq` retired to its dead-letter MQ, created if need be.
    async fn dead_letter(&self, mq: &Mq, dead: DeadLetters) -> Result<(), BrokerError> {
        let dlq = self
            .create(&mq.dead_letter_mq(), MqOptions::default())
            .await?;
        dlq.append(&self.committer, dead.records, dead.count)
            .await?;
        tracing::info!(
            mq = mq.name(),
            dlq = dlq.name(),
            count = dead.count,
            "dead-lettered"
        );
        Ok(())
    }

    /// Releases expired deliveries everywhere and drops MQ-RPC calls past their deadline.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.registry.sweep(now);
        self.replies.expire(now);
    }

    /// Takes one sample of every MQ's counters for the rate history.
    pub fn sample_rates(&self) {
        let totals = self
            .registry
            .list()
            .iter()
            .map(|mq| (mq.name().to_owned(), mq.counters().read()))
            .collect::<Vec<_>>();
        self.metrics.rates().sample(totals);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::testutil::{produce, read, tokens, Commit};

    fn fetch_now(mq: &str) -> FetchRequest<'_> {
        FetchRequest {
            mq,
            group: None,
            tag: None,
            start: Start::Earliest,
            count: 10,
            wait: Duration::ZERO,
            report_loss: false,
        }
    }

    #[tokio::test]
    async fn replicas_need_trackers() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Commit::start();
        let core = Core::open(Config::with_store(dir.path()), commit.committer.clone()).unwrap();
        let options = MqOptions {
            replicas: Some(2),
            ..MqOptions::default()
        };
        let refused = core.create("orders", options).await.err().unwrap();
        assert!(refused.to_string().contains("--tracker"), "{refused}");
        assert!(core.registry().list().is_empty());
        commit.stop().await;
    }

    #[tokio::test]
    async fn fetch_moves_dead_records_to_the_dead_letter_mq_and_reports_changes() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Commit::start();
        let core = Core::open(Config::with_store(dir.path()), commit.committer.clone()).unwrap();
        let mut changes = core.watch_changes();
        let options = MqOptions {
            max_deliveries: Some(1),
            ..MqOptions::default()
        };
        let mq = core.create("jobs", options).await.unwrap();
        assert!(changes.has_changed().unwrap(), "an MQ created");
        changes.borrow_and_update();
        let (records, count) = produce(&["poison"]);
        mq.append(&commit.committer, records, count).await.unwrap();

        let first = core.fetch(1, &fetch_now("jobs")).await.unwrap();
        assert_eq!(read(&first.body), [(0, "poison".into())]);
        assert!(changes.has_changed().unwrap(), "a group created");
        changes.borrow_and_update();
        let released = core
            .registry()
            .nack("jobs", None, &tokens(&first.body, &first.attempts), false)
            .unwrap();
        assert_eq!(released, 1);

        let second = core.fetch(1, &fetch_now("jobs")).await.unwrap();
        assert!(second.attempts.is_empty() && second.dead.is_empty());
        assert!(changes.has_changed().unwrap(), "the dead-letter MQ created");
        let dlq = core.registry().get("jobs.DLQ").unwrap();
        let dead = core.fetch(1, &fetch_now("jobs.DLQ")).await.unwrap();
        assert_eq!(read(&dead.body), [(0, "poison".into())]);
        assert_eq!(dlq.info().next_offset, 1);
        commit.stop().await;
    }
}
