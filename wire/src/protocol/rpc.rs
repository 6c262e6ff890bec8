//! RPC envelopes as the wire carries them: the body of a `Call` and of its reply, the same
//! over DirectRPC and MQ-RPC, in MessagePack or JSON (the frame's `encoding` header says
//! which). Specified in `docs/protocol.md`, "RPC commands".
//!
//! ```text
//! request   {"module": "Greeter", "method": "hello", "params": ["world"], "timeout_ms": 10000}
//! success   {"result": "Hello, world!"}
//! failure   {"error": {"code": 404, "message": "...", "detail": "..."}}
//! ```
//!
//! `params` is an array of the method's arguments in order; `timeout_ms` (optional, default
//! 10 000) is the deadline relative to when the server receives the call (for MQ-RPC, to when
//! the broker stored it). A method's own `Result<T, E>` is an ordinary result value:
//! `{"result": {"Ok": ...}}` or `{"result": {"Err": ...}}`. The `error` shape is reserved for
//! the framework: the call could not be decoded, routed or finished.
//!
//! These types live with the protocol rather than in `qbus-rpc` because the broker reads
//! and writes envelopes too (its HTTP gateway, `POST /rpc/{mq}`); `qbus-rpc` re-exports them.

use std::borrow::Cow;
use std::ops::Range;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::msgpack::Reader;

/// Deadline of a call that names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Stable codes of framework errors; the numbers follow HTTP where a meaning overlaps and
/// never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum ErrorCode {
    /// 400: the request could not be decoded, or its params do not fit the method.
    BadRequest,
    /// 404: no such module or method.
    NotFound,
    /// 415: the request names an encoding the server does not speak.
    UnsupportedEncoding,
    /// 429: the server has too many calls in flight.
    Overloaded,
    /// 500: the handler panicked or its result could not be encoded.
    Internal,
    /// 503: the server is shutting down.
    Unavailable,
    /// 504: the deadline passed before the handler finished; the server stopped it.
    DeadlineExceeded,
    /// A code this version does not know.
    Other(u16),
}

impl From<u16> for ErrorCode {
    fn from(code: u16) -> Self {
        match code {
            400 => ErrorCode::BadRequest,
            404 => ErrorCode::NotFound,
            415 => ErrorCode::UnsupportedEncoding,
            429 => ErrorCode::Overloaded,
            500 => ErrorCode::Internal,
            503 => ErrorCode::Unavailable,
            504 => ErrorCode::DeadlineExceeded,
            other => ErrorCode::Other(other),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        match code {
            ErrorCode::BadRequest => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::UnsupportedEncoding => 415,
            ErrorCode::Overloaded => 429,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
            ErrorCode::DeadlineExceeded => 504,
            ErrorCode::Other(code) => code,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            ErrorCode::BadRequest => "bad request",
            ErrorCode::NotFound => "not found",
            ErrorCode::UnsupportedEncoding => "unsupported encoding",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal error",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::DeadlineExceeded => "deadline exceeded",
            ErrorCode::Other(_) => "error",
        };
        write!(f, "{} {name}", u16::from(*self))
    }
}

/// A framework error as the server reports it: the stable `error` shape of a response,
/// `{"code": 404, "message": "...", "detail": "..."}` (`detail` only when there is one).
///
/// ```
/// use qbus_wire::protocol::rpc::{ErrorCode, RemoteError};
/// let error = RemoteError::new(ErrorCode::NotFound, "no method Greeter.bye")
///     .with_detail("Greeter has: fail, hello");
/// assert_eq!(
///     error.to_string(),
///     "404 not found: no method Greeter.bye (Greeter has: fail, hello)"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}{}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
pub struct RemoteError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
    /// More about it (the decoder's complaint, the methods that exist), when there is more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl RemoteError {
    /// An error without detail.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RemoteError {
        RemoteError {
            code,
            message: message.into(),
            detail: None,
        }
    }

    /// Adds a detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> RemoteError {
        self.detail = Some(detail.into());
        self
    }
}

/// A request as a caller writes it.
#[derive(Debug, Serialize)]
pub struct RequestOut<'a, P: ?Sized> {
    /// The module (service) called.
    pub module: &'a str,
    /// The method called.
    pub method: &'a str,
    /// The method's arguments, in order.
    pub params: &'a P,
    /// The deadline in milliseconds, relative to when the server gets the call.
    pub timeout_ms: u64,
}

/// The part of a request a server reads before it knows the method's parameter types.
#[derive(Debug, Deserialize)]
pub struct RequestHead<'a> {
    /// The module (service) called; empty (or absent) names a server's only module, as
    /// zbus callers send it.
    #[serde(borrow, default)]
    pub module: Cow<'a, str>,
    /// The method called.
    #[serde(borrow)]
    pub method: Cow<'a, str>,
    /// The deadline in milliseconds; [`DEFAULT_TIMEOUT`] when absent.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

