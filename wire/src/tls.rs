//! TLS for every qbus port, with rustls: the server side ([`ServerTls`]: a certificate and
//! key, optionally a CA that client certificates must chain to) and the client side
//! ([`ClientTls`]: the CA that server certificates must chain to, optionally a client
//! certificate). TLS is transport only: the frames inside are the same protocol.
//!
//! A server with TLS configured speaks TLS only: a peer that starts in plain text is told so
//! in its own protocol (a binary error reply, or an HTTP 400) and the connection closes. A
//! client checks the server's certificate against the host of the address it dials: a DNS
//! name, or an IP address (which the certificate must list as an IP SAN).
//!
//! With client certificates required, the verified certificate names the peer
//! ([`peer_identity`]): its subject's common name (CN), else its first DNS SAN.
//!
//! ```no_run
//! # fn demo() -> Result<(), qbus_wire::tls::TlsError> {
//! use std::path::Path;
//! use qbus_wire::tls::{ClientTls, ServerTls};
//! let server = ServerTls::from_pem_files(Path::new("cert.pem"), Path::new("key.pem"), None)?;
//! let client = ClientTls::from_pem_files(Path::new("ca.pem"), None)?;
//! # drop((server, client)); Ok(()) }
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::link::stream_link;
use crate::protocol::{Frame, Header, Status};
use crate::serve::next_frame;

/// The first byte of every TLS connection: a handshake record (RFC 8446, 5.1). A binary
/// frame of that first byte would be over 350 MiB, beyond any server's limit, and HTTP
/// starts with a capital letter, so this byte alone tells TLS from the other two.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// Largest plain-text frame read from a peer that should have started TLS, to answer it.
const REFUSAL_MAX_FRAME: usize = 64 * 1024;

/// TLS settings that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is unreadable or holds nothing of the kind needed.
    #[error("cannot read {what} from {path}: {reason}")]
    Pem {
        /// What the file should hold (`certificate`, `private key`, `CA certificate`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// rustls refused the certificates or keys (a key that does not match its
    /// certificate, an unsupported key type, a CA that is not a CA).
    #[error("TLS setup: {0}")]
    Config(String),
    /// The address's host is neither a DNS name nor an IP address.
    #[error("cannot verify a server at {addr:?}: {reason}")]
    ServerName {
        /// The address.
        addr: String,
        /// Why its host is not a name a certificate can carry.
        reason: String,
    },
}

fn config_error(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file (a chain: the end entity first).
pub fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Pem {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE block in the file".into()));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Reads the certificates in a PEM file into a store of trusted roots.
pub fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path, "CA certificate")? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            what: "CA certificate",
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The server side of TLS: what a listener offers and, with mTLS, what it requires of
/// clients. Cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    client_auth: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_auth", &self.client_auth)
            .finish()
    }
}

/// A TLS connection a server accepted.
#[derive(Debug)]
pub struct Accepted {
    /// The decrypted stream.
    pub stream: tokio_rustls::server::TlsStream<TcpStream>,
    /// The name in the client's verified certificate (see [`peer_identity`]); `None`
    /// without client certificates.
    pub identity: Option<String>,
}

impl ServerTls {
    /// Serves the certificate chain in `cert` with the key in `key` (PEM files). With
    /// `client_ca`, every client must present a certificate that chains to a CA in that
    /// PEM file (mTLS). Reads the files now, blocking.
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<ServerTls, TlsError> {
        let chain = read_certs(cert, "certificate")?;
        let key = read_key(key)?;
        let client_roots = client_ca.map(read_roots).transpose()?;
        ServerTls::new(chain, key, client_roots)
    }

    /// Serves `chain` (end entity first) with `key`; with `client_roots`, requires client
    /// certificates that chain to them.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        client_roots: Option<RootCertStore>,
    ) -> Result<ServerTls, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?;
        let client_auth = client_roots.is_some();
        let builder = match client_roots {
            Some(roots) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(config_error)?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key).map_err(config_error)?;
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            client_auth,
        })
    }

    /// True when clients must present a certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.client_auth
    }

    /// Shakes hands on a new connection within `limit`. A peer that starts in plain text
    /// is answered in its own protocol (the binary protocol's error reply, or an HTTP 400),
    /// saying this port speaks TLS, and refused; so is a failed handshake (the peer learns
    /// why from the TLS alert).
    pub async fn accept(&self, stream: TcpStream, limit: Duration) -> io::Result<Accepted> {
        let timed_out = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no TLS handshake within {limit:?} of connecting"),
            )
        };
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout(limit, stream.peek(&mut first))
            .await
            .map_err(|_| timed_out())??;
        if peeked == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before sending anything",
            ));
        }
        if first[0] != TLS_HANDSHAKE_BYTE {
            let _ = tokio::time::timeout(limit, refuse_plain(stream, first[0])).await;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "refused a plain-text connection: this port speaks TLS only",
            ));
        }
        // As on plain links: small frames (a reply, an ack) go out at once rather than
        // waiting for the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        let stream = tokio::time::timeout(limit, self.acceptor.accept(stream))
            .await
            .map_err(|_| timed_out())??;
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(peer_identity);
        Ok(Accepted { stream, identity })
    }
}

/// What a plain-text peer of a TLS-only port is told.
const PLAIN_REFUSAL: &str = "this port speaks TLS only: connect with tls://HOST:PORT \
                             (tracker+tls:// for trackers) or https://";

