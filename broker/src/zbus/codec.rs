//! The zbus 7.x message: an HTTP/1.1-shaped head (a request or status line, `name: value`
//! headers) and a body of `content-length` bytes. Unlike HTTP, messages on one connection
//! are independent: replies carry their request's `id` header and may come in any order,
//! and the server pushes replies to waiting consumes whenever a message arrives. So this is
//! a codec of its own, not hyper.
//!
//! [`decode`] and [`encode`] do no I/O; [`ZbusCodec`] adapts them to `tokio_util::codec`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Longest head (start line and headers) accepted; zbus heads are a few hundred bytes.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers one message may carry.
pub const MAX_HEADERS: usize = 256;

/// Why bytes are not a zbus message.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// No blank line ends the head within [`MAX_HEAD`] bytes.
    #[error("message head exceeds {max} bytes without its blank line (have {have})")]
    HeadTooLarge {
        /// Bytes read without finding the end of the head.
        have: usize,
        /// The limit.
        max: usize,
    },
    /// The body announced by `content-length` exceeds the limit.
    #[error("body of {size} bytes exceeds the limit of {max} bytes (max-frame)")]
    BodyTooLarge {
        /// `content-length`.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The head is not a request line (or status line) and headers.
    #[error("bad message head: {0}")]
    BadHead(String),
    /// Reading or writing the socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The first line of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    /// `GET /path HTTP/1.1`: a request (every zbus client sends `GET /`).
    Request {
        /// The method.
        method: String,
        /// The URL as sent.
        url: String,
    },
    /// `HTTP/1.1 200 OK`: a reply.
    Status(u16),
}

/// One zbus message. Header names are kept lowercase (zbus lowercases them on reading, and
/// its Python client looks them up in lowercase); `content-length` is not among them, it is
/// computed from the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Request or status line.
    pub start: StartLine,
    /// Headers in the order given, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl Message {
    /// A reply with `status`, no headers and an empty body.
    pub fn reply(status: u16) -> Message {
        Message {
            start: StartLine::Status(status),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// The value of header `name` (lowercase), if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Sets header `name` (lowercase), replacing an earlier value.
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self.headers.iter_mut().find(|(key, _)| key == name) {
            Some(slot) => slot.1 = value,
            None => self.headers.push((name.to_owned(), value)),
        }
    }

    /// With `body` as the body.
    pub fn with_body(mut self, body: impl Into<Bytes>) -> Message {
        self.body = body.into();
        self
    }
}

/// Decodes one message from the front of `src`: `Ok(None)` when more bytes are needed,
/// otherwise the message and how many bytes it took. Bodies longer than `max_body` fail
/// before they are buffered.
pub fn decode(src: &[u8], max_body: usize) -> Result<Option<(Message, usize)>, CodecError> {
    let Some(head_len) = find_head_end(src) else {
        if src.len() > MAX_HEAD {
            return Err(CodecError::HeadTooLarge {
                have: src.len(),
                max: MAX_HEAD,
            });
        }
        return Ok(None);
    };
    if head_len > MAX_HEAD {
        return Err(CodecError::HeadTooLarge {
            have: head_len,
            max: MAX_HEAD,
        });
    }
    let head = std::str::from_utf8(&src[..head_len - 4])
        .map_err(|e| CodecError::BadHead(format!("not UTF-8 at byte {}", e.valid_up_to())))?;
    let mut lines = head.split("\r\n");
    let start = parse_start(lines.next().unwrap_or_default())?;
    let mut headers = Vec::new();
    let mut length = 0usize;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| CodecError::BadHead(format!("header line {line:?} has no ':'")))?;
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim();
        if name == "content-length" {
            length = value.parse().map_err(|_| {
                CodecError::BadHead(format!("content-length {value:?} is not a number"))
            })?;
            continue;
        }
        if headers.len() == MAX_HEADERS {
            return Err(CodecError::BadHead(format!(
                "more than {MAX_HEADERS} headers"
            )));
        }
        headers.push((name, value.to_owned()));
    }
    if length > max_body {
        return Err(CodecError::BodyTooLarge {
            size: length,
            max: max_body,
        });
    }
    let total = head_len + length;
    if src.len() < total {
        return Ok(None);
    }
    let body = Bytes::copy_from_slice(&src[head_len..total]);
    Ok(Some((
        Message {
            start,
            headers,
            body,
        },
        total,
    )))
}

