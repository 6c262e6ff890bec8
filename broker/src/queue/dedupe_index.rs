//! The index of the dedupe table ([`dedupe_table`](super::dedupe_table)): a hash set of
//! 8-byte slots, open addressing with linear probing, laid out so that a lookup of a new
//! id (the produce path's common case, into a table far larger than the caches) costs
//! one cache miss, and its insertion none more: the slot found empty is in the line just
//! read. (A SwissTable keeps its control bytes apart from its slots: two misses.)
//!
//! A slot is a [`Slot`]: a sequence number's low 32 bits and 32 bits of its key's hash,
//! never zero (the tag's low bit is set), so zero marks an empty place. Where a slot lives
//! comes from its tag alone, so growing moves slots without reading anything else.

/// An entry of the index: what it names (`seq`) and the hash bits it is found by (`tag`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The low 32 bits of the entry's sequence number.
    pub seq: u32,
    /// 32 bits of the entry key's hash, low bit set (see [`tag`]).
    pub tag: u32,
}

/// The tag of a key whose hash is `hash`: 32 of its bits, the low one set so that no
/// slot is zero.
pub fn tag(hash: u64) -> u32 {
    (hash >> 32) as u32 | 1
}

impl Slot {
    fn pack(self) -> u64 {
        u64::from(self.tag) << 32 | u64::from(self.seq)
    }

    fn unpack(raw: u64) -> Slot {
        Slot {
            seq: raw as u32,
            tag: (raw >> 32) as u32,
        }
    }
}

/// Smallest table, in slots (a power of two).
const MIN_SLOTS: usize = 64;

/// What a probe found.
pub enum Probe {
    /// A slot the predicate accepted, at this place.
    Found(usize, Slot),
    /// None: the place where one would go.
    Vacant(usize),
}

/// The index (see the module's doc).
#[derive(Default)]
pub struct Index {
    /// Packed slots, zero for empty; empty or a power of two long.
    slots: Vec<u64>,
    len: usize,
}

impl Index {
    /// Slots held.
    pub fn len(&self) -> usize {
        self.len
    }

    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// Where slots of `tag` start probing. Bit 0 of a tag is always set: the place uses
    /// the bits above it.
    fn home(&self, tag: u32) -> usize {
        (tag >> 1) as usize & self.mask()
    }

    /// Looks for a slot of `tag` that `accept` takes, stopping at the first empty place.
    pub fn probe(&self, tag: u32, mut accept: impl FnMut(Slot) -> bool) -> Probe {
        if self.slots.is_empty() {
            return Probe::Vacant(usize::MAX);
        }
        let mut at = self.home(tag);
        loop {
            let raw = self.slots[at];
            if raw == 0 {
                return Probe::Vacant(at);
            }
            let slot = Slot::unpack(raw);
            if slot.tag == tag && accept(slot) {
                return Probe::Found(at, slot);
            }
            at = (at + 1) & self.mask();
        }
    }

    /// True when one more slot would fill the table past three quarters (a probe must
    /// always end at an empty place, and stay short).
    fn full(&self) -> bool {
        (self.len + 1) * 4 > self.slots.len() * 3
    }

    /// Puts `slot` at `place`, the vacant place a probe for its tag just returned (nothing
    /// changed the index in between), or where it goes once the index has grown.
    pub fn insert_at(&mut self, place: usize, slot: Slot) {
        if self.full() {
            self.insert(slot);
            return;
        }
        self.slots[place] = slot.pack();
        self.len += 1;
    }

    /// Adds `slot` (whatever is there already), growing the index when it is full.
    pub fn insert(&mut self, slot: Slot) {
        if self.full() {
            self.grow();
        }
        let mut at = self.home(slot.tag);
        while self.slots[at] != 0 {
            at = (at + 1) & self.mask();
        }
        self.slots[at] = slot.pack();
        self.len += 1;
    }

    /// Replaces the slot at `place` (found by a probe for the same tag).
    pub fn replace_at(&mut self, place: usize, slot: Slot) {
        self.slots[place] = slot.pack();
    }

