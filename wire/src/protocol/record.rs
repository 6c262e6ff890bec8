//! The record: one message as stored on disk and as carried in produce and fetch bodies.
//!
//! The same bytes go from the producer to the log file to the consumer, so the broker never
//! re-encodes a message and the checksum is verified end to end.
//!
//! ```text
//! u32 len          bytes after this field
//! u32 crc          CRC-32 (IEEE) of every byte after this field
//! u64 offset       position in the MQ (0 from producers; set by the broker)
//! u64 timestamp    milliseconds since the Unix epoch (set by the broker)
//! u8  flags        bit 0: id, bit 1: deliver_at, bit 2: expires_at, bit 3: dedupe id;
//!                  other bits 0
//! u8  tag_len      then tag_len bytes of UTF-8
//! u16 key_len      then key_len bytes of UTF-8
//! [u128 id]        when flags bit 0 is set: the producer's message id
//! [u64 deliver_at] when flags bit 1 is set (protocol 3): not to be delivered before, ms
//! [u64 expires_at] when flags bit 2 is set (protocol 3): never delivered from then on, ms
//! [u8 len, dedupe] when flags bit 3 is set (protocol 3): 1 to 255 bytes of UTF-8, the
//!                  dedupe id
//! body             the rest
//! ```
//! All integers are big-endian.

use std::ops::Range;

use bytes::BufMut;

/// Bytes of a record that are not tag, key, id or body.
pub const RECORD_OVERHEAD: usize = 28;
/// Flag bit: the record carries a 16-byte message id after its key.
pub const RECORD_FLAG_ID: u8 = 1;
/// Flag bit (protocol 3): the record carries `deliver_at`, a u64 after the id.
pub const RECORD_FLAG_DELIVER_AT: u8 = 1 << 1;
/// Flag bit (protocol 3): the record carries `expires_at`, a u64 after `deliver_at`.
pub const RECORD_FLAG_EXPIRES_AT: u8 = 1 << 2;
/// Flag bit (protocol 3): the record carries a dedupe id after its times; the broker
/// stores a record with a dedupe id it saw within the MQ's window only once.
pub const RECORD_FLAG_DEDUPE: u8 = 1 << 3;
/// The flag bits a peer of protocol 2 or older does not know.
pub const RECORD_FLAGS_V3: u8 =
    RECORD_FLAG_DELIVER_AT | RECORD_FLAG_EXPIRES_AT | RECORD_FLAG_DEDUPE;
const KNOWN_FLAGS: u8 = RECORD_FLAG_ID | RECORD_FLAGS_V3;
/// Longest dedupe id, in bytes.
pub const MAX_DEDUPE_ID: usize = u8::MAX as usize;
/// A `deliver_at` with this bit set is no time but the mark of a broker's timer copy: the
/// record is the copy, made when it came due, of the delayed record at the offset in the low
/// 63 bits. Producers may not send it.
pub const DELIVER_AT_COPY_MARK: u64 = 1 << 63;
const ID_LEN: usize = 16;
const FIXED_AFTER_LEN: usize = RECORD_OVERHEAD - 4;

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The input ends inside a record.
    #[error("truncated record: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes the record needs.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The length field is impossible.
    #[error("record length {len} is invalid")]
    BadLength {
        /// The length field.
        len: usize,
    },
    /// The checksum does not match: the record is corrupt.
    #[error("record checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// Checksum in the record.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// Tag or key is not UTF-8.
    #[error("record {field} is not valid UTF-8")]
    Utf8 {
        /// `tag` or `key`.
        field: &'static str,
    },
    /// Flag bits this version does not know (written by a newer peer).
    #[error("record flags {flags:#04x} are not understood by this version")]
    UnknownFlags {
        /// The flags byte.
        flags: u8,
    },
    /// A copied record's offset is not the one its place in the log calls for.
    #[error("record has offset {found} where offset {expected} belongs")]
    OutOfOrder {
        /// The offset its place calls for.
        expected: u64,
        /// The offset it carries.
        found: u64,
    },
    /// Tag longer than 255 bytes or key longer than 65535 bytes.
    #[error("record {field} is {len} bytes; the limit is {max}")]
    FieldTooLong {
        /// `tag` or `key`.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// A parsed record borrowing the buffer it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Position in the MQ.
    pub offset: u64,
    /// Broker time of the append, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Tag, used by consumers' filters.
    pub tag: Option<&'a str>,
    /// Key, used for affinity and deduplication.
    pub key: Option<&'a str>,
    /// Message id set by the producer; a resend after failover carries the same one.
    pub id: Option<u128>,
    /// Not to be delivered before this time (ms since the Unix epoch), or, with
    /// [`DELIVER_AT_COPY_MARK`], the broker's copy of a delayed record.
    pub deliver_at: Option<u64>,
    /// Never delivered from this time on (ms since the Unix epoch).
    pub expires_at: Option<u64>,
    /// Dedupe id set by the producer (protocol 3): the broker stores it once per window.
    pub dedupe_id: Option<&'a str>,
    /// The payload.
    pub body: &'a [u8],
    /// Where the body lies in the parsed buffer (for zero-copy slicing).
    pub body_range: Range<usize>,
    /// Where `key` is in the buffer parsed (empty without a key), as `body_range`.
    pub key_range: Range<usize>,
    /// Total bytes of the record.
    pub size: usize,
}