/// Bytes up to and including the blank line ending the head, if it is in `src`.
fn find_head_end(src: &[u8]) -> Option<usize> {
    src.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

fn parse_start(line: &str) -> Result<StartLine, CodecError> {
    let mut words = line.split_ascii_whitespace();
    let bad = || CodecError::BadHead(format!("bad start line {line:?}"));
    let first = words.next().ok_or_else(bad)?;
    if first.to_ascii_uppercase().starts_with("HTTP/") {
        let status = words.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        return Ok(StartLine::Status(status));
    }
    let url = words.next().unwrap_or("/");
    Ok(StartLine::Request {
        method: first.to_owned(),
        url: url.to_owned(),
    })
}

/// Appends `message` to `dst` with its `content-length`.
pub fn encode(message: &Message, dst: &mut BytesMut) {
    let head_guess = 64
        + message
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>();
    dst.reserve(head_guess + message.body.len());
    match &message.start {
        StartLine::Status(status) => {
            dst.put_slice(format!("HTTP/1.1 {status} {}\r\n", reason(*status)).as_bytes())
        }
        StartLine::Request { method, url } => {
            dst.put_slice(format!("{method} {url} HTTP/1.1\r\n").as_bytes())
        }
    }
    for (name, value) in &message.headers {
        // A value with a line break would end the header early: such values never come
        // from the codec (it splits on them), but a stored one could hold one.
        let value = value.replace(['\r', '\n'], " ");
        dst.put_slice(name.as_bytes());
        dst.put_slice(b": ");
        dst.put_slice(value.as_bytes());
        dst.put_slice(b"\r\n");
    }
    dst.put_slice(format!("content-length: {}\r\n\r\n", message.body.len()).as_bytes());
    dst.put_slice(&message.body);
}

/// The reason phrase of a status, as zbus writes it.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        406 => "Not Acceptable",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown Status",
    }
}

/// [`decode`] and [`encode`] as a `tokio_util` codec.
#[derive(Debug, Clone)]
pub struct ZbusCodec {
    max_body: usize,
}

impl ZbusCodec {
    /// A codec refusing bodies over `max_body` bytes.
    pub fn new(max_body: usize) -> ZbusCodec {
        ZbusCodec { max_body }
    }
}

impl Decoder for ZbusCodec {
    type Item = Message;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, CodecError> {
        match decode(src, self.max_body)? {
            Some((message, used)) => {
                src.advance(used);
                Ok(Some(message))
            }
            None => Ok(None),
        }
    }
}

impl Encoder<Message> for ZbusCodec {
    type Error = CodecError;

    fn encode(&mut self, message: Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode(&message, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_the_python_client_sends_and_waits_for_the_body() {
        let wire = b"GET / HTTP/1.1\r\ncmd: produce\r\nmq: MyMQ\r\nid: 7f\r\ncontent-length: 5\r\n\r\nhello";
        assert!(decode(&wire[..wire.len() - 1], 1024).unwrap().is_none());
        let (message, used) = decode(wire, 1024).unwrap().unwrap();
        assert_eq!(used, wire.len());
        assert_eq!(message.get("cmd"), Some("produce"));
        assert_eq!(message.get("content-length"), None);
        assert_eq!(&message.body[..], b"hello");
    }

    #[test]
    fn header_names_are_lowercased_and_replies_round_trip() {
        let (message, _) = decode(b"HTTP/1.1 404 Not Found\r\nMQ:  x \r\n\r\n", 0)
            .unwrap()
            .unwrap();
        assert_eq!(message.start, StartLine::Status(404));
        assert_eq!(message.get("mq"), Some("x"));
        let mut out = BytesMut::new();
        encode(&message.clone().with_body("gone"), &mut out);
        assert_eq!(
            &out[..],
            b"HTTP/1.1 404 Not Found\r\nmq: x\r\ncontent-length: 4\r\n\r\ngone"
        );
        let (back, _) = decode(&out, 16).unwrap().unwrap();
        assert_eq!(back, message.with_body("gone"));
    }

    #[test]
    fn bad_input_fails_with_the_limit_named() {
        let long = "GET / HTTP/1.1\r\ncontent-length: 100\r\n\r\n";
        assert!(matches!(
            decode(long.as_bytes(), 10),
            Err(CodecError::BodyTooLarge { size: 100, max: 10 })
        ));
        assert!(matches!(
            decode(&vec![b'a'; MAX_HEAD + 1], 10),
            Err(CodecError::HeadTooLarge { .. })
        ));
        assert!(decode(b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 10).is_err());
        assert!(decode(b"GET / HTTP/1.1\r\ncontent-length: x\r\n\r\n", 10).is_err());
        assert!(decode(b"HTTP/1.1 abc\r\n\r\n", 10).is_err());
        assert!(decode(b"GET / HTTP/1.1\r\nk: \xff\r\n\r\n", 10).is_err());
    }
}
