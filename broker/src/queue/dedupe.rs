//! Exactly-once produce by dedupe id (as NATS `Msg-Id`): each MQ remembers the dedupe ids
//! of the records it stored within its window, and a produce that repeats one is answered
//! with the original's offset instead of being stored again.
//!
//! - An id is *pending* from the moment a produce claims it until the commit thread says
//!   how its append went; a repeat meanwhile waits for that outcome (the original may
//!   still fail, and then nothing was stored to point at). Claims are resolved by the
//!   session's receipt task in the order of the appends, never behind another session, so
//!   two sessions repeating each other's ids cannot wait on each other.
//! - Then it is *stored* (offset, time) until the window has passed since its append.
//! - The table is not persisted: the records carry their ids, so after a restart the first
//!   dedupe produce of an MQ rebuilds it from the part of the log that may lie within the
//!   window (segments older than the window are not read). MQs that never see a dedupe id
//!   never read anything.
//! - At most [`MAX_IDS`] stored ids per MQ; past that the oldest are forgotten early
//!   (counted), so a flood of unique ids costs bounded memory.
//! - The table keeps a 128-bit keyed hash of each id ([`Key`]), not the id: a fixed 16
//!   bytes with no allocation, whatever the id's length. Two different ids would have to
//!   collide in 128 bits of two SipHash-1-3 with keys random per broker process and MQ
//!   (chance about n² / 2¹²⁹ for n ids held: 2⁻⁸⁹ at a million), and a producer cannot
//!   aim for a collision without the keys.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use qbus_wire::now_ms;
use qbus_wire::protocol::record::{records, RecordError, RecordRef};
use qbus_wire::protocol::Durability;
use tokio::sync::{oneshot, OnceCell};

use super::blocking;
use super::group_commit::AppendWait;
use crate::error::BrokerError;
use crate::store::{Appended, LogReader, StoreError};

/// How long an MQ remembers a dedupe id when its options do not say (NATS's default).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(120);
/// Most stored dedupe ids one MQ remembers; the oldest go first past this.
pub const MAX_IDS: usize = 1 << 20;
/// Records read per step while rebuilding the table from the log.
const SCAN_RECORDS: usize = 4096;
const SCAN_BYTES: usize = 1 << 20;

/// Where a record with a dedupe id was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stored {
    offset: u64,
    at_ms: u64,
    durability: Durability,
}

enum Slot {
    /// A produce claimed the id; these repeats wait for its outcome (`None`: it failed).
    Pending(Vec<oneshot::Sender<Option<Stored>>>),
    Stored(Stored),
}

/// A dedupe id as the table knows it (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key(u128);

/// Turns ids into [`Key`]s.
#[derive(Clone)]
struct Keyer(RandomState, RandomState);

impl Keyer {
    fn key(&self, id: &str) -> Key {
        Key(u128::from(self.0.hash_one(id)) << 64 | u128::from(self.1.hash_one(id)))
    }
}

/// The table's own hasher: a [`Key`] is already a keyed hash, so its low half is used
/// as it is.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = key as u64;
    }
}

struct Table {
    keyer: Keyer,
    slots: HashMap<Key, Slot, BuildHasherDefault<KeyHasher>>,
    /// Stored ids in the order they were stored, for expiry.
    order: VecDeque<(u64, Key)>,
}

impl Default for Table {
    fn default() -> Table {
        Table {
            keyer: Keyer(RandomState::new(), RandomState::new()),
            slots: HashMap::default(),
            order: VecDeque::new(),
        }
    }
}

impl Table {
    /// Forgets stored ids older than the window, and the oldest ones past [`MAX_IDS`].
    /// Returns how many went early.
    fn expire(&mut self, now_ms: u64, window_ms: u64) -> u64 {
        let mut early = 0;
        while let Some((at_ms, _)) = self.order.front() {
            let full = self.order.len() > MAX_IDS;
            if !full && at_ms.saturating_add(window_ms) > now_ms {
                break;
            }
            let Some((at_ms, id)) = self.order.pop_front() else {
                break;
            };
            // A later store of the same id (after an expiry) has its own, later entry.
            if let Entry::Occupied(slot) = self.slots.entry(id) {
                if matches!(slot.get(), Slot::Stored(s) if s.at_ms == at_ms) {
                    slot.remove();
                    early += u64::from(full);
                }
            }
        }
        early
    }

