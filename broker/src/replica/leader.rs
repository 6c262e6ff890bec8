//! The leader's side of one copy: which followers pull it and how far each holds it, for
//! `replicated` receipts and for `QueryMq`. A follower's confirmation (a `ReplicaRead`
//! without `READ_AHEAD`) from offset `n` tells the leader it holds every record below `n`
//! durably; its reads ahead tell it the follower is there, and whether it has caught up.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use qbus_wire::protocol::FollowerInfo;
use tokio::sync::oneshot;

/// A follower unheard of for this long no longer counts as reachable (followers ask at
/// least every `follower::POLL_WAIT`).
pub const REACHABLE: Duration = Duration::from_secs(3);
/// A follower in sync reached the leader's end within this long.
pub const IN_SYNC: Duration = Duration::from_secs(5);
/// How long a `replicated` receipt waits for its followers.
pub const REPLICATION_TIMEOUT: Duration = Duration::from_secs(5);
/// After a copy starts being led (broker start, MQ created), produces wait this long for
/// its followers to come rather than being refused at once.
const GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct Progress {
    acked: u64,
    heard: Instant,
    caught_up: Option<Instant>,
}

/// Followers of one broker's copy of an MQ.
pub struct Followers {
    since: Instant,
    progress: Mutex<HashMap<String, Progress>>,
    /// The receipts waiting, by the offset they wait for (and a number telling waiters of
    /// one offset apart): a follower's confirmation wakes only those it covers, so a
    /// confirmation costs the receipts it answers, not every receipt in flight.
    waiting: Mutex<BTreeMap<(u64, u64), oneshot::Sender<()>>>,
    next_waiter: AtomicU64,
}

/// Why a `replicated` receipt could not be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicationError {
    /// Fewer followers are reachable than the receipt needs: nothing was written.
    #[error("{reachable} follower(s) reachable, {required} required (min_replicas); nothing was stored, retry later or on another broker")]
    TooFew {
        /// Followers heard from recently.
        reachable: usize,
        /// Followers the receipt needs.
        required: usize,
    },
    /// The records are stored here but followers went away before enough confirmed them.
    #[error("records up to offset {end} are stored on this broker but only {reachable} follower(s) remain reachable, {required} required; they may be delivered, retry to be sure")]
    Lost {
        /// The offset after the records.
        end: u64,
        /// Followers heard from recently.
        reachable: usize,
        /// Followers the receipt needs.
        required: usize,
    },
    /// The records are stored here but too few followers confirmed them in time.
    #[error("records up to offset {end} are stored on this broker but only {confirmed} of {required} required follower(s) confirmed them within {waited:?}; they may be delivered, retry to be sure")]
    Timeout {
        /// The offset after the records.
        end: u64,
        /// Followers that hold them.
        confirmed: usize,
        /// Followers the receipt needs.
        required: usize,
        /// How long the receipt waited.
        waited: Duration,
    },
}

impl Default for Followers {
    fn default() -> Followers {
        Followers {
            since: Instant::now(),
            progress: Mutex::new(HashMap::new()),
            waiting: Mutex::new(BTreeMap::new()),
            next_waiter: AtomicU64::new(0),
        }
    }
}

impl Followers {
    fn progress(&self) -> std::sync::MutexGuard<'_, HashMap<String, Progress>> {
        self.progress.lock().expect("follower progress poisoned")
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, BTreeMap<(u64, u64), oneshot::Sender<()>>> {
        self.waiting.lock().expect("replicated receipts poisoned")
    }

    /// Wakes the receipts waiting for offsets up to `acked` (all of them with `u64::MAX`)
    /// to count their followers again.
    fn wake_up_to(&self, acked: u64) {
        let ready = {
            let mut waiting = self.waiting();
            let rest = match acked.checked_add(1) {
                Some(above) => waiting.split_off(&(above, 0)),
                None => BTreeMap::new(),
            };
            std::mem::replace(&mut *waiting, rest)
        };
        for (_, waiter) in ready {
            let _ = waiter.send(());
        }
    }