/// The optional fields of a record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordMeta<'a> {
    /// Tag for consumer-side filters.
    pub tag: Option<&'a str>,
    /// Key for affinity.
    pub key: Option<&'a str>,
    /// Message id for deduplication by consumers.
    pub id: Option<u128>,
    /// Not to be delivered before this time, ms since the Unix epoch.
    pub deliver_at: Option<u64>,
    /// Never delivered from this time on, ms since the Unix epoch.
    pub expires_at: Option<u64>,
    /// Dedupe id (protocol 3): the broker stores the record once within the MQ's window.
    pub dedupe_id: Option<&'a str>,
}

impl RecordRef<'_> {
    /// The meta fields of this record, to encode it again.
    pub fn meta(&self) -> RecordMeta<'_> {
        RecordMeta {
            tag: self.tag,
            key: self.key,
            id: self.id,
            deliver_at: self.deliver_at,
            expires_at: self.expires_at,
            dedupe_id: self.dedupe_id,
        }
    }

    /// The offset of the delayed record this one is the timer's copy of.
    pub fn copy_of(&self) -> Option<u64> {
        self.deliver_at
            .filter(|at| at & DELIVER_AT_COPY_MARK != 0)
            .map(|at| at & !DELIVER_AT_COPY_MARK)
    }

    /// True for a delayed record stored before its time: no group delivers it, the broker's
    /// timer appends a copy of it when it comes due.
    pub fn is_pending_original(&self) -> bool {
        self.deliver_at
            .is_some_and(|at| at & DELIVER_AT_COPY_MARK == 0 && at > self.timestamp_ms)
    }
}

/// Appends one record without an id. Fails only when the tag or key is too long.
pub fn encode_record(
    dst: &mut impl BufMut,
    offset: u64,
    timestamp_ms: u64,
    tag: Option<&str>,
    key: Option<&str>,
    body: &[u8],
) -> Result<usize, RecordError> {
    let meta = RecordMeta {
        tag,
        key,
        ..RecordMeta::default()
    };
    encode_record_meta(dst, offset, timestamp_ms, &meta, body)
}

