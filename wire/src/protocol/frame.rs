//! Framing: a length prefix, a MessagePack header and an opaque body.
//!
//! ```text
//! u32 frame_len   big-endian, bytes that follow (4 + header_len + body_len)
//! u32 header_len  big-endian
//! header          MessagePack array (see `Header`)
//! body            opaque bytes, never parsed by the framing layer
//! ```
//!
//! The length prefix is checked against the maximum frame size before anything is allocated,
//! so a peer cannot make us reserve 4 GiB by sending four bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::header::Header;
use super::header_codec;

/// Default largest frame accepted: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Bytes before the header: the frame length and the header length.
const PREFIX_LEN: usize = 8;

/// One protocol message: header plus opaque body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frame {
    /// Command, correlation id and well-known fields. Boxed: a frame is moved through
    /// several futures and channels on its way, and a header is some 330 bytes, so moving
    /// it by value was 8-10 % of a broker's and a client's CPU in MQ-RPC profiles.
    pub header: Box<Header>,
    /// Payload; for produce and fetch a run of records (see `record`).
    pub body: Bytes,
}

impl Frame {
    /// A frame with an empty body.
    pub fn new(header: Header) -> Frame {
        Frame::with_body(header, Bytes::new())
    }

    /// A frame with `body`.
    pub fn with_body(header: Header, body: Bytes) -> Frame {
        Frame {
            header: Box::new(header),
            body,
        }
    }
}

