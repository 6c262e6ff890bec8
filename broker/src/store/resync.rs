//! Finding the first intact record after damage, for recovery and for reads.
//!
//! A damaged length field makes every later record of the segment unreachable by walking
//! sizes, although their bytes are intact. Every record starts with its length, a CRC of
//! the rest and its offset, so a record can be recognised anywhere: a position whose offset
//! field is in the expected range, whose length fits and whose CRC checks out starts an
//! intact record (a random match needs the 32-bit CRC and the offset to agree by chance).
//! Scanning byte by byte is slow next to a read, but it runs only where damage was found.

use std::ops::Range;
use std::path::Path;

use qbus_wire::protocol::record::{parse_record, peek_record_size, RECORD_OVERHEAD};

use super::error::StoreError;
use super::fsio::FileIo;

/// Bytes read per call while scanning.
const CHUNK: usize = 1 << 20;
/// Bytes of a record up to and including its offset field.
const HEAD: usize = 16;

/// The first intact record starting after position `damaged` and before `len` whose
/// offset lies in `offsets`: its `(offset, position)`, or `None` when there is none in the
/// file.
pub(crate) fn next_intact(
    file: &dyn FileIo,
    path: &Path,
    damaged: u64,
    len: u64,
    offsets: Range<u64>,
) -> Result<Option<(u64, u64)>, StoreError> {
    let mut buf = Vec::new();
    // File position of `buf[0]`.
    let mut at = 0u64;
    let mut p = damaged + 1;
    while p + RECORD_OVERHEAD as u64 <= len {
        if p < at || p + HEAD as u64 > at + buf.len() as u64 {
            let n = (len - p).min(CHUNK as u64) as usize;
            buf.resize(n, 0);
            file.read_exact_at(&mut buf, p)
                .map_err(StoreError::io(path))?;
            at = p;
        }
        let i = (p - at) as usize;
        let offset = u64::from_be_bytes(buf[i + 8..i + HEAD].try_into().unwrap_or_default());
        if offsets.contains(&offset) {
            if let Some(size) = peek_record_size(&buf[i..]).filter(|&s| s >= RECORD_OVERHEAD) {
                if p + size as u64 <= len && intact(file, path, &buf, at, p, size, offset)? {
                    return Ok(Some((offset, p)));
                }
            }
        }
        p += 1;
    }
    Ok(None)
}

/// Whether the `size` bytes at `p` are an intact record with `offset`.
fn intact(
    file: &dyn FileIo,
    path: &Path,
    buf: &[u8],
    at: u64,
    p: u64,
    size: usize,
    offset: u64,
) -> Result<bool, StoreError> {
    let i = (p - at) as usize;
    let owned;
    let bytes = match buf.get(i..i + size) {
        Some(bytes) => bytes,
        None => {
            let mut whole = vec![0u8; size];
            file.read_exact_at(&mut whole, p)
                .map_err(StoreError::io(path))?;
            owned = whole;
            &owned
        }
    };
    Ok(parse_record(bytes).is_ok_and(|rec| rec.offset == offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fsio::Open;
    use crate::store::simdisk::SimDisk;
    use qbus_wire::protocol::record::encode_record;

    #[test]
    fn finds_the_next_record_past_a_damaged_one() {
        let mut raw = Vec::new();
        let mut starts = Vec::new();
        for offset in 10..20u64 {
            starts.push(raw.len() as u64);
            encode_record(&mut raw, offset, 0, None, None, &[offset as u8; 50]).unwrap();
        }
        // The length of record 12 is wrong: walking sizes would land in garbage.
        raw[starts[2] as usize + 2] ^= 0x40;
        let disk = SimDisk::new();
        let file = disk.fs().open(Path::new("/seg"), Open::CreateNew).unwrap();
        file.write_all_at(&raw, 0).unwrap();
        let len = raw.len() as u64;
        let found = next_intact(&*file, Path::new("/seg"), starts[2], len, 13..100).unwrap();
        assert_eq!(found, Some((13, starts[3])));
        // Nothing in range: the records after are too old or too new.
        assert_eq!(
            next_intact(&*file, Path::new("/seg"), starts[2], len, 13..13).unwrap(),
            None
        );
        assert_eq!(
            next_intact(&*file, Path::new("/seg"), starts[8], len, 20..100).unwrap(),
            None
        );
    }
}
