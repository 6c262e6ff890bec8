//! Telling HTTP from the binary protocol by a connection's first byte.
//!
//! A binary frame starts with its length as a big-endian `u32`, and a broker accepts frames
//! of at most 1 GiB (`max-frame`), so the first byte of a binary connection is at most 0x40.
//! Every HTTP/1.1 request starts with a method token in capital letters (`GET`, `POST`,
//! `PUT`, `DELETE`, `HEAD`, `OPTIONS`, ...), 0x41 to 0x5A. The two ranges never meet, so one
//! peeked byte decides, and nothing is consumed: the chosen protocol reads the stream from
//! its start.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::metrics::Protocol;

/// How long a new connection may stay silent: as long as the binary protocol lets an
/// established connection idle.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);

/// Classifies a first byte. Anything that does not start like HTTP goes to the binary
/// protocol, so garbage gets its clear error reply.
pub fn classify(first: u8) -> Protocol {
    if first.is_ascii_uppercase() {
        Protocol::Http
    } else {
        Protocol::Binary
    }
}

/// Waits up to `limit` for the first byte of `stream` and classifies it without consuming
/// it. Fails when the peer closes first or stays silent for `limit`.
pub async fn sniff(stream: &TcpStream, limit: Duration) -> std::io::Result<Protocol> {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(limit, stream.peek(&mut first))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no request within {limit:?} of connecting"),
            )
        })??;
    if peeked == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before sending anything",
        ));
    }
    Ok(classify(first[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_http_and_frames_are_binary() {
        for method in ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"] {
            assert_eq!(classify(method.as_bytes()[0]), Protocol::Http, "{method}");
        }
        // The largest frame a broker accepts is 1 GiB: its first length byte is 0x40.
        let largest = (1u32 << 30).to_be_bytes();
        assert_eq!(classify(largest[0]), Protocol::Binary);
        assert_eq!(classify(0), Protocol::Binary);
        assert_eq!(
            classify(b'g'),
            Protocol::Binary,
            "methods are case-sensitive"
        );
    }
}