/// Appends one record with every optional field. Fails only when the tag or key is too long.
pub fn encode_record_meta(
    dst: &mut impl BufMut,
    offset: u64,
    timestamp_ms: u64,
    meta: &RecordMeta<'_>,
    body: &[u8],
) -> Result<usize, RecordError> {
    let tag = meta.tag.unwrap_or("").as_bytes();
    let key = meta.key.unwrap_or("").as_bytes();
    let id = meta.id.map(u128::to_be_bytes);
    let id: &[u8] = id.as_ref().map_or(&[], |id| id.as_slice());
    let mut times = [0u8; 16];
    let mut times_len = 0;
    let mut flags = if id.is_empty() { 0 } else { RECORD_FLAG_ID };
    for (bit, value) in [
        (RECORD_FLAG_DELIVER_AT, meta.deliver_at),
        (RECORD_FLAG_EXPIRES_AT, meta.expires_at),
    ] {
        if let Some(value) = value {
            flags |= bit;
            times[times_len..times_len + 8].copy_from_slice(&value.to_be_bytes());
            times_len += 8;
        }
    }
    let times = &times[..times_len];
    if tag.len() > u8::MAX as usize {
        return Err(RecordError::FieldTooLong {
            field: "tag",
            len: tag.len(),
            max: u8::MAX as usize,
        });
    }
    if key.len() > u16::MAX as usize {
        return Err(RecordError::FieldTooLong {
            field: "key",
            len: key.len(),
            max: u16::MAX as usize,
        });
    }
    let dedupe = meta.dedupe_id.map(str::as_bytes);
    if let Some(dedupe) = dedupe {
        if dedupe.is_empty() || dedupe.len() > MAX_DEDUPE_ID {
            return Err(RecordError::FieldTooLong {
                field: "dedupe id",
                len: dedupe.len(),
                max: MAX_DEDUPE_ID,
            });
        }
        flags |= RECORD_FLAG_DEDUPE;
    }
    let dedupe_len = dedupe.map(|d| [d.len() as u8]);
    let dedupe_len: &[u8] = dedupe_len.as_ref().map_or(&[], |len| len.as_slice());
    let dedupe = dedupe.unwrap_or_default();
    let size = RECORD_OVERHEAD
        + tag.len()
        + key.len()
        + id.len()
        + times.len()
        + dedupe_len.len()
        + dedupe.len()
        + body.len();
    // Everything between the CRC and the body, gathered first: one CRC pass and one copy
    // for it instead of one per field (most records are small, and a call per field was
    // most of what encoding one cost).
    let head_len = size - 8 - body.len();
    let mut stack = [0u8; 128];
    let mut heap = Vec::new();
    let head: &mut [u8] = if head_len <= stack.len() {
        &mut stack[..head_len]
    } else {
        heap.resize(head_len, 0);
        &mut heap
    };
    head[0..8].copy_from_slice(&offset.to_be_bytes());
    head[8..16].copy_from_slice(&timestamp_ms.to_be_bytes());
    head[16] = flags;
    head[17] = tag.len() as u8;
    head[18..20].copy_from_slice(&(key.len() as u16).to_be_bytes());
    let mut at = FIXED_AFTER_LEN - 4;
    for field in [tag, key, id, times, dedupe_len, dedupe] {
        head[at..at + field.len()].copy_from_slice(field);
        at += field.len();
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(head);
    crc.update(body);
    dst.put_u32((size - 4) as u32);
    dst.put_u32(crc.finalize());
    dst.put_slice(head);
    dst.put_slice(body);
    Ok(size)
}

/// Size of the record at the start of `src` from its length field, without checking it.
pub fn peek_record_size(src: &[u8]) -> Option<usize> {
    let len = src.get(..4)?;
    Some(4 + u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize)
}

/// Parses and verifies the record at the start of `src`.
pub fn parse_record(src: &[u8]) -> Result<RecordRef<'_>, RecordError> {
    parse(src, true)
}

/// Parses the record at the start of `src` without computing its checksum, for records
/// already verified (read back by a broker that checked them when they arrived or were
/// read from disk). Lengths, flags and text fields are still checked, so a bad buffer
/// gives an error, never a panic.
pub fn parse_intact_record(src: &[u8]) -> Result<RecordRef<'_>, RecordError> {
    parse(src, false)
}