/// Why bytes could not be read as a frame.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The input ends inside a frame.
    #[error("truncated frame: need {need} bytes, have {have}")]
    UnexpectedEof {
        /// Bytes the complete frame needs.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The length prefix exceeds the maximum frame size.
    #[error("frame of {size} bytes exceeds the maximum of {max} bytes (max_frame)")]
    FrameTooLarge {
        /// Announced frame size.
        size: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The header length does not fit in the frame.
    #[error("header length {header_len} does not fit in frame of {frame_len} bytes")]
    BadHeaderLength {
        /// Announced header length.
        header_len: usize,
        /// Announced frame length.
        frame_len: usize,
    },
    /// The header is not valid MessagePack for this protocol version.
    #[error("malformed frame header: {0}")]
    Header(String),
    /// The connection failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Total bytes of the frame starting at `src`, or `None` when the prefix is incomplete.
fn frame_size(src: &[u8], max: usize) -> Result<Option<(usize, usize)>, WireError> {
    if src.len() < PREFIX_LEN {
        return Ok(None);
    }
    let frame_len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    let header_len = u32::from_be_bytes([src[4], src[5], src[6], src[7]]) as usize;
    if frame_len > max {
        return Err(WireError::FrameTooLarge {
            size: frame_len,
            max,
        });
    }
    if frame_len < 4 || header_len > frame_len - 4 {
        return Err(WireError::BadHeaderLength {
            header_len,
            frame_len,
        });
    }
    Ok(Some((4 + frame_len, header_len)))
}

/// Decodes one frame from the start of `src`, returning it and the bytes it used.
///
/// ```
/// use qbus_wire::protocol::{decode, encode, Command, Frame, Header, DEFAULT_MAX_FRAME};
/// let frame = Frame::new(Header::request(Command::Heartbeat, None));
/// let mut buf = bytes::BytesMut::new();
/// encode(&frame, &mut buf).unwrap();
/// let (back, used) = decode(&buf, DEFAULT_MAX_FRAME).unwrap();
/// assert_eq!((back, used), (frame, buf.len()));
/// ```
pub fn decode(src: &[u8], max_frame: usize) -> Result<(Frame, usize), WireError> {
    let eof = |need| WireError::UnexpectedEof {
        need,
        have: src.len(),
    };
    let (total, header_len) = frame_size(src, max_frame)?.ok_or(eof(PREFIX_LEN))?;
    if src.len() < total {
        return Err(eof(total));
    }
    let header = header_codec::decode(&src[PREFIX_LEN..PREFIX_LEN + header_len])
        .map_err(WireError::Header)?;
    let body = Bytes::copy_from_slice(&src[PREFIX_LEN + header_len..total]);
    Ok((Frame { header, body }, total))
}

/// Appends the encoding of `frame` to `dst`.
pub fn encode(frame: &Frame, dst: &mut BytesMut) -> Result<(), WireError> {
    let start = dst.len();
    dst.reserve(PREFIX_LEN + 64 + frame.body.len());
    dst.put_u64(0); // both lengths, patched below
    header_codec::encode(&frame.header, dst);
    let header_len = dst.len() - start - PREFIX_LEN;
    dst.extend_from_slice(&frame.body);
    let frame_len = dst.len() - start - 4;
    let (frame_len, header_len) = match (u32::try_from(frame_len), u32::try_from(header_len)) {
        (Ok(f), Ok(h)) => (f, h),
        _ => {
            dst.truncate(start);
            return Err(WireError::FrameTooLarge {
                size: frame_len,
                max: u32::MAX as usize,
            });
        }
    };
    dst[start..start + 4].copy_from_slice(&frame_len.to_be_bytes());
    dst[start + 4..start + 8].copy_from_slice(&header_len.to_be_bytes());
    Ok(())
}

/// `tokio_util` codec for [`Frame`]s with a maximum frame size.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    /// A codec that rejects frames larger than `max_frame` bytes.
    pub fn new(max_frame: usize) -> FrameCodec {
        FrameCodec { max_frame }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some((total, header_len)) = frame_size(src, self.max_frame)? else {
            return Ok(None);
        };
        if src.len() < total {
            // Reserve only what this (size-checked) frame still needs.
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut raw = src.split_to(total);
        raw.advance(PREFIX_LEN);
        let header = header_codec::decode(&raw[..header_len]).map_err(WireError::Header)?;
        raw.advance(header_len);
        Ok(Some(Frame {
            header,
            body: raw.freeze(),
        }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        encode_within(&frame, dst, self.max_frame)
    }
}

/// [`encode`], refusing (and appending nothing) past `max_frame` bytes.
pub(crate) fn encode_within(
    frame: &Frame,
    dst: &mut BytesMut,
    max_frame: usize,
) -> Result<(), WireError> {
    let start = dst.len();
    encode(frame, dst)?;
    let size = dst.len() - start - 4;
    if size > max_frame {
        dst.truncate(start);
        return Err(WireError::FrameTooLarge {
            size,
            max: max_frame,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Command, DeliveryToken, Durability};

    fn sample() -> Frame {
        let mut header = Header::request(Command::Fetch, Some("orders"));
        header.id = 42;
        header.group = Some("billing".into());
        header.count = Some(100);
        header.timeout_ms = Some(5000);
        header.durability = Some(Durability::Synced);
        header.attempts = vec![1, 2, 3];
        header.tokens = vec![DeliveryToken {
            offset: 7,
            attempt: 2,
        }];
        Frame::with_body(header, Bytes::from_static(b"hello body"))
    }

    fn encoded(frame: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        encode(frame, &mut buf).unwrap();
        buf
    }

    #[test]
    fn round_trip() {
        let frame = sample();
        let buf = encoded(&frame);
        let (back, used) = decode(&buf, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(back, frame);
        assert_eq!(used, buf.len());

        let mut codec = FrameCodec::default();
        let mut stream = buf.clone();
        stream.extend_from_slice(&buf);
        assert_eq!(codec.decode(&mut stream).unwrap(), Some(frame.clone()));
        assert_eq!(codec.decode(&mut stream).unwrap(), Some(frame));
        assert!(stream.is_empty());
    }

    #[test]
    fn every_truncation_point_asks_for_more() {
        let buf = encoded(&sample());
        for cut in 0..buf.len() {
            match decode(&buf[..cut], DEFAULT_MAX_FRAME) {
                Err(WireError::UnexpectedEof { need, have }) => {
                    assert_eq!(have, cut);
                    assert!(need > cut);
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
            let mut partial = BytesMut::from(&buf[..cut]);
            assert!(FrameCodec::default()
                .decode(&mut partial)
                .unwrap()
                .is_none());
        }
    }

    #[test]
    fn huge_length_prefix_is_rejected_without_allocating() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0][..]);
        let before = buf.capacity();
        match FrameCodec::default().decode(&mut buf) {
            Err(WireError::FrameTooLarge { size, max }) => {
                assert_eq!(size, u32::MAX as usize);
                assert_eq!(max, DEFAULT_MAX_FRAME);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(buf.capacity(), before);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut rng_state = 0x2545_f491_4f6c_dd1d_u64;
        let mut errors = 0;
        for len in 8..400 {
            let mut junk = Vec::with_capacity(len);
            for _ in 0..len {
                rng_state ^= rng_state << 13;
                rng_state ^= rng_state >> 7;
                rng_state ^= rng_state << 17;
                junk.push(rng_state as u8);
            }
            // Make the length prefix plausible so the header parser sees the junk.
            let frame_len = (len - 4) as u32;
            junk[..4].copy_from_slice(&frame_len.to_be_bytes());
            if decode(&junk, DEFAULT_MAX_FRAME).is_err() {
                errors += 1;
            }
        }
        assert!(
            errors > 350,
            "junk decoded as frames {} times",
            392 - errors
        );
    }

    #[test]
    fn header_length_larger_than_frame_is_rejected() {
        let mut buf = BytesMut::new();
        buf.put_u32(10);
        buf.put_u32(100);
        buf.put_slice(&[0; 6]);
        assert!(matches!(
            decode(&buf, DEFAULT_MAX_FRAME),
            Err(WireError::BadHeaderLength { .. })
        ));
    }

    #[test]
    fn unknown_command_survives_decoding() {
        let mut header = Header::request(Command::Unknown(99), None);
        header.id = 5;
        let buf = encoded(&Frame::new(header));
        let (back, _) = decode(&buf, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(back.header.cmd, Command::Unknown(99));
        assert_eq!(back.header.id, 5);
    }

    #[test]
    fn encoder_refuses_frames_over_the_limit() {
        let frame = Frame::with_body(Header::default(), Bytes::from(vec![0u8; 2048]));
        let mut buf = BytesMut::new();
        assert!(matches!(
            FrameCodec::new(1024).encode(frame, &mut buf),
            Err(WireError::FrameTooLarge { .. })
        ));
        assert!(buf.is_empty());
    }
}
