//! A reader of the canonical MessagePack forms, shared by the hand-written decoders of the
//! hot paths (the frame header, the RPC request envelope).
//!
//! Every read answers `None` for "not the form expected here": a decoder then hands the
//! bytes to `rmp-serde`, whose verdict (and error message) is the one that counts. So this
//! never has to say why bytes are wrong, only recognise the common right ones quickly.

pub(super) const NIL: u8 = 0xc0;

/// A cursor over MessagePack bytes.
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, pos: 0 }
    }

    /// Whether every byte has been read.
    pub(super) fn at_end(&self) -> bool {
        self.pos == self.bytes.len()
    }

    /// At most `len` items fit in what is left (each takes a byte or more), so a hostile
    /// length never reserves more than the input's own size.
    pub(super) fn bounded(&self, len: usize) -> usize {
        len.min(self.bytes.len() - self.pos)
    }

    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let taken = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(taken)
    }

    fn be(&mut self, n: usize) -> Option<u64> {
        Some(self.take(n)?.iter().fold(0, |v, &b| v << 8 | u64::from(b)))
    }

    fn len_be(&mut self, n: usize) -> Option<usize> {
        usize::try_from(self.be(n)?).ok()
    }

    /// An unsigned integer in any of its unsigned forms.
    pub(super) fn uint(&mut self) -> Option<u64> {
        match self.byte()? {
            b @ 0..=0x7f => Some(b.into()),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            _ => None,
        }
    }

    /// An unsigned integer that fits `T`.
    pub(super) fn narrow<T: TryFrom<u64>>(&mut self) -> Option<T> {
        T::try_from(self.uint()?).ok()
    }

    /// Consumes a nil; leaves anything else in place.
    pub(super) fn nil(&mut self) -> bool {
        let nil = self.bytes.get(self.pos) == Some(&NIL);
        self.pos += usize::from(nil);
        nil
    }

    /// Nil as `None`, else what `read` reads.
    pub(super) fn opt<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<Option<T>> {
        if self.nil() {
            Some(None)
        } else {
            read(self).map(Some)
        }
    }

    /// A UTF-8 string (the str family, not bin), borrowed from the input.
    pub(super) fn str(&mut self) -> Option<&'a str> {
        let len = match self.byte()? {
            b @ 0xa0..=0xbf => usize::from(b & 0x1f),
            0xd9 => self.len_be(1)?,
            0xda => self.len_be(2)?,
            0xdb => self.len_be(4)?,
            _ => return None,
        };
        std::str::from_utf8(self.take(len)?).ok()
    }

    /// The length of an array.
    pub(super) fn array_len(&mut self) -> Option<usize> {
        match self.byte()? {
            b @ 0x90..=0x9f => Some(usize::from(b & 0x0f)),
            0xdc => self.len_be(2),
            0xdd => self.len_be(4),
            _ => None,
        }
    }

    /// The number of entries of a map.
    pub(super) fn map_len(&mut self) -> Option<usize> {
        match self.byte()? {
            b @ 0x80..=0x8f => Some(usize::from(b & 0x0f)),
            0xde => self.len_be(2),
            0xdf => self.len_be(4),
            _ => None,
        }
    }

    /// Steps over one whole value of any type, nested arrays and maps included, and says
    /// where it lay. Iterative, with a count of values still owed rather than a stack, so
    /// hostile nesting costs neither stack nor memory; a count that could not fit in the
    /// bytes left ends the skip at once.
    pub(super) fn skip(&mut self) -> Option<std::ops::Range<usize>> {
        let start = self.pos;
        let mut owed: usize = 1;
        while owed > 0 {
            owed -= 1;
            let (payload, items) = match self.byte()? {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
                b @ 0x80..=0x8f => (0, 2 * usize::from(b & 0x0f)),
                b @ 0x90..=0x9f => (0, usize::from(b & 0x0f)),
                b @ 0xa0..=0xbf => (usize::from(b & 0x1f), 0),
                0xc4 | 0xd9 => (self.len_be(1)?, 0),
                0xc5 | 0xda => (self.len_be(2)?, 0),
                0xc6 | 0xdb => (self.len_be(4)?, 0),
                0xc7 => (self.len_be(1)?.checked_add(1)?, 0), // ext 8: length, type, data
                0xc8 => (self.len_be(2)?.checked_add(1)?, 0),
                0xc9 => (self.len_be(4)?.checked_add(1)?, 0),
                0xca | 0xce | 0xd2 => (4, 0),
                0xcb | 0xcf | 0xd3 => (8, 0),
                0xcc | 0xd0 => (1, 0),
                0xcd | 0xd1 => (2, 0),
                0xd4 => (2, 0), // fixext 1: type, data
                0xd5 => (3, 0),
                0xd6 => (5, 0),
                0xd7 => (9, 0),
                0xd8 => (17, 0),
                0xdc => (0, self.len_be(2)?),
                0xdd => (0, self.len_be(4)?),
                0xde => (0, self.len_be(2)?.checked_mul(2)?),
                0xdf => (0, self.len_be(4)?.checked_mul(2)?),
                0xc1 => return None, // never used
            };
            self.take(payload)?;
            owed = owed.checked_add(items)?;
            if owed > self.bytes.len() - self.pos {
                return None;
            }
        }
        Some(start..self.pos)
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde::Serialize;

    use super::*;

    #[derive(Serialize)]
    enum Ext {
        Unit,
        New(u8),
    }

    #[derive(Serialize)]
    struct Mixed {
        unit: Ext,
        new: Ext,
        f: f64,
        g: f32,
        i: i64,
        nested: Vec<Vec<(u8, String)>>,
        map: std::collections::BTreeMap<String, Option<u64>>,
    }

    fn mixed(rng: &mut StdRng) -> Vec<u8> {
        let n = rng.gen_range(0..40);
        let value = Mixed {
            unit: Ext::Unit,
            new: Ext::New(rng.gen()),
            f: rng.gen(),
            g: rng.gen(),
            i: rng.gen::<i64>() >> rng.gen_range(0..64),
            nested: (0..n)
                .map(|i| vec![(i as u8, "x".repeat(i * 9)); i % 5])
                .collect(),
            map: (0..n)
                .map(|i| (format!("k{i}"), rng.gen_bool(0.5).then(|| rng.gen())))
                .collect(),
        };
        let mut bytes = rmp_serde::to_vec_named(&value).expect("encodes");
        // Then forms serde does not write here: two ext values and a bin.
        bytes.extend_from_slice(&[0xd4, 1, 2, 0xc7, 3, 9, 1, 2, 3]);
        let bin = rng.gen_range(0..300u16);
        bytes.push(0xc5);
        bytes.extend_from_slice(&bin.to_be_bytes());
        bytes.extend(std::iter::repeat_n(7, bin.into()));
        bytes
    }

    #[test]
    fn skips_exactly_one_value_of_any_shape() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        for _ in 0..500 {
            let bytes = mixed(&mut rng);
            let mut reader = Reader::new(&bytes);
            let first = reader.skip().expect("a whole value");
            assert!(rmp_serde::from_slice::<serde::de::IgnoredAny>(&bytes[first.clone()]).is_ok());
            // What follows the struct: the two ext values and the bin.
            assert_eq!(reader.skip(), Some(first.end..first.end + 3));
            assert_eq!(reader.skip(), Some(first.end + 3..first.end + 9));
            assert_eq!(reader.skip(), Some(first.end + 9..bytes.len()));
            assert!(reader.at_end());
            // Cut anywhere inside, the value is incomplete.
            let cut = rng.gen_range(0..first.end);
            assert_eq!(Reader::new(&bytes[..cut]).skip(), None);
        }
    }

    #[test]
    fn hostile_nesting_and_lengths_end_the_skip_at_once() {
        // A million nested one-element arrays: no recursion to overflow.
        let deep = vec![0x91; 1_000_000];
        assert_eq!(Reader::new(&deep).skip(), None);
        let mut closed = deep.clone();
        closed.push(0x01);
        assert_eq!(Reader::new(&closed).skip(), Some(0..closed.len()));
        // Lengths no input can fill.
        for bytes in [
            &[0xdd, 0xff, 0xff, 0xff, 0xff][..],
            &[0xdf, 0xff, 0xff, 0xff, 0xff],
            &[0xdb, 0xff, 0xff, 0xff, 0xff],
            &[0xc9, 0xff, 0xff, 0xff, 0xff],
            &[0xc1],
        ] {
            assert_eq!(Reader::new(bytes).skip(), None);
        }
    }
}