impl<'a> RequestHead<'a> {
    /// Reads a MessagePack request in the form callers write (a map with string keys,
    /// each field once, `params` present) without going through serde, and says where its
    /// `params` lie in `bytes`, to be decoded from there once the method is known: the
    /// envelope is then walked once, not once for the head and again for the params.
    ///
    /// `None` means only "not that form": decode the head with serde, whose verdict (or
    /// error) on any other form is the one that holds.
    ///
    /// ```
    /// use qbus_wire::protocol::rpc::{RequestHead, RequestOut};
    /// let request = RequestOut { module: "Greeter", method: "hello", params: &("world",), timeout_ms: 500 };
    /// let bytes = rmp_serde::to_vec_named(&request).unwrap();
    /// let (head, params) = RequestHead::scan_msgpack(&bytes).unwrap();
    /// assert_eq!((&*head.module, &*head.method, head.timeout_ms), ("Greeter", "hello", Some(500)));
    /// let (name,): (String,) = rmp_serde::from_slice(&bytes[params]).unwrap();
    /// assert_eq!(name, "world");
    /// ```
    pub fn scan_msgpack(bytes: &'a [u8]) -> Option<(RequestHead<'a>, Range<usize>)> {
        let mut r = Reader::new(bytes);
        let (mut module, mut method, mut timeout_ms, mut params) = (None, None, None, None);
        for _ in 0..r.map_len()? {
            let again = match r.str()? {
                "module" => module.replace(r.str()?).is_some(),
                "method" => method.replace(r.str()?).is_some(),
                "timeout_ms" => timeout_ms.replace(r.opt(Reader::uint)?).is_some(),
                "params" => params.replace(r.skip()?).is_some(),
                _ => r.skip().map(|_| false)?,
            };
            // serde refuses a field given twice, and only it words the error.
            if again {
                return None;
            }
        }
        if !r.at_end() {
            return None;
        }
        let head = RequestHead {
            module: Cow::Borrowed(module.unwrap_or_default()),
            method: Cow::Borrowed(method?),
            timeout_ms: timeout_ms.flatten(),
        };
        Some((head, params?))
    }
}

/// The parameters of a request, read once the method is known.
#[derive(Debug, Deserialize)]
pub struct RequestParams<P> {
    /// The method's arguments, in order.
    pub params: P,
}