fn parse(src: &[u8], verify: bool) -> Result<RecordRef<'_>, RecordError> {
    let size = peek_record_size(src).ok_or(RecordError::Truncated {
        need: 4,
        have: src.len(),
    })?;
    if size < RECORD_OVERHEAD {
        return Err(RecordError::BadLength { len: size - 4 });
    }
    if src.len() < size {
        return Err(RecordError::Truncated {
            need: size,
            have: src.len(),
        });
    }
    let rec = &src[..size];
    if verify {
        let stored = u32::from_be_bytes([rec[4], rec[5], rec[6], rec[7]]);
        let computed = crc32fast::hash(&rec[8..]);
        if stored != computed {
            return Err(RecordError::Checksum { stored, computed });
        }
    }
    let be64 = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&rec[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let flags = rec[24];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(RecordError::UnknownFlags { flags });
    }
    let tag_len = rec[25] as usize;
    let key_len = u16::from_be_bytes([rec[26], rec[27]]) as usize;
    let key_end = RECORD_OVERHEAD + tag_len + key_len;
    let id_len = if flags & RECORD_FLAG_ID != 0 {
        ID_LEN
    } else {
        0
    };
    let id_end = key_end + id_len;
    let mut body_start = id_end;
    let mut time = |bit: u8| {
        if flags & bit == 0 {
            return None;
        }
        let at = body_start;
        body_start += 8;
        Some(at)
    };
    let (deliver_at, expires_at) = (time(RECORD_FLAG_DELIVER_AT), time(RECORD_FLAG_EXPIRES_AT));
    let dedupe = if flags & RECORD_FLAG_DEDUPE != 0 {
        let len = *rec
            .get(body_start)
            .ok_or(RecordError::BadLength { len: size - 4 })? as usize;
        if len == 0 {
            return Err(RecordError::BadLength { len: size - 4 });
        }
        body_start + 1..body_start + 1 + len
    } else {
        body_start..body_start
    };
    let body_start = dedupe.end;
    if body_start > size {
        return Err(RecordError::BadLength { len: size - 4 });
    }
    let text = |range: Range<usize>, field| -> Result<Option<&str>, RecordError> {
        if range.is_empty() {
            return Ok(None);
        }
        std::str::from_utf8(&rec[range])
            .map(Some)
            .map_err(|_| RecordError::Utf8 { field })
    };
    Ok(RecordRef {
        offset: be64(8),
        timestamp_ms: be64(16),
        tag: text(RECORD_OVERHEAD..RECORD_OVERHEAD + tag_len, "tag")?,
        key: text(RECORD_OVERHEAD + tag_len..key_end, "key")?,
        id: (id_len > 0).then(|| {
            let mut id = [0u8; ID_LEN];
            id.copy_from_slice(&rec[key_end..id_end]);
            u128::from_be_bytes(id)
        }),
        deliver_at: deliver_at.map(be64),
        expires_at: expires_at.map(be64),
        dedupe_id: text(dedupe, "dedupe id")?,
        body: &rec[body_start..],
        body_range: body_start..size,
        key_range: RECORD_OVERHEAD + tag_len..key_end,
        size,
    })
}

/// Sets the offset and timestamp of a verified record in place and recomputes its checksum.
pub fn stamp_record(record: &mut [u8], offset: u64, timestamp_ms: u64) {
    record[8..16].copy_from_slice(&offset.to_be_bytes());
    record[16..24].copy_from_slice(&timestamp_ms.to_be_bytes());
    let crc = crc32fast::hash(&record[8..]);
    record[4..8].copy_from_slice(&crc.to_be_bytes());
}

/// The records of `src` (whole, verified, back to back) re-encoded without the protocol 3
/// fields (`deliver_at`, `expires_at`, dedupe id), for a peer of protocol 2 or older; `None`
/// when no record has them (the common case: send `src` as it is, nothing is copied).
/// Offsets, times and every other field are kept.
pub fn without_v3_fields(src: &[u8]) -> Result<Option<Vec<u8>>, RecordError> {
    let mut out: Option<Vec<u8>> = None;
    let mut at = 0;
    for record in records(src) {
        let record = record?;
        let start = at;
        at += record.size;
        if src[start + 24] & RECORD_FLAGS_V3 == 0 {
            if let Some(out) = &mut out {
                out.extend_from_slice(&src[start..at]);
            }
            continue;
        }
        let out = out.get_or_insert_with(|| {
            let mut copy = Vec::with_capacity(src.len());
            copy.extend_from_slice(&src[..start]);
            copy
        });
        let meta = RecordMeta {
            deliver_at: None,
            expires_at: None,
            dedupe_id: None,
            ..record.meta()
        };
        encode_record_meta(out, record.offset, record.timestamp_ms, &meta, record.body)?;
    }
    Ok(out)
}

