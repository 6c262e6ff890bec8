//! Stable numeric status codes carried in every reply.
//!
//! The numbers follow HTTP where a meaning overlaps, so the same code can be used by the HTTP
//! gateway. They are part of the frozen wire format (see `docs/protocol.md`): never renumber.

use std::fmt;

/// Outcome of a request, as carried in the reply header's `status` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// The request succeeded.
    Ok,
    /// A field of the request is missing or invalid.
    BadRequest,
    /// No credentials where the server needs them, or bad ones (protocol 3).
    Unauthorized,
    /// The credentials are good, but do not allow this operation on this MQ (protocol 3).
    Forbidden,
    /// The named MQ (or group) does not exist.
    NotFound,
    /// The MQ already exists with other options, or the store is in use.
    Conflict,
    /// The frame or a record exceeds the configured maximum size.
    TooLarge,
    /// The peer has too much in flight; retry later.
    Overloaded,
    /// The server failed (storage error, corruption); see the message.
    Internal,
    /// The command number is not known to this server.
    UnknownCommand,
    /// The server is shutting down, or (MQ-RPC) nothing consumes the MQ.
    Unavailable,
    /// The request's deadline passed before its answer came (RPC calls).
    DeadlineExceeded,
    /// The broker's disk is full (or over quota): nothing was stored; retry once space
    /// returns, or on another broker.
    InsufficientStorage,
    /// A code this version does not know (sent by a newer peer).
    Other(u16),
}

impl Status {
    /// The numeric code put on the wire.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::Unauthorized => 401,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::Conflict => 409,
            Status::TooLarge => 413,
            Status::Overloaded => 429,
            Status::Internal => 500,
            Status::UnknownCommand => 501,
            Status::Unavailable => 503,
            Status::DeadlineExceeded => 504,
            Status::InsufficientStorage => 507,
            Status::Other(code) => code,
        }
    }

    /// Maps a wire code back to a status; unknown codes are kept as [`Status::Other`].
    pub fn from_code(code: u16) -> Status {
        match code {
            200 => Status::Ok,
            400 => Status::BadRequest,
            401 => Status::Unauthorized,
            403 => Status::Forbidden,
            404 => Status::NotFound,
            409 => Status::Conflict,
            413 => Status::TooLarge,
            429 => Status::Overloaded,
            500 => Status::Internal,
            501 => Status::UnknownCommand,
            503 => Status::Unavailable,
            504 => Status::DeadlineExceeded,
            507 => Status::InsufficientStorage,
            other => Status::Other(other),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Status::Ok => "ok",
            Status::BadRequest => "bad request",
            Status::Unauthorized => "unauthorized",
            Status::Forbidden => "forbidden",
            Status::NotFound => "not found",
            Status::Conflict => "conflict",
            Status::TooLarge => "too large",
            Status::Overloaded => "overloaded",
            Status::Internal => "internal error",
            Status::UnknownCommand => "unknown command",
            Status::Unavailable => "unavailable",
            Status::DeadlineExceeded => "deadline exceeded",
            Status::InsufficientStorage => "insufficient storage",
            Status::Other(_) => "status",
        };
        write!(f, "{} {}", self.code(), name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in [
            200, 400, 401, 403, 404, 409, 413, 429, 500, 501, 503, 504, 507, 299,
        ] {
            assert_eq!(Status::from_code(code).code(), code);
        }
        assert_eq!(Status::from_code(299), Status::Other(299));
    }
}
