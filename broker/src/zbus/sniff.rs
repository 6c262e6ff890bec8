//! Telling a zbus connection from a plain HTTP one. Both start with an HTTP request line;
//! a zbus request names its command in a `cmd` header (or, from a browser, a `cmd=` query
//! parameter), which qbus's own HTTP API never uses. So the first request's head decides:
//! it is read (at most [`MAX_HEAD`] bytes) and then replayed to whichever door takes the
//! connection, through [`Rewind`].

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

pub use qbus_server_kit::sniff::Rewind;

use super::codec::MAX_HEAD;

/// Reads from `stream` until the first request's head is complete (or [`MAX_HEAD`] bytes
/// came without it, or the peer closed), within `limit`. Returns the bytes read and
/// whether they start a zbus request.
pub async fn first_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> io::Result<(BytesMut, bool)> {
    let mut read = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
            let zbus = names_a_command(&read[..end]);
            return Ok((read, zbus));
        }
        if read.len() >= MAX_HEAD {
            // Too long for zbus: the HTTP door answers it (431).
            return Ok((read, false));
        }
        let n = tokio::time::timeout_at(deadline, stream.read_buf(&mut read))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no complete request head within {limit:?} of connecting"),
                )
            })??;
        if n == 0 {
            // Closed early: let the HTTP door see what came (it answers or drops it).
            return Ok((read, false));
        }
    }
}

/// True when a request head carries a `cmd` header or a `cmd` query parameter.
pub fn names_a_command(head: &[u8]) -> bool {
    let Ok(head) = std::str::from_utf8(head) else {
        return false;
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let query_cmd = request_line
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|url| url.split_once('?'))
        .is_some_and(|(_, query)| query.split('&').any(|pair| pair.starts_with("cmd=")));
    query_cmd
        || lines.any(|line| {
            line.split_once(':')
                .is_some_and(|(name, _)| name.trim().eq_ignore_ascii_case("cmd"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cmd_header_or_parameter_makes_a_zbus_request() {
        assert!(names_a_command(b"GET / HTTP/1.1\r\nCmd: consume\r\nmq: a"));
        assert!(names_a_command(
            b"GET /?mq=a&cmd=query_mq HTTP/1.1\r\nhost: x"
        ));
        assert!(!names_a_command(
            b"GET /mq/a/next?group=cmd HTTP/1.1\r\nhost: x"
        ));
        assert!(!names_a_command(b"GET / HTTP/1.1\r\nx-cmd: 1"));
    }

    #[tokio::test]
    async fn the_head_is_replayed_before_the_rest() {
        let (mut client, server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\ncmd: x\r\n\r\nrest")
            .await
            .unwrap();
        drop(client);
        let mut server = server;
        let (head, zbus) = first_head(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(zbus);
        let mut all = Vec::new();
        Rewind::new(head, server)
            .read_to_end(&mut all)
            .await
            .unwrap();
        assert_eq!(&all[..], b"GET / HTTP/1.1\r\ncmd: x\r\n\r\nrest");
    }
}
