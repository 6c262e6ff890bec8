//! The dedupe ids one MQ remembers, pure (no I/O, no clock of its own), laid out for the
//! produce path's caches: every produce with a dedupe id looks its id up, and in an MQ
//! taking hundreds of thousands of them a second the table is far larger than the CPU's
//! caches, so each random access into it is a miss.
//!
//! - The ids live in a ring, in the order they were claimed (which is the order they
//!   expire in). A claim appends to it (memory just written), and the produce's outcome
//!   is written back to its ring entry by sequence number, with no second lookup.
//! - The index ([`dedupe_index`](super::dedupe_index)) is a hash set of 8-byte slots: the
//!   low 32 bits of a sequence number (the ring never holds 2³² entries, so they name one
//!   entry) and 32 bits of the key's hash, so a lookup touches a small table and, for a
//!   new id, never the ring: the ring entry is read only when the slot's 32 hash bits
//!   match. Growing the index moves slots by those bits too, without reading the ring (a
//!   random read into a ring far larger than the caches for every id held, at every
//!   doubling). A new id is looked up and slotted in one probe: one cache miss.
//! - A [`Key`] is a 128-bit keyed hash of the id, not the id: fixed size, no allocation.
//!   Two ids would have to collide in 128 bits of two SipHash-1-3 keyed at random per MQ
//!   and process (about n² / 2¹²⁹ for n ids held: 2⁻⁸⁹ at a million), and a producer
//!   cannot aim for a collision without the keys.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

use super::dedupe_index::{self, Index, Probe, Slot};
use qbus_wire::protocol::Durability;
use tokio::sync::oneshot;

/// Most stored ids one MQ remembers; the oldest go first past this.
pub const MAX_IDS: usize = 1 << 20;

/// A dedupe id as the table knows it (see the module's doc): two 64-bit halves, not a
/// `u128`, whose 16-byte alignment would pad every ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(u64, u64);

impl Key {
    /// The 32 bits of its hash the index keeps.
    fn tag(self) -> u32 {
        dedupe_index::tag(self.0)
    }
}

/// Turns ids into [`Key`]s.
#[derive(Clone)]
pub struct Keyer(RandomState, RandomState);

impl Keyer {
    /// The key of `id`.
    pub fn key(&self, id: &str) -> Key {
        Key(self.0.hash_one(id), self.1.hash_one(id))
    }
}

/// Where a record with a dedupe id was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Its offset.
    pub offset: u64,
    /// When its window started, ms since the Unix epoch.
    pub at_ms: u64,
    /// How durable it was when acknowledged.
    pub durability: Durability,
}

/// A repeat waiting for the outcome of a pending id (`None`: its produce failed).
pub type Waiter = oneshot::Sender<Option<Stored>>;

#[derive(Debug, Clone, Copy)]
enum State {
    /// Claimed by a produce whose append is on its way.
    Pending,
    /// Stored at the entry's offset, this durable when acknowledged.
    Stored(Durability),
    /// Its produce failed: out of the index, left in the ring until the front reaches it.
    Dead,
}

/// 40 bytes: a million of them are held, written once each.
struct Entry {
    key: Key,
    /// When claimed (pending) or when its window started (stored).
    at_ms: u64,
    /// Where it was stored (stored only).
    offset: u64,
    state: State,
}

impl Entry {
    fn stored(&self) -> Option<Stored> {
        match self.state {
            State::Stored(durability) => Some(Stored {
                offset: self.offset,
                at_ms: self.at_ms,
                durability,
            }),
            _ => None,
        }
    }
}

/// What the table says about an id.
pub enum Found {
    /// Not held: the caller's claim is the id's sequence number.
    Claimed(u64),
    /// Stored within the window.
    Stored(Stored),
    /// Claimed by a produce still storing it: the outcome comes to the receiver.
    Pending(oneshot::Receiver<Option<Stored>>),
}

/// The table (see the module's doc).
pub struct Table {
    keyer: Keyer,
    /// The slots of the live (pending or stored) entries, by their key's tag; and stale
    /// ones (see [`Table::expire`]).
    index: Index,
    ring: Ring,
    /// Index slots still naming entries that left the ring (see [`Table::expire`]).
    stale: usize,
    /// Repeats waiting for a pending entry, by its sequence number (few, and short-lived).
    waiters: HashMap<u64, Vec<Waiter>>,
}

/// Entries by sequence number: `entries[i]` is number `first + i`.
#[derive(Default)]
struct Ring {
    entries: VecDeque<Entry>,
    first: u64,
}

impl Ring {
    /// Where the entry an index slot names is, if it is still in the ring.
    fn position(&self, slot: u32) -> Option<usize> {
        let position = slot.wrapping_sub(self.first as u32) as usize;
        (position < self.entries.len()).then_some(position)
    }

    fn seq(&self, position: usize) -> u64 {
        self.first + position as u64
    }