    fn store(&mut self, id: Key, stored: Stored) {
        let before = match self.slots.get_mut(&id) {
            Some(slot) => std::mem::replace(slot, Slot::Stored(stored)),
            None => {
                self.slots.insert(id, Slot::Stored(stored));
                Slot::Pending(Vec::new())
            }
        };
        self.order.push_back((stored.at_ms, id));
        if let Slot::Pending(waiters) = before {
            for waiter in waiters {
                let _ = waiter.send(Some(stored));
            }
        }
    }

    fn fail(&mut self, id: Key) {
        if let Some(Slot::Pending(waiters)) = self.slots.remove(&id) {
            for waiter in waiters {
                let _ = waiter.send(None);
            }
        }
    }
}

/// One MQ's dedupe table.
pub struct Dedupe {
    window_ms: u64,
    table: Mutex<Table>,
    /// Set once the table holds what the log had at open.
    rebuilt: OnceCell<()>,
    /// The first offset that may hold a record within the window, as of the open.
    scan_from: u64,
    /// Ids forgotten before their window ended because the table was full.
    evicted: std::sync::atomic::AtomicU64,
}

/// Where one record of a deduplicated produce ends up.
enum Place {
    /// Stored by this produce: its index among the records appended.
    New(u64),
    /// A repeat of a stored record.
    Known(Stored),
    /// A repeat of a record another produce (or an earlier record of this one) is storing.
    Waiting(oneshot::Receiver<Option<Stored>>),
}

/// The ids a produce claimed, one per record it appends (`None`: no dedupe id). Dropped
/// unresolved (the broker is stopping), they are released as failed.
struct Claims {
    dedupe: Arc<Dedupe>,
    ids: Vec<Option<Key>>,
    /// When they were claimed: their window counts from the produce's arrival, read once
    /// for expiry and storing alike (after a restart, from the records' append times).
    at_ms: u64,
}

impl Claims {
    fn resolve(&mut self, outcome: &Result<(Appended, Durability), StoreError>) {
        let ids = std::mem::take(&mut self.ids);
        let mut table = self.dedupe.table.lock().expect("dedupe table poisoned");
        let at_ms = self.at_ms;
        for (index, id) in ids.into_iter().enumerate() {
            let Some(id) = id else { continue };
            match outcome {
                Ok((appended, durability)) => {
                    let stored = Stored {
                        offset: appended.first_offset + index as u64,
                        at_ms,
                        durability: *durability,
                    };
                    table.store(id, stored);
                }
                Err(_) => table.fail(id),
            }
        }
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        if self.ids.iter().any(Option::is_some) {
            let failed = Err(StoreError::Io {
                path: "<dedupe>".into(),
                source: std::io::Error::other("the produce was abandoned"),
            });
            self.resolve(&failed);
        }
    }
}

/// What the broker says about a produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Offset of the first record of the request (a repeat's: its original's).
    pub first_offset: u64,
    /// Records this produce stored.
    pub count: u64,
    /// How durable they were (for repeats: their originals).
    pub durability: Durability,
    /// When some records were repeats: the offset of each record of the request, in order;
    /// empty otherwise.
    pub offsets: Vec<u64>,
}

/// A receipt that waits on another produce's outcome.
pub type LaterReceipt = Pin<Box<dyn Future<Output = Result<Receipt, BrokerError>> + Send>>;

/// How a produce's receipt comes.
pub enum Settled {
    /// Known now.
    Now(Result<Receipt, BrokerError>),
    /// Some of its records repeat records another produce is still storing.
    Later(LaterReceipt),
}

/// A produce in progress.
pub enum ProduceWait {
    /// No dedupe ids: the append is all there is.
    Plain(AppendWait),
    /// Some records carry dedupe ids.
    Deduped(DedupeWait),
}

/// A produce with dedupe ids in progress.
pub struct DedupeWait {
    /// The records it stores, if any.
    append: Option<AppendWait>,
    claims: Claims,
    /// Where each record of the request goes; empty when every one is stored by it.
    places: Vec<Place>,
}

