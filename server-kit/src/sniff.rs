//! Telling HTTP from the binary protocol by a connection's first byte.
//!
//! A binary frame starts with its length as a big-endian `u32`, and a server accepts frames
//! of at most 1 GiB, so the first byte of a binary connection is at most 0x40. Every
//! HTTP/1.1 request starts with a method token in capital letters (`GET`, `POST`, `PUT`,
//! `DELETE`, `HEAD`, `OPTIONS`, ...), 0x41 to 0x5A. The two ranges never meet, so one
//! peeked byte decides, and nothing is consumed: the chosen protocol reads the stream from
//! its start.

use std::time::Duration;

use tokio::net::TcpStream;

/// True when `first` starts an HTTP request. Anything else goes to the binary protocol, so
/// garbage gets its clear error reply.
pub fn starts_like_http(first: u8) -> bool {
    first.is_ascii_uppercase()
}

/// Waits up to `limit` for the first byte of `stream` and tells whether it starts HTTP,
/// without consuming it. Fails when the peer closes first or stays silent for `limit`.
pub async fn is_http(stream: &TcpStream, limit: Duration) -> std::io::Result<bool> {
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
    Ok(starts_like_http(first[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_http_and_frames_are_binary() {
        for method in ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"] {
            assert!(starts_like_http(method.as_bytes()[0]), "{method}");
        }
        // The largest frame a server accepts is 1 GiB: its first length byte is 0x40.
        let largest = (1u32 << 30).to_be_bytes();
        assert!(!starts_like_http(largest[0]));
        assert!(!starts_like_http(0));
        assert!(!starts_like_http(b'g'), "methods are case-sensitive");
    }

    #[tokio::test]
    async fn peeks_without_consuming_and_fails_on_silence() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let limit = Duration::from_millis(50);
        let silent = is_http(&server, limit).await.unwrap_err();
        assert_eq!(silent.kind(), std::io::ErrorKind::TimedOut);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(is_http(&server, limit).await.unwrap());
        let mut first = [0u8; 3];
        server.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"GET");
    }
}