    fn get(&self, seq: u64) -> Option<&Entry> {
        self.entries
            .get(usize::try_from(seq.checked_sub(self.first)?).ok()?)
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut Entry> {
        self.entries
            .get_mut(usize::try_from(seq.checked_sub(self.first)?).ok()?)
    }

    /// True when `slot` names the entry of `key`: compares the tags first, so the ring is
    /// read only for a match of 32 hash bits.
    fn holds(&self, slot: Slot, key: Key) -> bool {
        slot.tag == key.tag()
            && self
                .position(slot.seq)
                .is_some_and(|p| self.entries[p].key == key)
    }

    fn push(&mut self, key: Key, at_ms: u64, offset: u64, state: State) -> u64 {
        self.entries.push_back(Entry {
            key,
            at_ms,
            offset,
            state,
        });
        self.seq(self.entries.len() - 1)
    }
}

impl Default for Table {
    fn default() -> Table {
        Table {
            keyer: Keyer(RandomState::new(), RandomState::new()),
            index: Index::default(),
            ring: Ring::default(),
            stale: 0,
            waiters: HashMap::new(),
        }
    }
}

impl Table {
    /// Its keyer, for ids hashed away from the table (the rebuild from the log).
    pub fn keyer(&self) -> &Keyer {
        &self.keyer
    }

    /// Ids held now (pending or stored).
    pub fn len(&self) -> usize {
        self.index.len() - self.stale
    }

    fn find(&self, key: Key) -> Option<u64> {
        let ring = &self.ring;
        match self.index.probe(key.tag(), |slot| ring.holds(slot, key)) {
            Probe::Found(_, slot) => Some(ring.seq(ring.position(slot.seq)?)),
            Probe::Vacant(_) => None,
        }
    }

    /// Appends a live entry for `key`, which is not held, and indexes it; returns its
    /// sequence number.
    fn push(&mut self, key: Key, stored: Stored) -> u64 {
        let state = State::Stored(stored.durability);
        let seq = self.ring.push(key, stored.at_ms, stored.offset, state);
        let slot = Slot {
            seq: seq as u32,
            tag: key.tag(),
        };
        self.index.insert(slot);
        seq
    }

    fn unindex(&mut self, key: Key, seq: u64) {
        if let Probe::Found(place, _) = self.index.probe(key.tag(), |s| s.seq == seq as u32) {
            self.index.remove_at(place);
        }
    }

    /// Looks `id` up; claims it (at `now_ms`) when it is not held.
    pub fn claim(&mut self, id: &str, now_ms: u64) -> Found {
        let key = self.keyer.key(id);
        let ring = &mut self.ring;
        let next = Slot {
            seq: ring.seq(ring.entries.len()) as u32,
            tag: key.tag(),
        };
        let position = match self.index.probe(key.tag(), |slot| ring.holds(slot, key)) {
            Probe::Found(place, slot) => match ring.position(slot.seq) {
                Some(position) => position,
                // `holds` matched only slots inside the ring, but should one not be, the
                // slot is simply taken over.
                None => {
                    self.index.replace_at(place, next);
                    return Found::Claimed(ring.push(key, now_ms, 0, State::Pending));
                }
            },
            Probe::Vacant(place) => {
                self.index.insert_at(place, next);
                return Found::Claimed(ring.push(key, now_ms, 0, State::Pending));
            }
        };
        let seq = ring.seq(position);
        match ring.entries[position].stored() {
            Some(stored) => Found::Stored(stored),
            None => {
                let (tx, rx) = oneshot::channel();
                self.waiters.entry(seq).or_default().push(tx);
                Found::Pending(rx)
            }
        }
    }

    /// Records the claim `seq` as stored, and tells its waiting repeats.
    pub fn store(&mut self, seq: u64, stored: Stored) {
        if let Some(entry) = self.ring.get_mut(seq) {
            entry.state = State::Stored(stored.durability);
            entry.at_ms = stored.at_ms;
            entry.offset = stored.offset;
        }
        // Nearly always none: not even a hash of `seq` then.
        if self.waiters.is_empty() {
            return;
        }
        for waiter in self.waiters.remove(&seq).unwrap_or_default() {
            let _ = waiter.send(Some(stored));
        }
    }

    /// Releases the claim `seq` (its produce failed): the next send with the id is stored.
    pub fn fail(&mut self, seq: u64) {
        if let Some(key) = self.ring.get(seq).map(|e| e.key) {
            self.unindex(key, seq);
        }
        if let Some(entry) = self.ring.get_mut(seq) {
            entry.state = State::Dead;
        }
        for waiter in self.waiters.remove(&seq).unwrap_or_default() {
            let _ = waiter.send(None);
        }
    }

    /// Adds an id found stored in the log (in log order: a later one replaces an earlier).
    pub fn insert_stored(&mut self, key: Key, stored: Stored) {
        if let Some(seq) = self.find(key) {
            self.unindex(key, seq);
            if let Some(entry) = self.ring.get_mut(seq) {
                entry.state = State::Dead;
            }
        }
        self.push(key, stored);
    }

