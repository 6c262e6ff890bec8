//! The header's MessagePack form, written by hand for the hot path.
//!
//! Every frame carries a header, and going through serde's visitors for its fields was the
//! largest user-space cost in the broker's and clients' profiles. This writes the bytes
//! `rmp-serde` writes (an array of the fields in order, each integer and string in its
//! shortest form), except that trailing fields newer than version 1 (`lost`, `offsets`) are
//! left out when they are empty, so that every header a version 1 peer can get has the 16
//! fields it knows; and it reads that canonical form directly. Anything else a peer may
//! legally send (a map of field names, binary strings, signed or oversized integer forms)
//! is handed to `rmp-serde`, so what is accepted, and every error, stays exactly as before.
//! The tests hold both directions to `rmp-serde` on random and damaged headers.

use bytes::BytesMut;

use super::header::{Command, DeliveryToken, Durability, Header, LostRange};
use super::msgpack::{Reader, NIL};

/// Fields of a version 1 header, in wire order.
const V1_FIELDS: u16 = 16;
/// Fields of a version 3 header: `lost` (version 2) and `offsets` added.
const FIELDS: u16 = 18;

/// Appends `header` to `dst` exactly as `rmp_serde::encode::write` would.
pub(super) fn encode(header: &Header, dst: &mut BytesMut) {
    dst.reserve(64);
    let dst = &mut Staged::new(dst);
    dst.put_u8(0xdc); // array 16: sixteen fields do not fit a fixarray
    let fields = if !header.offsets.is_empty() {
        FIELDS
    } else if header.lost.is_some() {
        V1_FIELDS + 1
    } else {
        V1_FIELDS
    };
    dst.put_u16(fields);
    put_uint(dst, u8::from(header.cmd).into());
    put_uint(dst, header.id);
    put_uint(dst, header.status.into());
    put_opt_str(dst, header.mq.as_deref());
    put_opt_str(dst, header.group.as_deref());
    put_opt_str(dst, header.tag.as_deref());
    put_opt_uint(dst, header.offset);
    put_opt_uint(dst, header.count.map(u64::from));
    put_opt_uint(dst, header.timeout_ms.map(u64::from));
    put_uint(dst, header.flags.into());
    put_opt_uint(dst, header.durability.map(|d| u8::from(d).into()));
    put_array_len(dst, header.attempts.len());
    for &attempt in &header.attempts {
        put_uint(dst, attempt.into());
    }
    put_array_len(dst, header.tokens.len());
    for token in &header.tokens {
        dst.put_u8(0x92); // a token is the array [offset, attempt]
        put_uint(dst, token.offset);
        put_uint(dst, token.attempt.into());
    }
    put_opt_str(dst, header.error.as_deref());
    put_opt_str(dst, header.encoding.as_deref());
    put_opt_str(dst, header.route.as_deref());
    if fields > V1_FIELDS {
        match header.lost {
            Some(lost) => {
                dst.put_u8(0x92); // [first, end]
                put_uint(dst, lost.first);
                put_uint(dst, lost.end);
            }
            None => dst.put_u8(NIL),
        }
    }
    if fields > V1_FIELDS + 1 {
        put_array_len(dst, header.offsets.len());
        for &offset in &header.offsets {
            put_uint(dst, offset);
        }
    }
}

/// Reads a header: the canonical form directly, any other form through `rmp-serde`, whose
/// message says what is wrong with a malformed one.
pub(super) fn decode(bytes: &[u8]) -> Result<Box<Header>, String> {
    match read(&mut Reader::new(bytes)) {
        Some(header) => Ok(header),
        None => rmp_serde::from_slice(bytes)
            .map(Box::new)
            .map_err(|e| e.to_string()),
    }
}

/// The header's bytes on their way into the frame, gathered on the stack first: a
/// `BytesMut::put_u8` is a `memcpy` call for one byte, and an ack or a fetch reply writes
/// thousands of small integers.
struct Staged<'a> {
    dst: &'a mut BytesMut,
    buf: [u8; STAGED],
    len: usize,
}

