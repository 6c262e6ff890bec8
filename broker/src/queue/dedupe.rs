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
//! - At most [`MAX_IDS`](super::dedupe_table::MAX_IDS) ids per MQ; past that the oldest are forgotten early
//!   (counted), so a flood of unique ids costs bounded memory.
//! - The table itself (its layout, and the keyed hash it keeps instead of each id) is
//!   [`dedupe_table`](super::dedupe_table).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use qbus_wire::now_ms;
use qbus_wire::protocol::record::{records, RecordError, RecordRef};
use qbus_wire::protocol::Durability;
use tokio::sync::{oneshot, OnceCell};

use super::blocking;
use super::dedupe_table::{Found, Key, Keyer, Stored, Table, MAX_IDS};
use super::group_commit::AppendWait;
use crate::error::BrokerError;
use crate::store::{Appended, LogReader, StoreError};

/// How long an MQ remembers a dedupe id when its options do not say (NATS's default).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(120);
/// Records read per step while rebuilding the table from the log.
const SCAN_RECORDS: usize = 4096;
const SCAN_BYTES: usize = 1 << 20;

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
    /// The claims' sequence numbers in the table.
    ids: Vec<Option<u64>>,
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
        self.table.lock().expect("dedupe table poisoned").len()
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
            for record in records(&body) {
                let repeat = match verified(record)?.dedupe_id {
                    None => None,
                    Some(id) => match table.claim(id, at_ms) {
                        Found::Claimed(seq) => {
                            ids.push(Some(seq));
                            if !places.is_empty() {
                                places.push(Place::New(ids.len() as u64 - 1));
                            }
                            continue;
                        }
                        Found::Stored(stored) => Some(Place::Known(stored)),
                        Found::Pending(rx) => Some(Place::Waiting(rx)),
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
                    .keyer()
                    .clone();
                let found = blocking("dedupe rebuild", move || {
                    scan(&reader, &keyer, from, window_ms)
                })
                .await?;
                let mut table = self.table.lock().expect("dedupe table poisoned");
                let count = found.len();
                for (key, stored) in found {
                    table.insert_stored(key, stored);
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
            // A timer's due copy of a delayed record keeps the original's dedupe id (its
            // consumers see it) but claims nothing: the id belongs to the original, whose
            // offset and time a repeat is answered with.
            if record.copy_of().is_some() {
                continue;
            }
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