    /// Follower `id` holds every record below `acked`; the leader's log ends at `end`.
    pub fn heard(&self, id: &str, acked: u64, end: u64) {
        let now = Instant::now();
        let moved = {
            let mut all = self.progress();
            let entry = all.entry(id.to_owned()).or_insert(Progress {
                acked,
                heard: now,
                caught_up: None,
            });
            let moved = acked != entry.acked;
            entry.acked = acked;
            entry.heard = now;
            if acked >= end {
                entry.caught_up = Some(now);
            }
            moved
        };
        if moved {
            self.wake_up_to(acked);
        }
    }

    /// Follower `id` reads ahead from `from` (which confirms nothing durable); the
    /// leader's log ends at `end`: reading from there, it has caught up.
    pub fn alive(&self, id: &str, from: u64, end: u64) {
        let now = Instant::now();
        let mut all = self.progress();
        let entry = all.entry(id.to_owned()).or_insert(Progress {
            acked: 0,
            heard: now,
            caught_up: None,
        });
        entry.heard = now;
        if from >= end {
            entry.caught_up = Some(now);
        }
    }

    /// Follower `id`'s connection closed: it is unreachable until it pulls again.
    pub fn gone(&self, id: &str) {
        self.progress().remove(id);
        self.wake_up_to(u64::MAX);
    }

    /// (reachable, in sync) follower counts now.
    fn counts(&self, now: Instant) -> (usize, usize) {
        let all = self.progress();
        let reachable = all.values().filter(|p| reachable(p, now)).count();
        let in_sync = all.values().filter(|p| in_sync(p, now)).count();
        (reachable, in_sync)
    }

    /// Followers a `replicated` receipt needs: `min_replicas`, or else every follower in
    /// sync, at least one.
    fn required(&self, min_replicas: Option<u32>, now: Instant) -> usize {
        match min_replicas {
            Some(min) => (min as usize).max(1),
            None => self.counts(now).1.max(1),
        }
    }

    /// Refuses a `replicated` produce before anything is written when fewer followers are
    /// reachable than it needs (after a grace period for followers to come).
    pub fn check_reachable(&self, min_replicas: Option<u32>) -> Result<(), ReplicationError> {
        let now = Instant::now();
        if now.duration_since(self.since) < GRACE {
            return Ok(());
        }
        let required = self.required(min_replicas, now);
        let (reachable, _) = self.counts(now);
        if reachable < required {
            return Err(ReplicationError::TooFew {
                reachable,
                required,
            });
        }
        Ok(())
    }

    /// Waits until enough followers hold every record below `end`.
    pub async fn wait_replicated(
        &self,
        end: u64,
        min_replicas: Option<u32>,
    ) -> Result<(), ReplicationError> {
        let started = tokio::time::Instant::now();
        let give_up = started + REPLICATION_TIMEOUT;
        loop {
            // Waiting before counting: a confirmation that lands between the two still
            // wakes this receipt.
            let woken = Waiter::register(self, end);
            let now = Instant::now();
            let required = self.required(min_replicas, now);
            let confirmed = self
                .progress()
                .values()
                .filter(|p| p.acked >= end && reachable(p, now))
                .count();
            if confirmed >= required {
                return Ok(());
            }
            let (reachable, _) = self.counts(now);
            // In the grace period followers are still coming: wait for them.
            if reachable < required && now.duration_since(self.since) >= GRACE {
                return Err(ReplicationError::Lost {
                    end,
                    reachable,
                    required,
                });
            }
            tokio::select! {
                _ = woken.woken() => {}
                // Followers that stop answering change `required` without moving anything.
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(ReplicationError::Timeout {
                    end,
                    confirmed,
                    required,
                    waited: started.elapsed(),
                });
            }
        }
    }

    /// The followers heard of recently, for `QueryMq` and the trackers, sorted by id;
    /// `end` is the leader's log end and `bytes_after(offset)` the bytes of its records from
    /// `offset` on.
    pub fn info(&self, end: u64, bytes_after: impl Fn(u64) -> u64) -> Vec<FollowerInfo> {
        let now = Instant::now();
        let mut all: Vec<FollowerInfo> = self
            .progress()
            .iter()
            .filter(|(_, p)| now.duration_since(p.heard) < IN_SYNC * 6)
            .map(|(id, p)| FollowerInfo {
                id: id.clone(),
                leader: String::new(),
                acked: p.acked,
                lag: end.saturating_sub(p.acked),
                lag_bytes: bytes_after(p.acked),
                in_sync: in_sync(p, now),
            })
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }
}