    /// Forgets stored ids older than the window, and the oldest ones past [`MAX_IDS`].
    /// Returns how many went early. A pending entry at the front holds the rest back (for
    /// the few milliseconds its append takes).
    ///
    /// An expired entry leaves the ring but not the index: finding its slot would be one
    /// more miss into a table far larger than the caches on every produce, while a slot
    /// whose sequence number is below the ring's front matches no key anyway. The stale
    /// slots are swept in one pass over the index once they are as many as half the live
    /// ones, which costs a few nanoseconds per expired id.
    pub fn expire(&mut self, now_ms: u64, window_ms: u64) -> u64 {
        let mut early = 0;
        while let Some(front) = self.ring.entries.front() {
            let full = self.len() > MAX_IDS;
            match front.state {
                State::Pending => break,
                State::Stored(_) if !full && front.at_ms.saturating_add(window_ms) > now_ms => {
                    break
                }
                State::Stored(_) => {
                    self.stale += 1;
                    early += u64::from(full);
                }
                State::Dead => {}
            }
            self.ring.entries.pop_front();
            self.ring.first += 1;
        }
        if self.stale > 1024 && self.stale > self.len() / 2 {
            let ring = &self.ring;
            self.index.retain(|slot| ring.position(slot.seq).is_some());
            self.stale = 0;
        }
        early
    }
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

    fn claimed(found: Found) -> u64 {
        match found {
            Found::Claimed(seq) => seq,
            _ => panic!("expected a new claim"),
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
    fn a_claim_then_a_repeat_then_expiry_then_a_new_claim() {
        let mut table = Table::default();
        let a = claimed(table.claim("a", 1_000));
        let Found::Pending(mut waiting) = table.claim("a", 1_001) else {
            panic!("a is pending")
        };
        table.store(a, stored(7, 1_000));
        assert_eq!(waiting.try_recv(), Ok(Some(stored(7, 1_000))));
        assert!(matches!(table.claim("a", 1_500), Found::Stored(s) if s.offset == 7));
        let b = claimed(table.claim("b", 1_500));
        table.store(b, stored(8, 1_500));
        assert_eq!(table.expire(1_999, 1_000), 0);
        assert_eq!(table.len(), 2);
        assert_eq!(table.expire(2_100, 1_000), 0);
        assert_eq!(table.len(), 1, "a's window ended at 2 000");
        let again = claimed(table.claim("a", 2_100));
        table.store(again, stored(9, 2_100));
        assert!(matches!(table.claim("b", 2_200), Found::Stored(s) if s.offset == 8));
        table.expire(2_600, 1_000);
        assert!(matches!(table.claim("a", 2_600), Found::Stored(s) if s.offset == 9));
        table.expire(3_200, 1_000);
        assert_eq!(table.len(), 0);
        assert!(table.ring.entries.is_empty());
    }

    #[test]
    fn a_failed_claim_wakes_its_repeats_with_nothing_and_frees_the_id() {
        let mut table = Table::default();
        let x = claimed(table.claim("x", 10));
        let Found::Pending(mut waiting) = table.claim("x", 11) else {
            panic!("x is pending")
        };
        table.fail(x);
        assert_eq!(waiting.try_recv(), Ok(None));
        let retry = claimed(table.claim("x", 12));
        assert_ne!(retry, x);
        table.store(retry, stored(3, 12));
        assert_eq!(table.expire(13, 1_000), 0);
        assert_eq!(
            table.len(),
            1,
            "the dead claim left the ring, the retry stays"
        );
    }

    #[test]
    fn a_full_table_forgets_its_oldest_ids_first() {
        let mut table = Table::default();
        for i in 0..=MAX_IDS as u64 {
            // Keys as a keyed hash spreads them: a tag (the high half of the first word)
            // from every one.
            let key = Key(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), i);
            table.insert_stored(key, stored(i, 10));
        }
        assert_eq!(table.expire(10, 60_000), 1);
        assert_eq!(table.len(), MAX_IDS);
        assert_eq!(table.find(Key(0, 0)), None);
        assert!(table.find(Key(0x9E37_79B9_7F4A_7C15, 1)).is_some());
    }

    #[test]
    fn expired_ids_leave_no_slots_behind_for_long() {
        let mut table = Table::default();
        for i in 0..100_000u64 {
            let seq = claimed(table.claim(&format!("id-{i}"), i));
            table.store(seq, stored(i, i));
            table.expire(i, 1_000);
            assert!(table.len() <= 1_001);
            assert!(
                table.index.len() <= 3 * 1_024,
                "stale slots swept: {} slots for {} ids",
                table.index.len(),
                table.len()
            );
        }
        assert!(matches!(table.claim("id-99999", 100_000), Found::Stored(s) if s.offset == 99_999));
        assert!(matches!(table.claim("id-5", 100_000), Found::Claimed(_)));
    }

    #[test]
    fn entries_and_slots_stay_small() {
        // A million of each are held: a byte more is a megabyte more, and caches missed.
        assert_eq!(std::mem::size_of::<Entry>(), 40);
    }

    #[test]
    fn the_log_order_wins_when_rebuilding() {
        let mut table = Table::default();
        let key = table.keyer.key("k");
        table.insert_stored(key, stored(1, 10));
        table.insert_stored(key, stored(5, 20));
        assert_eq!(table.len(), 1);
        assert!(matches!(table.claim("k", 30), Found::Stored(s) if s.offset == 5));
    }
}