/// Answers a peer that sent plain text to a TLS-only port, in the protocol it started.
async fn refuse_plain(stream: TcpStream, first: u8) {
    if first.is_ascii_uppercase() {
        let mut stream = stream;
        let reply = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{PLAIN_REFUSAL}\n",
            PLAIN_REFUSAL.len() + 1
        );
        let _ = stream.write_all(reply.as_bytes()).await;
        let _ = stream.shutdown().await;
        return;
    }
    // A binary client waits for the reply to its Hello by id, so read that request first.
    let mut link = stream_link(stream, REFUSAL_MAX_FRAME);
    let never = tokio_util::sync::CancellationToken::new();
    let idle = Duration::from_secs(5);
    if let Some(request) = next_frame(&mut link.rx, &link.tx, idle, &never).await {
        let header = Header::error(
            request.header.cmd,
            request.header.id,
            Status::BadRequest,
            PLAIN_REFUSAL.to_owned(),
        );
        let _ = link.tx.send(Frame::new(header)).await;
    }
    // Dropping the sender lets the writer flush the reply and close.
    drop(link);
}

/// The client side of TLS: the roots server certificates must chain to and, for mTLS, the
/// certificate to present. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    client_cert: bool,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

impl ClientTls {
    /// Trusts the CA certificates in the PEM file `ca`; with `client`, presents the
    /// certificate chain and key in those PEM files (`(cert, key)`) to servers that ask.
    /// Reads the files now, blocking.
    pub fn from_pem_files(
        ca: &Path,
        client: Option<(&Path, &Path)>,
    ) -> Result<ClientTls, TlsError> {
        let roots = read_roots(ca)?;
        let client = match client {
            Some((cert, key)) => Some((read_certs(cert, "certificate")?, read_key(key)?)),
            None => None,
        };
        ClientTls::new(roots, client)
    }

    /// Trusts `roots`; with `client`, presents that chain and key to servers that ask.
    pub fn new(
        roots: RootCertStore,
        client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<ClientTls, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_root_certificates(roots);
        let client_cert = client.is_some();
        let config = match client {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(config_error)?,
            None => builder.with_no_client_auth(),
        };
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            client_cert,
        })
    }

    /// Shakes hands over `stream` with the server at `addr` (`host:port`), verifying its
    /// certificate for `host`. A certificate that does not verify fails with an
    /// [`io::ErrorKind::InvalidData`] error that names the reason.
    pub async fn connect(
        &self,
        stream: TcpStream,
        addr: &str,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = server_name(addr).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let _ = stream.set_nodelay(true);
        self.connector.connect(name, stream).await.map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("TLS handshake with {addr} failed: {e}"),
            )
        })
    }
}

/// The name a certificate must carry for the server at `addr` (`host:port`, `[v6]:port`).
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let bad = |reason: &str| TlsError::ServerName {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_owned())
        .map_err(|_| bad("the host is not a DNS name or an IP address"))
}

/// The identity a verified client certificate gives its peer: the subject's common name
/// (CN), or when it has none its first DNS subject alternative name. `None` for a
/// certificate that names neither (or does not parse).
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    common_name(parsed.subject()).or_else(|| parsed.valid_dns_names().next().map(str::to_owned))
}

/// The first common name (OID 2.5.4.3) in a DER `Name`'s contents: a sequence of SETs of
/// `SEQUENCE { OID, value }`.
fn common_name(name: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut sets = name;
    while let Some((tag, set, rest)) = der_item(sets) {
        sets = rest;
        if tag != 0x31 {
            return None;
        }
        let mut pairs = set;
        while let Some((0x30, pair, rest)) = der_item(pairs) {
            pairs = rest;
            let Some((0x06, oid, value)) = der_item(pair) else {
                return None;
            };
            if oid == CN {
                let (_, text, _) = der_item(value)?;
                return std::str::from_utf8(text).ok().map(str::to_owned);
            }
        }
    }
    None
}

/// One DER item at the start of `input`: its tag, contents and what follows.
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 => {
            let (&len, rest) = rest.split_first()?;
            (usize::from(len), rest)
        }
        0x82 => {
            let bytes = rest.get(..2)?;
            (
                usize::from(bytes[0]) << 8 | usize::from(bytes[1]),
                &rest[2..],
            )
        }
        _ => return None,
    };
    let contents = rest.get(..len)?;
    Some((tag, contents, &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_from_addresses() {
        assert!(matches!(
            server_name("127.0.0.1:15555").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:15555").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("broker.example:15555").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("bad host:1").is_err());
    }

    #[test]
    fn der_items_never_read_past_their_input() {
        assert_eq!(
            der_item(&[0x04, 0x02, 1, 2, 9]),
            Some((0x04, &[1u8, 2][..], &[9u8][..]))
        );
        assert_eq!(der_item(&[0x04, 0x05, 1]), None);
        assert_eq!(der_item(&[0x04, 0x82, 0x00]), None);
        assert_eq!(der_item(&[0x04]), None);
        // SET { SEQUENCE { OID 2.5.4.3, UTF8String "alice" } }
        let name = [
            0x31, 0x0e, 0x30, 0x0c, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x05, b'a', b'l', b'i',
            b'c', b'e',
        ];
        assert_eq!(common_name(&name).as_deref(), Some("alice"));
        assert_eq!(common_name(&name[..10]), None);
    }
}