/// A receipt's place among those waiting; leaving it (woken or not) takes it out.
struct Waiter<'a> {
    followers: &'a Followers,
    key: (u64, u64),
    woken: Option<oneshot::Receiver<()>>,
}

impl<'a> Waiter<'a> {
    fn register(followers: &'a Followers, end: u64) -> Waiter<'a> {
        let key = (end, followers.next_waiter.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        followers.waiting().insert(key, tx);
        Waiter {
            followers,
            key,
            woken: Some(rx),
        }
    }

    /// Resolves once a confirmation reaches this receipt's offset or a follower goes.
    async fn woken(mut self) {
        if let Some(rx) = self.woken.take() {
            let _ = rx.await;
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.followers.waiting().remove(&self.key);
    }
}

fn reachable(p: &Progress, now: Instant) -> bool {
    now.duration_since(p.heard) < REACHABLE
}

fn in_sync(p: &Progress, now: Instant) -> bool {
    reachable(p, now)
        && p.caught_up
            .is_some_and(|at| now.duration_since(at) < IN_SYNC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_receipt_waits_for_the_followers_in_sync() {
        let followers = std::sync::Arc::new(Followers::default());
        followers.heard("b", 0, 0);
        followers.heard("c", 0, 0);
        assert_eq!(followers.info(0, |_| 0).len(), 2);
        let waiting = {
            let followers = followers.clone();
            tokio::spawn(async move { followers.wait_replicated(3, None).await })
        };
        followers.heard("b", 3, 3);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "c is in sync and has not confirmed");
        followers.heard("c", 3, 3);
        waiting.await.unwrap().unwrap();
        let info = followers.info(5, |from| (5 - from) * 10);
        assert_eq!(
            (
                info[0].acked,
                info[0].lag,
                info[0].lag_bytes,
                info[0].in_sync
            ),
            (3, 2, 20, true)
        );
    }

    #[tokio::test]
    async fn a_confirmation_wakes_only_the_receipts_it_covers() {
        let followers = std::sync::Arc::new(Followers::default());
        followers.heard("b", 0, 0);
        let wait = |end| {
            let followers = followers.clone();
            tokio::spawn(async move { followers.wait_replicated(end, None).await })
        };
        let (near, far) = (wait(3), wait(10));
        tokio::task::yield_now().await;
        assert_eq!(followers.waiting().len(), 2);
        followers.heard("b", 5, 10);
        near.await.unwrap().unwrap();
        tokio::task::yield_now().await;
        assert!(!far.is_finished(), "offset 10 is not confirmed yet");
        assert_eq!(
            followers.waiting().keys().map(|k| k.0).collect::<Vec<_>>(),
            [10],
            "only the receipt not covered still waits"
        );
        followers.heard("b", 10, 10);
        far.await.unwrap().unwrap();
        assert!(followers.waiting().is_empty(), "a receipt answered leaves");
    }

    #[tokio::test]
    async fn min_replicas_is_enough() {
        let followers = Followers::default();
        followers.heard("b", 0, 0);
        followers.heard("c", 0, 0);
        followers.heard("b", 7, 7);
        followers.wait_replicated(7, Some(1)).await.unwrap();
        assert_eq!(followers.check_reachable(Some(2)), Ok(()));
    }

    #[tokio::test]
    async fn a_receipt_fails_once_its_follower_is_gone() {
        let followers = std::sync::Arc::new(Followers {
            since: Instant::now().checked_sub(GRACE).unwrap(),
            ..Followers::default()
        });
        followers.heard("b", 0, 0);
        let waiting = {
            let followers = followers.clone();
            tokio::spawn(async move { followers.wait_replicated(1, None).await })
        };
        tokio::task::yield_now().await;
        followers.gone("b");
        let err = waiting.await.unwrap().unwrap_err();
        assert!(
            matches!(err, ReplicationError::Lost { reachable: 0, .. }),
            "{err}"
        );
    }
}
