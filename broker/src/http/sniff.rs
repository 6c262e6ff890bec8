//! Telling HTTP from the binary protocol by a connection's first byte (the rule is in
//! [`qbus_server_kit::sniff`]; the tracker shares it): one peeked byte decides, and nothing is
//! consumed, so the chosen protocol reads the stream from its start.

use std::time::Duration;

use qbus_server_kit::sniff::is_http;
use tokio::net::TcpStream;

use crate::metrics::Protocol;

/// How long a new connection may stay silent: as long as the binary protocol lets an
/// established connection idle.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits up to `limit` for the first byte of `stream` and classifies it without consuming
/// it. Fails when the peer closes first or stays silent for `limit`.
pub async fn sniff(stream: &TcpStream, limit: Duration) -> std::io::Result<Protocol> {
    is_http(stream, limit).await.map(protocol)
}

/// Anything that does not start like HTTP goes to the binary protocol, so garbage gets its
/// clear error reply.
fn protocol(http: bool) -> Protocol {
    if http {
        Protocol::Http
    } else {
        Protocol::Binary
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qbus_server_kit::sniff::starts_like_http;

    fn classify(first: u8) -> Protocol {
        protocol(starts_like_http(first))
    }

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