impl ProduceWait {
    /// Waits for this produce's own append and records its ids as stored (or released),
    /// then gives the receipt, or a future of it when it depends on another produce.
    pub async fn settle(self) -> Settled {
        let wait = match self {
            ProduceWait::Plain(wait) => {
                return Settled::Now(
                    wait.wait()
                        .await
                        .map(|(appended, durability)| Receipt {
                            first_offset: appended.first_offset,
                            count: appended.count,
                            durability,
                            offsets: Vec::new(),
                        })
                        .map_err(BrokerError::Store),
                )
            }
            ProduceWait::Deduped(wait) => wait,
        };
        let DedupeWait {
            append,
            mut claims,
            places,
        } = wait;
        let appended = match append {
            Some(append) => {
                let outcome = append.wait().await;
                claims.resolve(&outcome);
                match outcome {
                    Ok(appended) => Some(appended),
                    Err(e) => return Settled::Now(Err(BrokerError::Store(e))),
                }
            }
            None => None,
        };
        if places.iter().any(|p| matches!(p, Place::Waiting(_))) {
            return Settled::Later(Box::pin(receipt(appended, places)));
        }
        // No place waits, so this does not either.
        Settled::Now(receipt(appended, places).await)
    }
}

async fn receipt(
    appended: Option<(Appended, Durability)>,
    places: Vec<Place>,
) -> Result<Receipt, BrokerError> {
    let mut durability = appended.map_or(Durability::Synced, |(_, d)| d);
    if places.is_empty() {
        let (appended, _) = appended.ok_or_else(|| {
            BrokerError::Internal("a produce without repeats stored nothing".into())
        })?;
        return Ok(Receipt {
            first_offset: appended.first_offset,
            count: appended.count,
            durability,
            offsets: Vec::new(),
        });
    }
    let mut offsets = Vec::with_capacity(places.len());
    for place in places {
        let stored = match place {
            Place::New(index) => {
                let first = appended.map_or(0, |(a, _)| a.first_offset);
                offsets.push(first + index);
                continue;
            }
            Place::Known(stored) => stored,
            Place::Waiting(rx) => rx.await.ok().flatten().ok_or_else(|| {
                BrokerError::Unavailable(
                    "a produce with the same dedupe id was being stored and failed; send again"
                        .into(),
                )
            })?,
        };
        durability = durability.min(stored.durability);
        offsets.push(stored.offset);
    }
    Ok(Receipt {
        first_offset: offsets.first().copied().unwrap_or_default(),
        count: appended.map_or(0, |(a, _)| a.count),
        durability,
        offsets,
    })
}

/// The records of a produce sorted into those to store and those already stored.
pub struct Admitted {
    /// Whole records to append (`None`: all were repeats) and how many.
    pub records: Option<(BytesMut, u32)>,
    claims: Claims,
    /// As [`DedupeWait::places`].
    places: Vec<Place>,
}

impl Admitted {
    /// The wait of this produce once `append` (of [`Admitted::records`]) is staged.
    pub fn into_wait(self, append: Option<AppendWait>) -> ProduceWait {
        ProduceWait::Deduped(DedupeWait {
            append,
            claims: self.claims,
            places: self.places,
        })
    }
}

impl Dedupe {
    /// The table of an MQ whose window is `window` (zero: off) and whose log, at open, may
    /// hold records within it from `scan_from` on.
    pub fn new(window: Duration, scan_from: u64) -> Arc<Dedupe> {
        Arc::new(Dedupe {
            window_ms: window.as_millis().try_into().unwrap_or(u64::MAX),
            table: Mutex::new(Table::default()),
            rebuilt: OnceCell::new(),
            scan_from,
            evicted: Default::default(),
        })
    }

    /// The window; zero when deduplication is off.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// Ids forgotten before their window ended because [`MAX_IDS`] were held.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stored ids held now.
    pub fn held(&self) -> usize {
        self.table
            .lock()
            .expect("dedupe table poisoned")
            .order
            .len()
    }

    /// Forgets the ids whose window has passed.
    pub fn expire(&self) {
        let early = self
            .table
            .lock()
            .expect("dedupe table poisoned")
            .expire(now_ms(), self.window_ms);
        self.count_evicted(early);
    }