    /// Removes the slot at `place`, moving back the slots after it that probed past it
    /// (no tombstones: probes stay as short as the load allows).
    pub fn remove_at(&mut self, place: usize) {
        let mask = self.mask();
        let mut hole = place;
        let mut at = place;
        loop {
            at = (at + 1) & mask;
            let raw = self.slots[at];
            if raw == 0 {
                break;
            }
            let home = self.home(Slot::unpack(raw).tag);
            // It may fill the hole unless its home lies after the hole, up to it.
            if at.wrapping_sub(home) & mask >= at.wrapping_sub(hole) & mask {
                self.slots[hole] = raw;
                hole = at;
            }
        }
        self.slots[hole] = 0;
        self.len -= 1;
    }

    /// Keeps the slots `keep` takes, in one pass.
    pub fn retain(&mut self, mut keep: impl FnMut(Slot) -> bool) {
        let kept: Vec<Slot> = self
            .slots
            .iter()
            .filter(|&&raw| raw != 0)
            .map(|&raw| Slot::unpack(raw))
            .filter(|&slot| keep(slot))
            .collect();
        self.rebuild(self.slots.len(), kept);
    }

    /// Doubles the table, moving every slot by its tag.
    fn grow(&mut self) {
        let kept: Vec<Slot> = self
            .slots
            .iter()
            .filter(|&&raw| raw != 0)
            .map(|&raw| Slot::unpack(raw))
            .collect();
        self.rebuild((self.slots.len() * 2).max(MIN_SLOTS), kept);
    }

    fn rebuild(&mut self, size: usize, slots: Vec<Slot>) {
        self.slots = vec![0; size];
        self.len = 0;
        for slot in slots {
            self.insert(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(seq: u32, tag: u32) -> Slot {
        Slot { seq, tag: tag | 1 }
    }

    fn find(index: &Index, s: Slot) -> Option<usize> {
        match index.probe(s.tag, |found| found == s) {
            Probe::Found(at, _) => Some(at),
            Probe::Vacant(_) => None,
        }
    }

    #[test]
    fn slots_go_in_are_found_and_grow_along() {
        let mut index = Index::default();
        let all: Vec<Slot> = (0..10_000u32)
            .map(|i| slot(i, i.wrapping_mul(0x9E37_79B9)))
            .collect();
        for s in &all {
            assert!(find(&index, *s).is_none());
            index.insert(*s);
        }
        assert_eq!(index.len(), all.len());
        assert!(index.slots.len() * 3 >= all.len() * 4);
        for s in &all {
            assert!(find(&index, *s).is_some(), "{s:?}");
        }
    }

    #[test]
    fn removal_keeps_every_other_slot_findable_even_in_long_runs() {
        let mut index = Index::default();
        // Few distinct homes: long probe runs that wrap around the table's end.
        let all: Vec<Slot> = (0..40u32)
            .map(|i| slot(i, (i % 3) << 1 | 62 << 1))
            .collect();
        for s in &all {
            index.insert(*s);
        }
        for (n, s) in all.iter().enumerate().filter(|(n, _)| n % 2 == 0) {
            let at = find(&index, *s).unwrap_or_else(|| panic!("slot {n}"));
            index.remove_at(at);
            assert!(find(&index, *s).is_none());
            for (m, other) in all.iter().enumerate().skip(n + 1) {
                assert!(
                    find(&index, *other).is_some(),
                    "slot {m} after removing {n}"
                );
            }
        }
        assert_eq!(index.len(), 20);
        index.retain(|s| s.seq % 4 == 1);
        assert_eq!(index.len(), 10);
        for s in &all {
            assert_eq!(find(&index, *s).is_some(), s.seq % 4 == 1, "{s:?}");
        }
    }

    #[test]
    fn a_slot_is_never_zero() {
        assert_eq!(tag(0) & 1, 1);
        assert_ne!(slot(0, tag(0)).pack(), 0);
    }
}
