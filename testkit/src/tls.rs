//! A certificate authority made for one test: CA, server and client certificates written
//! as PEM files to a temp dir (what `--tls-cert`, `--tls-key`, `--tls-client-ca` and
//! `--ca` read), and the SDK's TLS settings for them.
//!
//! ```no_run
//! use qbus_testkit::tls::TestCa;
//! let ca = TestCa::new("test CA");
//! let broker = ca.issue("broker"); // CN=broker, SANs localhost and 127.0.0.1
//! let args = broker.server_args();  // ["--tls-cert", ..., "--tls-key", ...]
//! let tls = ca.client_tls();        // trusts this CA only
//! ```

use std::path::{Path, PathBuf};

use qbus_client::tls::ClientTls;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A CA whose files live as long as it does.
pub struct TestCa {
    dir: tempfile::TempDir,
    cert: Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// A certificate the CA issued and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

impl Issued {
    /// `--tls-cert <cert> --tls-key <key>`, the flags of a server that serves it.
    pub fn server_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}

impl TestCa {
    /// A fresh CA with the common name `name`, its certificate written to `ca.pem`.
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign the CA");
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write ca.pem");
        TestCa { dir, cert, key }
    }

    /// The CA certificate's PEM file.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issues a certificate with the common name `name` for servers and clients alike:
    /// SANs `localhost` and `127.0.0.1`, usable for server and client authentication.
    /// Written to `<name>.pem` and `<name>.key`.
    pub fn issue(&self, name: &str) -> Issued {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign the certificate");
        let issued = Issued {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("write the certificate");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write the key");
        issued
    }

    /// Client TLS that trusts this CA only and presents no certificate.
    pub fn client_tls(&self) -> ClientTls {
        ClientTls::from_pem_files(&self.ca(), None).expect("client TLS")
    }

    /// Client TLS that trusts this CA and presents `client`.
    pub fn client_tls_as(&self, client: &Issued) -> ClientTls {
        ClientTls::from_pem_files(&self.ca(), Some((&client.cert, &client.key)))
            .expect("client TLS with a certificate")
    }
}