    fn count_evicted(&self, early: u64) {
        if early == 0 {
            return;
        }
        let before = self
            .evicted
            .fetch_add(early, std::sync::atomic::Ordering::Relaxed);
        // Once when it starts, then once per MAX_IDS more: a full table evicts on every
        // produce, and a line each would cost more than the produce.
        if before / MAX_IDS as u64 != (before + early) / MAX_IDS as u64 || before == 0 {
            tracing::warn!(
                evicted = before + early,
                max = MAX_IDS,
                "dedupe table full: oldest ids forgotten before their window ended"
            );
        }
    }

    /// Sorts the `count` verified records of `body` into new ones (their ids claimed) and
    /// repeats, after rebuilding the table from `reader` if this is the first time.
    pub async fn admit(
        self: &Arc<Self>,
        reader: &LogReader,
        body: Bytes,
        count: u32,
    ) -> Result<Admitted, BrokerError> {
        self.rebuild(reader).await?;
        let at_ms = now_ms();
        // Filled only from the first repeat on: most produces repeat nothing.
        let mut places = Vec::new();
        let mut ids = Vec::with_capacity(count as usize);
        {
            let mut table = self.table.lock().expect("dedupe table poisoned");
            let early = table.expire(at_ms, self.window_ms);
            self.count_evicted(early);
            let Table { keyer, slots, .. } = &mut *table;
            for record in records(&body) {
                let repeat = match verified(record)?.dedupe_id {
                    None => None,
                    Some(id) => match slots.entry(keyer.key(id)) {
                        Entry::Occupied(mut slot) => match slot.get_mut() {
                            Slot::Stored(stored) => Some(Place::Known(*stored)),
                            Slot::Pending(waiters) => {
                                let (tx, rx) = oneshot::channel();
                                waiters.push(tx);
                                Some(Place::Waiting(rx))
                            }
                        },
                        Entry::Vacant(slot) => {
                            ids.push(Some(*slot.key()));
                            slot.insert(Slot::Pending(Vec::new()));
                            if !places.is_empty() {
                                places.push(Place::New(ids.len() as u64 - 1));
                            }
                            continue;
                        }
                    },
                };
                match repeat {
                    Some(repeat) => {
                        if places.is_empty() {
                            places.extend((0..ids.len() as u64).map(Place::New));
                        }
                        places.push(repeat);
                    }
                    None => {
                        ids.push(None);
                        if !places.is_empty() {
                            places.push(Place::New(ids.len() as u64 - 1));
                        }
                    }
                }
            }
        }
        let stored = ids.len() as u32;
        let records = if places.is_empty() {
            Some((BytesMut::from(body), stored))
        } else if stored == 0 {
            None
        } else {
            let mut out = BytesMut::with_capacity(body.len());
            for (record, place) in records(&body).zip(&places) {
                if matches!(place, Place::New(_)) {
                    let record = verified(record)?;
                    let start = record.body_range.end - record.size;
                    out.extend_from_slice(&body[start..record.body_range.end]);
                }
            }
            Some((out, stored))
        };
        Ok(Admitted {
            records,
            claims: Claims {
                dedupe: self.clone(),
                ids,
                at_ms,
            },
            places,
        })
    }

    /// Fills the table from the log, once.
    async fn rebuild(&self, reader: &LogReader) -> Result<(), BrokerError> {
        self.rebuilt
            .get_or_try_init(|| async {
                let (reader, from, window_ms) = (reader.clone(), self.scan_from, self.window_ms);
                let keyer = self
                    .table
                    .lock()
                    .expect("dedupe table poisoned")
                    .keyer
                    .clone();
                let found = blocking("dedupe rebuild", move || {
                    scan(&reader, &keyer, from, window_ms)
                })
                .await?;
                let mut table = self.table.lock().expect("dedupe table poisoned");
                let count = found.len();
                for (id, stored) in found {
                    table.store(id, stored);
                }
                let early = table.expire(now_ms(), window_ms);
                drop(table);
                self.count_evicted(early);
                if count > 0 {
                    tracing::info!(ids = count, "dedupe table rebuilt from the log");
                }
                Ok::<(), BrokerError>(())
            })
            .await?;
        Ok(())
    }
}

