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
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in [400, 404, 415, 429, 500, 503, 504, 299] {
            assert_eq!(u16::from(ErrorCode::from(code)), code);
        }
        assert_eq!(ErrorCode::from(299), ErrorCode::Other(299));
    }
}