/// A response as a server writes it: a map with the single key `result` or `error`.
#[derive(Debug, Serialize)]
pub enum ResponseOut<'a, T: ?Sized> {
    /// The method's return value.
    #[serde(rename = "result")]
    Result(&'a T),
    /// The framework could not run the call.
    #[serde(rename = "error")]
    Error(&'a RemoteError),
}

/// A response as a caller reads it.
#[derive(Debug, Deserialize)]
pub enum ResponseIn<T> {
    /// The method's return value.
    #[serde(rename = "result")]
    Result(T),
    /// The framework could not run the call.
    #[serde(rename = "error")]
    Error(RemoteError),
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde::ser::SerializeMap;

    use super::*;

    type Params = (String, Vec<u32>, Option<bool>);

    /// One value of an envelope field, of the type the field wants or not.
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Value {
        Text(String),
        Number(u64),
        Negative(i8),
        Nothing(Option<u8>),
        Params(Params),
        Nested(Vec<Vec<u8>>),
    }

    /// A map with entries in the order given, duplicates allowed.
    struct Envelope(Vec<(&'static str, Value)>);

    impl Serialize for Envelope {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut map = s.serialize_map(Some(self.0.len()))?;
            for (key, value) in &self.0 {
                map.serialize_entry(key, value)?;
            }
            map.end()
        }
    }

    /// Mostly the type `key` wants, sometimes any.
    fn value_for(rng: &mut StdRng, key: &str) -> Value {
        let any = value(rng);
        if rng.gen_bool(0.2) {
            return any;
        }
        loop {
            let v = value(rng);
            let fits = match key {
                "module" | "method" => matches!(v, Value::Text(_)),
                "timeout_ms" => matches!(v, Value::Number(_) | Value::Nothing(_)),
                "params" => matches!(v, Value::Params(_)),
                _ => true,
            };
            if fits {
                return v;
            }
        }
    }

    fn value(rng: &mut StdRng) -> Value {
        let text =
            |rng: &mut StdRng| "é".repeat(rng.gen_range(0..20)) + &"m".repeat(rng.gen_range(0..40));
        match rng.gen_range(0..10) {
            0..=2 => Value::Text(text(rng)),
            3..=4 => Value::Number(rng.gen::<u64>() >> rng.gen_range(0..64)),
            5 => Value::Negative(rng.gen_range(-100..0)),
            6 => Value::Nothing(None),
            7..=8 => Value::Params((
                text(rng),
                (0..rng.gen_range(0..20)).map(|_| rng.gen()).collect(),
                rng.gen(),
            )),
            _ => Value::Nested(vec![vec![1; rng.gen_range(0..5)]; rng.gen_range(0..5)]),
        }
    }

    /// Envelopes of every shape: mostly right, some with fields missing, repeated, of the
    /// wrong type or unknown, some damaged after encoding.
    fn envelope(rng: &mut StdRng) -> Vec<u8> {
        let keys = ["module", "method", "params", "timeout_ms", "other"];
        let mut entries: Vec<(&'static str, Value)> = Vec::new();
        for key in keys {
            if rng.gen_bool(0.9) {
                entries.push((key, value_for(rng, key)));
            }
        }
        if rng.gen_bool(0.1) {
            let key = keys[rng.gen_range(0..keys.len())];
            entries.push((key, value_for(rng, key)));
        }
        let len = entries.len();
        for i in 0..len {
            entries.swap(i, rng.gen_range(0..len));
        }
        let mut bytes = rmp_serde::to_vec_named(&Envelope(entries)).expect("encodes");
        match rng.gen_range(0..8) {
            0 => bytes.truncate(rng.gen_range(0..bytes.len())),
            1 => {
                let at = rng.gen_range(0..bytes.len());
                bytes[at] = rng.gen();
            }
            2 => bytes.push(rng.gen()),
            _ => {}
        }
        bytes
    }

    #[test]
    fn the_scan_reads_what_serde_reads_or_leaves_it_to_serde() {
        let mut rng = StdRng::seed_from_u64(0x0e7e);
        let mut scanned = 0;
        for _ in 0..20_000 {
            let bytes = envelope(&mut rng);
            let Some((head, params)) = RequestHead::scan_msgpack(&bytes) else {
                continue;
            };
            scanned += 1;
            let by_serde: RequestHead<'_> =
                rmp_serde::from_slice(&bytes).expect("serde agrees it is a request");
            assert_eq!(
                (&head.module, &head.method, head.timeout_ms),
                (&by_serde.module, &by_serde.method, by_serde.timeout_ms),
                "{bytes:02x?}"
            );
            let ours = rmp_serde::from_slice::<Params>(&bytes[params]).ok();
            let theirs = rmp_serde::from_slice::<RequestParams<Params>>(&bytes)
                .ok()
                .map(|r| r.params);
            assert_eq!(ours, theirs, "{bytes:02x?}");
        }
        // Most envelopes are in the form the scan reads.
        assert!(scanned > 2_000, "only {scanned} scanned");
    }

    #[test]
    fn what_callers_write_is_scanned() {
        let method = "m".repeat(40);
        for timeout_ms in [0, 127, 128, 70_000, u64::MAX] {
            let request = RequestOut {
                module: "",
                method: &method,
                params: &("p", [1u32, 2], Some(true)),
                timeout_ms,
            };
            let bytes = rmp_serde::to_vec_named(&request).expect("encodes");
            let (head, params) = RequestHead::scan_msgpack(&bytes).expect("the callers' form");
            assert_eq!(
                (&*head.module, head.method.len(), head.timeout_ms),
                ("", 40, Some(timeout_ms))
            );
            let params: Params = rmp_serde::from_slice(&bytes[params]).expect("params");
            assert_eq!(params, ("p".to_owned(), vec![1, 2], Some(true)));
        }
        // A zbus caller names no module and may send no timeout; nil counts as none.
        let bytes = rmp_serde::to_vec_named(&Envelope(vec![
            ("method", Value::Text("m".into())),
            ("timeout_ms", Value::Nothing(None)),
            ("params", Value::Nested(vec![])),
        ]))
        .expect("encodes");
        let (head, params) = RequestHead::scan_msgpack(&bytes).expect("scanned");
        assert_eq!(
            (&*head.module, head.timeout_ms, &bytes[params]),
            ("", None, &[0x90][..])
        );
        // The array form, and a map without params, go to serde.
        let array = rmp_serde::to_vec(&RequestOut {
            module: "a",
            method: "b",
            params: &(),
            timeout_ms: 1,
        })
        .expect("encodes");
        assert!(RequestHead::scan_msgpack(&array).is_none());
        let bare = rmp_serde::to_vec_named(&Envelope(vec![("method", Value::Text("m".into()))]))
            .expect("encodes");
        assert!(RequestHead::scan_msgpack(&bare).is_none());
    }

    #[test]
    fn codes_round_trip() {
        for code in [400, 404, 415, 429, 500, 503, 504, 299] {
            assert_eq!(u16::from(ErrorCode::from(code)), code);
        }
        assert_eq!(ErrorCode::from(299), ErrorCode::Other(299));
    }
}
