//! A map keyed by log offsets for a group's deliveries awaiting an ack.
//!
//! Deliveries go out in offset order and acks mostly come back in that order, so the
//! entries live in a deque sorted by offset: an insert past the last offset is a push, a
//! lookup finds the slot at its distance from the front (a binary search when the offsets
//! have gaps), and a removal leaves a hole that is popped once it reaches the front. A `BTreeMap` did the same with an allocation and a tree walk per delivery, which
//! was the largest item of a fan-out profile. Holes behind an entry that stays out long
//! (a slow consumer) are squeezed out once they outnumber the entries, so the deque stays
//! within twice the entries it holds.

use std::collections::VecDeque;

/// Offsets to values, sorted; see the module doc.
#[derive(Debug)]
pub struct OffsetMap<V> {
    /// Ascending offsets, each once; `None` for a removed entry not yet squeezed out. The
    /// front is never a hole.
    slots: VecDeque<(u64, Option<V>)>,
    len: usize,
}

impl<V> Default for OffsetMap<V> {
    fn default() -> Self {
        OffsetMap {
            slots: VecDeque::new(),
            len: 0,
        }
    }
}

/// Below this many slots holes are left to the front's popping alone.
const SQUEEZE_ABOVE: usize = 64;

impl<V> OffsetMap<V> {
    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The lowest offset held.
    pub fn first_offset(&self) -> Option<u64> {
        self.slots.front().map(|&(offset, _)| offset)
    }

    fn find(&self, offset: u64) -> Result<usize, usize> {
        let Some(&(first, _)) = self.slots.front() else {
            return Err(0);
        };
        if offset < first {
            return Err(0);
        }
        // Deliveries are mostly consecutive offsets: then the slot is at its distance from
        // the front, and no search is needed.
        let guess = usize::try_from(offset - first).unwrap_or(usize::MAX);
        if self.slots.get(guess).is_some_and(|&(o, _)| o == offset) {
            return Ok(guess);
        }
        match self.slots.back() {
            Some(&(last, _)) if offset > last => Err(self.slots.len()),
            _ => self.slots.binary_search_by_key(&offset, |&(o, _)| o),
        }
    }

    /// Sets the value of `offset`.
    pub fn insert(&mut self, offset: u64, value: V) {
        match self.find(offset) {
            Ok(i) => {
                if self.slots[i].1.replace(value).is_none() {
                    self.len += 1;
                }
            }
            Err(i) if i == self.slots.len() => {
                self.slots.push_back((offset, Some(value)));
                self.len += 1;
            }
            Err(i) => {
                self.slots.insert(i, (offset, Some(value)));
                self.len += 1;
            }
        }
    }

    /// The value of `offset`.
    pub fn get(&self, offset: u64) -> Option<&V> {
        let i = self.find(offset).ok()?;
        self.slots[i].1.as_ref()
    }

    /// The value of `offset`, to change.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut V> {
        let i = self.find(offset).ok()?;
        self.slots[i].1.as_mut()
    }

    /// Takes the value of `offset` out.
    pub fn remove(&mut self, offset: u64) -> Option<V> {
        let i = self.find(offset).ok()?;
        let value = self.slots[i].1.take()?;
        self.len -= 1;
        self.tidy();
        Some(value)
    }

    /// Takes out every entry below `offset`, lowest first.
    pub fn remove_below(&mut self, offset: u64) -> Vec<(u64, V)> {
        let mut taken = Vec::new();
        while let Some(&(first, _)) = self.slots.front() {
            if first >= offset {
                break;
            }
            if let Some((first, Some(value))) = self.slots.pop_front() {
                taken.push((first, value));
            }
        }
        self.len -= taken.len();
        self.tidy();
        taken
    }

    /// The entries, lowest offset first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        self.slots
            .iter()
            .filter_map(|(offset, value)| value.as_ref().map(|v| (*offset, v)))
    }

    fn tidy(&mut self) {
        while self.slots.front().is_some_and(|(_, value)| value.is_none()) {
            self.slots.pop_front();
        }
        if self.slots.len() > SQUEEZE_ABOVE && self.len * 2 < self.slots.len() {
            self.slots.retain(|(_, value)| value.is_some());
        }
        if self.slots.capacity() > 4 * SQUEEZE_ABOVE && self.slots.len() * 4 < self.slots.capacity()
        {
            self.slots.shrink_to(self.slots.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn behaves_as_a_sorted_map_under_any_order_of_inserts_and_removals() {
        // A deterministic mix: mostly ascending inserts and front removals, some of each
        // out of order, against a BTreeMap.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut map, mut model) = (OffsetMap::default(), BTreeMap::new());
        let mut top = 0u64;
        for step in 0..20_000u64 {
            let roll = next() % 10;
            if roll < 5 {
                top += 1 + next() % 3;
                map.insert(top, step);
                model.insert(top, step);
            } else if roll < 6 && top > 0 {
                let offset = next() % top;
                map.insert(offset, step);
                model.insert(offset, step);
            } else if roll < 9 {
                let offset = if roll < 8 {
                    model.keys().next().copied().unwrap_or(0)
                } else {
                    next() % (top + 1)
                };
                assert_eq!(map.remove(offset), model.remove(&offset), "step {step}");
            } else {
                let offset = next() % (top + 1);
                if let Some(v) = map.get_mut(offset) {
                    *v += 1;
                }
                if let Some(v) = model.get_mut(&offset) {
                    *v += 1;
                }
            }
            if step % 4_000 == 0 {
                let below = top.saturating_sub(50);
                let kept = model.split_off(&below);
                let taken: Vec<_> = std::mem::replace(&mut model, kept).into_iter().collect();
                assert_eq!(map.remove_below(below), taken);
            }
            assert_eq!(map.len(), model.len());
            assert_eq!(map.first_offset(), model.keys().next().copied());
            let probe = next() % (top + 2);
            assert_eq!(map.get(probe), model.get(&probe));
        }
        let all: Vec<_> = map.iter().map(|(o, v)| (o, *v)).collect();
        let expected: Vec<_> = model.iter().map(|(o, v)| (*o, *v)).collect();
        assert_eq!(all, expected);
    }

    #[test]
    fn holes_behind_an_entry_left_out_are_squeezed_out() {
        let mut map = OffsetMap::default();
        map.insert(0, ()); // a delivery nobody acks
        for offset in 1..100_000 {
            map.insert(offset, ());
            map.remove(offset);
        }
        assert_eq!(map.len(), 1);
        assert!(map.slots.len() <= 2 * SQUEEZE_ABOVE, "{}", map.slots.len());
        assert_eq!(map.first_offset(), Some(0));
    }
}