/// Iterates over the verified records of a buffer holding whole records back to back.
pub fn records(src: &[u8]) -> impl Iterator<Item = Result<RecordRef<'_>, RecordError>> {
    each_record(src, parse_record)
}

/// Like [`records`] for records already verified: see [`parse_intact_record`].
pub fn intact_records(src: &[u8]) -> impl Iterator<Item = Result<RecordRef<'_>, RecordError>> {
    each_record(src, parse_intact_record)
}

fn each_record<'a>(
    src: &'a [u8],
    parse: fn(&'a [u8]) -> Result<RecordRef<'a>, RecordError>,
) -> impl Iterator<Item = Result<RecordRef<'a>, RecordError>> {
    let mut at = 0;
    let mut failed = false;
    std::iter::from_fn(move || {
        if at >= src.len() || failed {
            return None;
        }
        match parse(&src[at..]) {
            Ok(mut rec) => {
                rec.body_range = rec.body_range.start + at..rec.body_range.end + at;
                rec.key_range = rec.key_range.start + at..rec.key_range.end + at;
                at += rec.size;
                Some(Ok(rec))
            }
            Err(e) => {
                failed = true;
                Some(Err(e))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(tag: Option<&str>, key: Option<&str>, body: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_record(&mut buf, 9, 1234, tag, key, body).unwrap();
        buf
    }

    #[test]
    fn round_trip_with_and_without_fields() {
        let buf = one(Some("red"), Some("k1"), b"payload");
        let rec = parse_record(&buf).unwrap();
        assert_eq!(
            (rec.offset, rec.timestamp_ms, rec.tag, rec.key, rec.body),
            (9, 1234, Some("red"), Some("k1"), &b"payload"[..])
        );
        assert_eq!(rec.size, buf.len());
        let bare = one(None, None, b"");
        let rec = parse_record(&bare).unwrap();
        assert_eq!((rec.tag, rec.key, rec.body.len()), (None, None, 0));
        assert_eq!(bare.len(), RECORD_OVERHEAD);
        // Fields too long for the encoder's stack buffer.
        let (tag, key) = ("t".repeat(200), "k".repeat(300));
        let long = one(Some(&tag), Some(&key), b"body");
        let rec = parse_record(&long).unwrap();
        assert_eq!(
            (rec.tag, rec.key, rec.body),
            (Some(&*tag), Some(&*key), &b"body"[..])
        );
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let buf = one(Some("t"), Some("key"), b"some body bytes");
        for i in 4..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(parse_record(&bad).is_err(), "flip at {i} not detected");
        }
    }

    #[test]
    fn truncation_is_reported() {
        let buf = one(None, None, b"abc");
        for cut in 0..buf.len() {
            assert!(matches!(
                parse_record(&buf[..cut]),
                Err(RecordError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn stamping_keeps_the_record_valid() {
        let mut buf = one(Some("x"), None, b"body");
        stamp_record(&mut buf, 77, 88);
        let rec = parse_record(&buf).unwrap();
        assert_eq!(
            (rec.offset, rec.timestamp_ms, rec.body),
            (77, 88, &b"body"[..])
        );
    }

    #[test]
    fn iterates_back_to_back_records() {
        let mut buf = one(None, None, b"a");
        buf.extend(one(Some("t"), None, b"bb"));
        let bodies: Vec<_> = records(&buf)
            .map(|r| {
                let r = r.unwrap();
                buf[r.body_range].to_vec()
            })
            .collect();
        assert_eq!(bodies, vec![b"a".to_vec(), b"bb".to_vec()]);
    }

    #[test]
    fn key_ranges_point_at_each_key_in_the_whole_buffer() {
        let mut buf = one(Some("tag"), Some("first"), b"a");
        buf.extend(one(None, None, b"bb"));
        buf.extend(one(Some("t"), Some("third"), b"ccc"));
        let keys: Vec<_> = intact_records(&buf)
            .map(|r| {
                let r = r.unwrap();
                assert_eq!(
                    r.key.map(str::as_bytes),
                    r.key.map(|_| &buf[r.key_range.clone()])
                );
                r.key_range.len()
            })
            .collect();
        assert_eq!(keys, vec![5, 0, 5], "no key: an empty range");
    }

    #[test]
    fn an_intact_parse_skips_only_the_checksum() {
        let mut rec = one(Some("t"), Some("k"), b"body");
        let checked = parse_record(&rec).unwrap();
        let intact = parse_intact_record(&rec).unwrap();
        assert_eq!(
            (intact.tag, intact.key, intact.body),
            (checked.tag, checked.key, checked.body)
        );
        let last = rec.len() - 1;
        rec[last] ^= 1;
        assert!(matches!(
            parse_record(&rec),
            Err(RecordError::Checksum { .. })
        ));
        assert!(
            parse_intact_record(&rec).is_ok(),
            "the checksum is not looked at"
        );
        assert!(matches!(
            parse_intact_record(&rec[..rec.len() - 1]),
            Err(RecordError::Truncated { .. })
        ));
        rec[24] = 0xff;
        assert!(matches!(
            parse_intact_record(&rec),
            Err(RecordError::UnknownFlags { .. })
        ));
        let two = [one(None, None, b"a"), one(None, Some("k"), b"b")].concat();
        assert_eq!(intact_records(&two).flatten().count(), 2);
    }

    #[test]
    fn ids_round_trip_and_are_checksummed() {
        let meta = RecordMeta {
            tag: Some("t"),
            key: Some("k"),
            id: Some(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            ..RecordMeta::default()
        };
        let mut buf = Vec::new();
        encode_record_meta(&mut buf, 1, 2, &meta, b"body").unwrap();
        let rec = parse_record(&buf).unwrap();
        assert_eq!(
            (rec.tag, rec.key, rec.id, rec.body),
            (Some("t"), Some("k"), meta.id, &b"body"[..])
        );
        let mut bad = buf.clone();
        bad[RECORD_OVERHEAD + 3] ^= 1;
        assert!(matches!(
            parse_record(&bad),
            Err(RecordError::Checksum { .. })
        ));
        let mut future = buf;
        future[24] |= 0x80;
        let crc = crc32fast::hash(&future[8..]);
        future[4..8].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            parse_record(&future),
            Err(RecordError::UnknownFlags { .. })
        ));
    }

    #[test]
    fn times_round_trip_and_old_peers_get_records_without_them() {
        let meta = RecordMeta {
            key: Some("k"),
            id: Some(7),
            deliver_at: Some(5_000),
            expires_at: Some(9_000),
            ..RecordMeta::default()
        };
        let mut buf = Vec::new();
        encode_record_meta(&mut buf, 3, 1_000, &meta, b"later").unwrap();
        encode_record(&mut buf, 4, 1_000, None, None, b"plain").unwrap();
        let rec = parse_record(&buf).unwrap();
        assert_eq!(
            (rec.id, rec.deliver_at, rec.expires_at, rec.body),
            (Some(7), Some(5_000), Some(9_000), &b"later"[..])
        );
        assert!(rec.is_pending_original() && rec.copy_of().is_none());
        let only_expiry = RecordMeta {
            expires_at: Some(9),
            ..RecordMeta::default()
        };
        let mut one = Vec::new();
        encode_record_meta(&mut one, 0, 0, &only_expiry, b"x").unwrap();
        let rec = parse_record(&one).unwrap();
        assert_eq!((rec.deliver_at, rec.expires_at), (None, Some(9)));

        let old = without_v3_fields(&buf).unwrap().expect("re-encoded");
        let got: Vec<_> = records(&old)
            .map(|r| {
                let r = r.unwrap();
                (r.offset, r.id, r.deliver_at, r.expires_at, r.body.to_vec())
            })
            .collect();
        assert_eq!(
            got,
            [
                (3, Some(7), None, None, b"later".to_vec()),
                (4, None, None, None, b"plain".to_vec())
            ]
        );
        assert_eq!(old[24] & RECORD_FLAGS_V3, 0);
        let plain = &buf[parse_record(&buf).unwrap().size..];
        assert_eq!(without_v3_fields(plain).unwrap(), None, "nothing to strip");
    }

    #[test]
    fn every_optional_field_follows_in_flag_bit_order_and_all_v3_ones_strip() {
        let meta = RecordMeta {
            tag: Some("t"),
            key: Some("k"),
            id: Some(1),
            deliver_at: Some(2),
            expires_at: Some(3),
            dedupe_id: Some("d"),
        };
        let mut buf = Vec::new();
        let size = encode_record_meta(&mut buf, 0, 0, &meta, b"b").unwrap();
        let optional = RECORD_OVERHEAD + 2;
        assert_eq!(buf[24], 0b1111);
        assert_eq!(&buf[optional..optional + 16], &1u128.to_be_bytes());
        assert_eq!(&buf[optional + 16..optional + 24], &2u64.to_be_bytes());
        assert_eq!(&buf[optional + 24..optional + 32], &3u64.to_be_bytes());
        assert_eq!(&buf[optional + 32..size], b"\x01db");
        assert_eq!(parse_record(&buf).unwrap().meta(), meta);
        let old = without_v3_fields(&buf).unwrap().expect("re-encoded");
        let rec = parse_record(&old).unwrap();
        assert_eq!(old[24], RECORD_FLAG_ID);
        assert_eq!(
            rec.meta(),
            RecordMeta {
                deliver_at: None,
                expires_at: None,
                dedupe_id: None,
                ..meta
            }
        );
    }

    #[test]
    fn copies_name_their_original() {
        let meta = RecordMeta {
            deliver_at: Some(DELIVER_AT_COPY_MARK | 42),
            ..RecordMeta::default()
        };
        let mut buf = Vec::new();
        encode_record_meta(&mut buf, 50, 1, &meta, b"due").unwrap();
        let rec = parse_record(&buf).unwrap();
        assert_eq!(rec.copy_of(), Some(42));
        assert!(!rec.is_pending_original());
    }

    #[test]
    fn dedupe_ids_round_trip_and_can_be_stripped_for_old_peers() {
        let meta = RecordMeta {
            tag: Some("t"),
            id: Some(7),
            dedupe_id: Some("order-17"),
            ..RecordMeta::default()
        };
        let mut buf = one(None, None, b"plain");
        let plain_len = buf.len();
        encode_record_meta(&mut buf, 2, 3, &meta, b"body").unwrap();
        let recs: Vec<_> = records(&buf).map(Result::unwrap).collect();
        assert_eq!(
            (recs[1].tag, recs[1].id, recs[1].dedupe_id, recs[1].body),
            (Some("t"), Some(7), Some("order-17"), &b"body"[..])
        );
        assert_eq!(recs[0].dedupe_id, None);

        let stripped = without_v3_fields(&buf)
            .unwrap()
            .expect("one record had an id");
        let again: Vec<_> = records(&stripped).map(Result::unwrap).collect();
        assert_eq!(&stripped[..plain_len], &buf[..plain_len]);
        assert_eq!(
            (
                again[1].offset,
                again[1].timestamp_ms,
                again[1].id,
                again[1].dedupe_id
            ),
            (2, 3, Some(7), None)
        );
        assert_eq!(again[1].body, b"body");
        assert_eq!(without_v3_fields(&buf[..plain_len]).unwrap(), None);

        for bad in ["", &"x".repeat(MAX_DEDUPE_ID + 1)] {
            let meta = RecordMeta {
                dedupe_id: Some(bad),
                ..RecordMeta::default()
            };
            assert!(matches!(
                encode_record_meta(&mut Vec::new(), 0, 0, &meta, b""),
                Err(RecordError::FieldTooLong {
                    field: "dedupe id",
                    ..
                })
            ));
        }
    }

    #[test]
    fn overlong_tag_is_refused() {
        let tag = "x".repeat(256);
        assert!(matches!(
            encode_record(&mut Vec::new(), 0, 0, Some(&tag), None, b""),
            Err(RecordError::FieldTooLong { field: "tag", .. })
        ));
    }
}
