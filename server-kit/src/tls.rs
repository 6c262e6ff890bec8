//! The TLS settings every server takes (`tls-cert`, `tls-key`, `tls-client-ca`, and for a
//! server that reports to trackers `tracker-ca`), checked once into the rustls configs of
//! `qbus_wire::tls`, with errors under the key that holds the bad file.

use std::path::Path;

use qbus_wire::tls::{ClientTls, ServerTls, TlsError};

use crate::config::ConfigError;

/// The server side: `None` without `tls-cert`. A certificate without its key (or a key or
/// client CA without a certificate) is an error.
pub fn server_tls(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<Option<ServerTls>, ConfigError> {
    let (cert, key) = match (cert, key) {
        (None, None) if client_ca.is_none() => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (None, _) => {
            return Err(ConfigError::at("tls-cert")(
                "tls-key and tls-client-ca need a certificate: set tls-cert too".into(),
            ))
        }
        (Some(_), None) => {
            return Err(ConfigError::at("tls-key")(
                "tls-cert needs its private key: set tls-key".into(),
            ))
        }
    };
    ServerTls::from_pem_files(cert, key, client_ca)
        .map(Some)
        .map_err(|e| at_file(e, &[("tls-cert", cert), ("tls-key", key)], "tls-client-ca"))
}

/// The client side towards trackers: `None` without `tracker-ca`. With it, a server that
/// has a certificate (`tls-cert`, `tls-key`) also presents it to trackers that ask for one.
pub fn tracker_tls(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<ClientTls>, ConfigError> {
    let Some(ca) = ca else {
        return Ok(None);
    };
    let client = cert.zip(key);
    ClientTls::from_pem_files(ca, client)
        .map(Some)
        .map_err(|e| {
            let files: Vec<(&str, &Path)> = client
                .map(|(c, k)| vec![("tls-cert", c), ("tls-key", k)])
                .unwrap_or_default();
            at_file(e, &files, "tracker-ca")
        })
}

/// `e` under the key whose file it names, else under `other`.
fn at_file(e: TlsError, files: &[(&str, &Path)], other: &str) -> ConfigError {
    let key = match &e {
        TlsError::Pem { path, .. } => files
            .iter()
            .find(|(_, file)| file == path)
            .map_or(other, |(key, _)| key),
        _ => other,
    };
    ConfigError::at(key)(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_halves_and_files_name_their_key() {
        assert!(server_tls(None, None, None).unwrap().is_none());
        let key = server_tls(Some(Path::new("c.pem")), None, None).unwrap_err();
        assert_eq!(key.key, "tls-key");
        let cert = server_tls(None, None, Some(Path::new("ca.pem"))).unwrap_err();
        assert_eq!(cert.key, "tls-cert");
        let missing = server_tls(
            Some(Path::new("/nonexistent/cert.pem")),
            Some(Path::new("/nonexistent/key.pem")),
            None,
        )
        .unwrap_err();
        assert_eq!(missing.key, "tls-cert");
        assert!(
            missing.message.contains("/nonexistent/cert.pem"),
            "{missing}"
        );
        let ca = tracker_tls(Some(Path::new("/nonexistent/ca.pem")), None, None).unwrap_err();
        assert_eq!(ca.key, "tracker-ca");
    }
}