const STAGED: usize = 512;

impl<'a> Staged<'a> {
    fn new(dst: &'a mut BytesMut) -> Staged<'a> {
        Staged {
            dst,
            buf: [0; STAGED],
            len: 0,
        }
    }

    /// Room for `n` more bytes in the stage (`n` at most `STAGED`).
    fn room(&mut self, n: usize) -> &mut [u8] {
        if self.len + n > STAGED {
            self.flush();
        }
        let start = self.len;
        self.len += n;
        &mut self.buf[start..start + n]
    }

    fn put_u8(&mut self, v: u8) {
        self.room(1)[0] = v;
    }

    fn put_u16(&mut self, v: u16) {
        self.room(2).copy_from_slice(&v.to_be_bytes());
    }

    fn put_u32(&mut self, v: u32) {
        self.room(4).copy_from_slice(&v.to_be_bytes());
    }

    fn put_u64(&mut self, v: u64) {
        self.room(8).copy_from_slice(&v.to_be_bytes());
    }

    fn put_slice(&mut self, bytes: &[u8]) {
        if bytes.len() <= STAGED {
            self.room(bytes.len()).copy_from_slice(bytes);
        } else {
            self.flush();
            self.dst.extend_from_slice(bytes);
        }
    }

    fn flush(&mut self) {
        self.dst.extend_from_slice(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

fn put_uint(dst: &mut Staged<'_>, v: u64) {
    if v < 0x80 {
        dst.put_u8(v as u8);
    } else if let Ok(v) = u8::try_from(v) {
        dst.put_u8(0xcc);
        dst.put_u8(v);
    } else if let Ok(v) = u16::try_from(v) {
        dst.put_u8(0xcd);
        dst.put_u16(v);
    } else if let Ok(v) = u32::try_from(v) {
        dst.put_u8(0xce);
        dst.put_u32(v);
    } else {
        dst.put_u8(0xcf);
        dst.put_u64(v);
    }
}

fn put_opt_uint(dst: &mut Staged<'_>, v: Option<u64>) {
    match v {
        Some(v) => put_uint(dst, v),
        None => dst.put_u8(NIL),
    }
}

fn put_opt_str(dst: &mut Staged<'_>, s: Option<&str>) {
    let Some(s) = s else {
        dst.put_u8(NIL);
        return;
    };
    let len = s.len();
    if len < 32 {
        dst.put_u8(0xa0 | len as u8);
    } else if let Ok(len) = u8::try_from(len) {
        dst.put_u8(0xd9);
        dst.put_u8(len);
    } else if let Ok(len) = u16::try_from(len) {
        dst.put_u8(0xda);
        dst.put_u16(len);
    } else {
        // A header is bounded by the frame, itself at most u32::MAX bytes long.
        dst.put_u8(0xdb);
        dst.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    }
    dst.put_slice(s.as_bytes());
}

fn put_array_len(dst: &mut Staged<'_>, len: usize) {
    if len < 16 {
        dst.put_u8(0x90 | len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        dst.put_u8(0xdc);
        dst.put_u16(len);
    } else {
        dst.put_u8(0xdd);
        dst.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    }
}

/// Reads the canonical form; `None` means "not canonical, ask rmp-serde", never "invalid".
fn read(r: &mut Reader<'_>) -> Option<Box<Header>> {
    let fields = r.array_len()?;
    // rmp-serde refuses more fields than the struct has; its error is the one to give.
    if fields > usize::from(FIELDS) {
        return None;
    }
    let string = |r: &mut Reader<'_>| r.str().map(str::to_owned);
    // Filled in place on the heap, where the frame keeps it.
    let mut header = Box::<Header>::default();
    for field in 0..fields {
        match field {
            0 => header.cmd = Command::from(r.narrow::<u8>()?),
            1 => header.id = r.uint()?,
            2 => header.status = r.narrow()?,
            3 => header.mq = r.opt(string)?,
            4 => header.group = r.opt(string)?,
            5 => header.tag = r.opt(string)?,
            6 => header.offset = r.opt(Reader::uint)?,
            7 => header.count = r.opt(Reader::narrow)?,
            8 => header.timeout_ms = r.opt(Reader::narrow)?,
            9 => header.flags = r.narrow()?,
            10 => header.durability = r.opt(Reader::narrow::<u8>)?.map(Durability::from),
            11 => {
                let len = r.array_len()?;
                header.attempts = Vec::with_capacity(r.bounded(len));
                for _ in 0..len {
                    header.attempts.push(r.narrow()?);
                }
            }
            12 => {
                let len = r.array_len()?;
                header.tokens = Vec::with_capacity(r.bounded(len));
                for _ in 0..len {
                    if r.array_len()? != 2 {
                        return None;
                    }
                    let offset = r.uint()?;
                    let attempt = r.narrow()?;
                    header.tokens.push(DeliveryToken { offset, attempt });
                }
            }
            13 => header.error = r.opt(string)?,
            14 => header.encoding = r.opt(string)?,
            15 => header.route = r.opt(string)?,
            17 => {
                let len = r.array_len()?;
                header.offsets = Vec::with_capacity(r.bounded(len));
                for _ in 0..len {
                    header.offsets.push(r.uint()?);
                }
            }
            _ => {
                header.lost = r.opt(|r| {
                    if r.array_len()? != 2 {
                        return None;
                    }
                    let first = r.uint()?;
                    let end = r.uint()?;
                    Some(LostRange { first, end })
                })?
            }
        }
    }
    Some(header)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn text(rng: &mut StdRng) -> String {
        // Byte lengths at every string form's bounds (fixstr, str8, str16), or short text
        // with multi-byte characters.
        let edges = [0, 1, 31, 32, 255, 256, 65_535, 65_536];
        if rng.gen_bool(0.1) {
            "a".repeat(edges[rng.gen_range(0..edges.len())])
        } else {
            let len = rng.gen_range(0..40);
            (0..len)
                .map(|i| if i % 7 == 3 { 'é' } else { 'a' })
                .collect()
        }
    }

    fn number(rng: &mut StdRng) -> u64 {
        let edges = [
            0,
            1,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u32::MAX.into(),
            u64::MAX,
        ];
        if rng.gen_bool(0.5) {
            edges[rng.gen_range(0..edges.len())]
        } else {
            rng.gen::<u64>() >> rng.gen_range(0..64)
        }
    }

    fn small<T: TryFrom<u64> + Default>(rng: &mut StdRng) -> T {
        T::try_from(number(rng)).unwrap_or_default()
    }

    fn maybe<T>(rng: &mut StdRng, make: impl FnOnce(&mut StdRng) -> T) -> Option<T> {
        rng.gen_bool(0.6).then(|| make(rng))
    }

    fn header(rng: &mut StdRng) -> Header {
        // Now and then long enough to pass through the encoder's stage several times.
        let list = |rng: &mut StdRng| {
            if rng.gen_bool(0.02) {
                rng.gen_range(0..600usize)
            } else {
                rng.gen_range(0..20usize)
            }
        };
        Header {
            cmd: Command::from(rng.gen::<u8>()),
            id: number(rng),
            status: small(rng),
            mq: maybe(rng, text),
            group: maybe(rng, text),
            tag: maybe(rng, text),
            offset: maybe(rng, number),
            count: maybe(rng, small),
            timeout_ms: maybe(rng, small),
            flags: small(rng),
            durability: maybe(rng, |rng| Durability::from(rng.gen_range(1..=3u8))),
            attempts: (0..list(rng)).map(|_| small(rng)).collect(),
            tokens: (0..list(rng))
                .map(|_| DeliveryToken {
                    offset: number(rng),
                    attempt: small(rng),
                })
                .collect(),
            error: maybe(rng, text),
            encoding: maybe(rng, text),
            route: maybe(rng, text),
            lost: maybe(rng, |rng| LostRange {
                first: number(rng),
                end: number(rng),
            }),
            offsets: if rng.gen_bool(0.5) {
                Vec::new()
            } else {
                (0..list(rng)).map(|_| number(rng)).collect()
            },
        }
    }

    /// What rmp-serde writes for `header`, minus empty trailing fields newer than version 1
    /// (the codec leaves them out so version 1 peers get the 16 fields they know).
    fn rmp_form(header: &Header) -> Vec<u8> {
        let mut bytes = rmp_serde::to_vec(header).unwrap();
        let mut fields = FIELDS;
        if header.offsets.is_empty() {
            assert_eq!(bytes.pop(), Some(0x90));
            fields -= 1;
            if header.lost.is_none() {
                assert_eq!(bytes.pop(), Some(NIL));
                fields -= 1;
            }
        }
        bytes[2] = fields as u8;
        bytes
    }

    fn seed() -> u64 {
        let seed = rand::random();
        eprintln!("header codec test seed: {seed} (set QBUS_TEST_SEED to replay)");
        std::env::var("QBUS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(seed)
    }

    fn by_rmp(bytes: &[u8]) -> Result<Box<Header>, String> {
        rmp_serde::from_slice(bytes)
            .map(Box::new)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn writes_what_rmp_serde_writes_and_reads_it_back() {
        let mut rng = StdRng::seed_from_u64(seed());
        for _ in 0..2_000 {
            let header = header(&mut rng);
            let mut ours = BytesMut::new();
            encode(&header, &mut ours);
            let theirs = rmp_form(&header);
            assert_eq!(&ours[..], &theirs[..], "{header:?}");
            let fast = read(&mut Reader::new(&ours));
            assert_eq!(
                fast.as_deref(),
                Some(&header),
                "the canonical form is read directly"
            );
        }
    }

    #[test]
    fn damaged_or_unusual_headers_decode_as_rmp_serde_decodes_them() {
        let mut rng = StdRng::seed_from_u64(seed());
        for _ in 0..20_000 {
            let mut bytes = BytesMut::new();
            encode(&header(&mut rng), &mut bytes);
            let mut bytes = bytes.to_vec();
            match rng.gen_range(0..4) {
                0 => bytes.truncate(rng.gen_range(0..bytes.len())),
                1 => {
                    let at = rng.gen_range(0..bytes.len());
                    bytes[at] = rng.gen();
                }
                2 => {
                    let at = rng.gen_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.gen_range(0..8);
                }
                _ => {
                    let at = rng.gen_range(0..=bytes.len());
                    bytes.insert(at, rng.gen());
                }
            }
            let fast = read(&mut Reader::new(&bytes));
            if let Some(fast) = &fast {
                assert_eq!(Ok(fast), by_rmp(&bytes).as_ref(), "{bytes:02x?}");
            }
            assert_eq!(decode(&bytes), by_rmp(&bytes), "{bytes:02x?}");
        }
    }

    #[test]
    fn other_legal_forms_go_to_rmp_serde() {
        // A map of field names, a binary string, a signed integer, a short array.
        let map = [0x82, 0xa3, b'c', b'm', b'd', 11, 0xa2, b'i', b'd', 0xd0, 5];
        let header = decode(&map).unwrap();
        assert_eq!((header.cmd, header.id), (Command::Fetch, 5));
        let binary_mq = [0x94, 11, 0, 0, 0xc4, 1, b'a'];
        assert_eq!(decode(&binary_mq).unwrap().mq.as_deref(), Some("a"));
        assert_eq!(decode(&[0x92, 11, 7]).unwrap().id, 7);
        assert_eq!(*decode(&[0x90]).unwrap(), Header::default());
    }

    #[test]
    fn hostile_lengths_reserve_nothing_they_cannot_fill() {
        // 2^32 - 1 attempts announced in a 20-byte header.
        let mut bytes = vec![0x9c, 11, 0, 0, 0xc0, 0xc0, 0xc0, 0xc0, 0xc0, 0xc0, 0, 0xc0];
        bytes.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        assert!(decode(&bytes).is_err());
    }
}
