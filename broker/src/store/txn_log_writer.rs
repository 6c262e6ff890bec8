//! Group commit for the transaction log: one thread owns the [`TxnLog`] and writes every
//! append; the appends that queued while it was writing or in `fsync` become its next batch,
//! written together and synced once, and each is answered only after the sync that covers
//! it.
//!
//! Without it every begin, half and decision of every transaction paid one `fsync` of its
//! own, one after the other (about 170 transactions a second of ten messages each on a
//! laptop disk); with it the number of syncs per second stays near the disk's limit however
//! many producers there are, as the MQ logs' commit thread does
//! ([`group_commit`](crate::queue::group_commit)). Blocking file I/O stays off the reactor.
//!
//! ```ignore
//! let (log, events) = TxnLog::open(&fs, store, true)?;
//! let writer = TxnLogWriter::start(log)?;
//! writer.append(vec![Event::Commit { txn: 7 }]).await?; // synced when this returns
//! ```

use tokio::sync::{mpsc, oneshot};

use super::txn_log::{Event, TxnLog};
use super::StoreError;

/// Appends that may wait for the thread before senders are made to wait.
const QUEUE: usize = 8192;
/// Most appends written and synced as one batch.
const MAX_BATCH: usize = 4096;
/// Most bytes of entries written as one batch (an append over it is a batch of its own).
const MAX_BATCH_BYTES: usize = 8 << 20;

type Reply = oneshot::Sender<Result<(), StoreError>>;

/// One append: its entries, already encoded, and who waits for the sync.
struct Job {
    bytes: Vec<u8>,
    reply: Reply,
}

/// Handle on the transaction log's writer thread. The thread ends once every handle is
/// dropped and what was queued is written.
pub struct TxnLogWriter {
    tx: mpsc::Sender<Job>,
}

impl TxnLogWriter {
    /// Starts the writer thread over `log`.
    pub fn start(log: TxnLog) -> std::io::Result<TxnLogWriter> {
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("qbus-txn-log".into())
            .spawn(move || run(log, rx))?;
        Ok(TxnLogWriter { tx })
    }

    /// Appends `events` (kept together, in order); returns once they are written and, when
    /// the log syncs, synced.
    pub async fn append(&self, events: &[Event]) -> Result<(), StoreError> {
        let mut bytes = Vec::new();
        for event in events {
            event.encode(&mut bytes);
        }
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Job { bytes, reply })
            .await
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())?
    }
}

/// The writer thread is gone (the broker is shutting down).
fn stopped() -> StoreError {
    StoreError::Io {
        path: "<transaction log writer>".into(),
        source: std::io::Error::other("the broker is shutting down"),
    }
}

/// The writer thread: takes what is queued, writes it as one batch with one sync, answers.
///
/// Fail-stop: after a failed write or sync nothing more is written (the kernel may have
/// dropped the unsynced pages, and a later sync could succeed over a hole, or entries of the
/// failed batch that were answered with an error could be read back after a shorter
/// overwrite); every later append is refused with [`StoreError::Halted`] until a restart
/// recovers from what is really on disk.
fn run(mut log: TxnLog, mut rx: mpsc::Receiver<Job>) {
    let mut buf = Vec::new();
    let mut replies: Vec<Reply> = Vec::new();
    let mut halted: Option<String> = None;
    while let Some(first) = rx.blocking_recv() {
        buf.clear();
        buf.extend_from_slice(&first.bytes);
        replies.push(first.reply);
        while replies.len() < MAX_BATCH && buf.len() < MAX_BATCH_BYTES {
            let Ok(job) = rx.try_recv() else { break };
            buf.extend_from_slice(&job.bytes);
            replies.push(job.reply);
        }
        let written = match &halted {
            Some(cause) => Err(StoreError::Halted {
                cause: cause.clone(),
            }),
            None => log.append_encoded(&buf),
        };
        if let (Err(e), None) = (&written, &halted) {
            tracing::error!(error = %e, "transaction log: write failed; refusing appends until the broker is restarted");
            halted = Some(e.to_string());
        }
        for reply in replies.drain(..) {
            // A waiter that went away (its connection closed) needs no answer.
            let _ = reply.send(written.as_ref().map(|_| ()).map_err(StoreError::duplicate));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::store::simdisk::{Rng, SimDisk};
    use crate::store::testutil::sim_store;

    fn commit(txn: u64) -> Event {
        Event::Commit { txn }
    }

    #[test]
    fn appends_queued_together_share_one_write_and_one_sync() {
        let disk = SimDisk::new();
        let store = sim_store(&disk);
        let (log, _) = TxnLog::open(&disk.fs(), store, true).unwrap();
        // Queue 50 appends before the thread runs: they are one batch.
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut waits = Vec::new();
        for txn in 0..50 {
            let (reply, done) = oneshot::channel();
            let mut bytes = Vec::new();
            commit(txn).encode(&mut bytes);
            tx.try_send(Job { bytes, reply }).unwrap();
            waits.push(done);
        }
        drop(tx);
        let before = disk.changes();
        run(log, rx);
        assert_eq!(disk.changes() - before, 2, "one write and one sync");
        for mut done in waits {
            done.try_recv().unwrap().unwrap();
        }
        let (_, events) = TxnLog::open(&disk.crash(&mut Rng::new(3)).fs(), store, true).unwrap();
        assert_eq!(events, (0..50).map(commit).collect::<Vec<_>>());
    }

    /// Many appenders at once, the power cut at a random change: every append that was
    /// answered `Ok` is in the log after the crash, whole and in an order that keeps each
    /// appender's own order, and nothing else but unanswered ones.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_power_cut_keeps_every_acknowledged_append_of_concurrent_appenders() {
        for seed in 0..12u64 {
            let disk = SimDisk::new();
            let store = sim_store(&disk);
            let (log, _) = TxnLog::open(&disk.fs(), store, true).unwrap();
            let writer = Arc::new(TxnLogWriter::start(log).unwrap());
            let mut rng = Rng::new(seed);
            disk.cut_after(1 + rng.below(60));
            let acked = Arc::new(Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for appender in 0..16u64 {
                let (writer, acked) = (writer.clone(), acked.clone());
                tasks.push(tokio::spawn(async move {
                    for n in 0..10 {
                        let txn = appender * 100 + n;
                        let batch = [
                            Event::Begin {
                                txn,
                                options: vec![0x80],
                            },
                            commit(txn),
                        ];
                        if writer.append(&batch).await.is_err() {
                            return;
                        }
                        acked.lock().unwrap().extend(batch);
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            let after = disk.crash(&mut rng);
            let (_, events) = TxnLog::open(&after.fs(), store, true).unwrap();
            let acked = acked.lock().unwrap();
            for event in acked.iter() {
                assert!(events.contains(event), "seed {seed}: lost {event:?}");
            }
            for appender in 0..16u64 {
                let own: Vec<u64> = events
                    .iter()
                    .map(Event::txn)
                    .filter(|t| t / 100 == appender)
                    .collect();
                let mut sorted = own.clone();
                sorted.sort_unstable();
                assert_eq!(own, sorted, "seed {seed}: appender {appender} out of order");
            }
        }
    }
}