/// A record of a produce the session already verified; a failure here is a bug, not bad
/// input.
fn verified(record: Result<RecordRef<'_>, RecordError>) -> Result<RecordRef<'_>, BrokerError> {
    record.map_err(|e| BrokerError::Internal(format!("verified record unreadable: {e}")))
}

/// The dedupe ids of the records from `from` to the end whose window has not passed, in
/// log order. Damaged stretches are passed over (their records cannot be served either).
/// Blocking.
fn scan(
    reader: &LogReader,
    keyer: &Keyer,
    from: u64,
    window_ms: u64,
) -> Result<Vec<(Key, Stored)>, StoreError> {
    let cutoff = now_ms().saturating_sub(window_ms);
    let end = reader.end_offset();
    let mut found = Vec::new();
    let (mut from, mut pos) = (from.max(reader.first_offset()), None);
    while from < end {
        let batch = match reader.read(from, pos, SCAN_RECORDS, SCAN_BYTES) {
            Ok(batch) => batch,
            Err(e) if e.is_damage() => {
                let skip = reader.skip_damage(from)?;
                (from, pos) = (skip.next_offset, Some(skip.next_pos));
                continue;
            }
            Err(e) => return Err(e),
        };
        if batch.count == 0 {
            break;
        }
        for record in records(&batch.data) {
            let Ok(record) = record else { break };
            if let Some(id) = record.dedupe_id {
                if record.timestamp_ms >= cutoff {
                    let stored = Stored {
                        offset: record.offset,
                        at_ms: record.timestamp_ms,
                        durability: Durability::Written,
                    };
                    found.push((keyer.key(id), stored));
                }
            }
        }
        (from, pos) = (batch.next_offset, Some(batch.next_pos));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(offset: u64, at_ms: u64) -> Stored {
        Stored {
            offset,
            at_ms,
            durability: Durability::Synced,
        }
    }

    #[test]
    fn different_ids_get_different_keys_and_one_id_always_the_same() {
        let table = Table::default();
        let keys: std::collections::HashSet<Key> = (0..100_000)
            .map(|i| table.keyer.key(&format!("id-{i}")))
            .collect();
        assert_eq!(keys.len(), 100_000);
        assert_eq!(table.keyer.key("id-7"), table.keyer.key("id-7"));
        assert_ne!(Table::default().keyer.key("id-7"), table.keyer.key("id-7"));
    }

    #[test]
    fn ids_expire_after_the_window_and_a_later_store_outlives_an_earlier_entry() {
        let mut table = Table::default();
        let (a, b) = (table.keyer.key("a"), table.keyer.key("b"));
        table.store(a, stored(0, 1_000));
        table.store(b, stored(1, 1_500));
        assert_eq!(table.expire(1_999, 1_000), 0);
        assert!(table.slots.contains_key(&a) && table.slots.contains_key(&b));
        assert_eq!(table.expire(2_100, 1_000), 0);
        assert!(!table.slots.contains_key(&a), "a's window ended at 2 000");
        // "b" stored again later (as after its expiry): the old entry must not remove it.
        table.store(b, stored(5, 2_400));
        table.expire(2_600, 1_000);
        assert!(matches!(table.slots.get(&b), Some(Slot::Stored(s)) if s.offset == 5));
        table.expire(3_500, 1_000);
        assert!(table.slots.is_empty() && table.order.is_empty());
    }

    #[test]
    fn a_full_table_forgets_its_oldest_ids_first() {
        let mut table = Table::default();
        for i in 0..=MAX_IDS as u64 {
            table.store(Key(i.into()), stored(i, 10));
        }
        assert_eq!(table.expire(10, 60_000), 1);
        assert!(!table.slots.contains_key(&Key(0)));
        assert!(table.slots.contains_key(&Key(1)));
        assert_eq!(table.order.len(), MAX_IDS);
    }

    #[test]
    fn a_failed_claim_wakes_its_repeats_with_nothing() {
        let mut table = Table::default();
        let (tx, mut rx) = oneshot::channel();
        let x = table.keyer.key("x");
        table.slots.insert(x, Slot::Pending(vec![tx]));
        table.fail(x);
        assert_eq!(rx.try_recv(), Ok(None));
        assert!(
            table.slots.is_empty(),
            "the next send with the id is stored"
        );
    }
}
