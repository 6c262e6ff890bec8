//! Telling HTTP from the binary protocol by a connection's first byte.
//!
//! A binary frame starts with its length as a big-endian `u32`, and a server accepts frames
//! of at most 1 GiB, so the first byte of a binary connection is at most 0x40. Every
//! HTTP/1.1 request starts with a method token in capital letters (`GET`, `POST`, `PUT`,
//! `DELETE`, `HEAD`, `OPTIONS`, ...), 0x41 to 0x5A. The two ranges never meet, so one
//! peeked byte decides, and nothing is consumed: the chosen protocol reads the stream from
//! its start. A TLS stream cannot be peeked: [`read_first`] reads its first bytes and
//! [`Rewind`] replays them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// True when `first` starts an HTTP request. Anything else goes to the binary protocol, so
/// garbage gets its clear error reply.
pub fn starts_like_http(first: u8) -> bool {
    first.is_ascii_uppercase()
}

/// Waits up to `limit` for the first byte of `stream` and tells whether it starts HTTP,
/// without consuming it. Fails when the peer closes first or stays silent for `limit`.
pub async fn is_http(stream: &TcpStream, limit: Duration) -> io::Result<bool> {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(limit, stream.peek(&mut first))
        .await
        .map_err(|_| silent(limit))??;
    if peeked == 0 {
        return Err(closed_early());
    }
    Ok(starts_like_http(first[0]))
}

/// Reads the first bytes of `stream` (at least one) within `limit` and tells whether they
/// start HTTP; the caller replays them with [`Rewind`]. Fails as [`is_http`] does.
pub async fn read_first<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> io::Result<(BytesMut, bool)> {
    let mut first = BytesMut::with_capacity(4096);
    let n = tokio::time::timeout(limit, stream.read_buf(&mut first))
        .await
        .map_err(|_| silent(limit))??;
    if n == 0 {
        return Err(closed_early());
    }
    let http = starts_like_http(first[0]);
    Ok((first, http))
}

fn silent(limit: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no request within {limit:?} of connecting"),
    )
}

fn closed_early() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "closed before sending anything",
    )
}

/// A stream that first yields bytes already read from it.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, with `prefix` read again first.
    pub fn new(prefix: BytesMut, inner: S) -> Rewind<S> {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
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
    async fn read_bytes_are_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET /")
            .await
            .unwrap();
        drop(client);
        let (first, http) = read_first(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(http);
        let mut all = Vec::new();
        Rewind::new(first, server)
            .read_to_end(&mut all)
            .await
            .unwrap();
        assert_eq!(&all[..], b"GET /");
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
