//! Tracker settings: command-line flags over `QBUS_TRACKER_*` environment variables over an
//! optional TOML file (`qbus-tracker.toml` documents every key) over defaults. A bad value
//! is reported with the key that holds it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qbus_server_kit::auth::{Access, UserSpec};
use qbus_server_kit::config::{listen_addr, read_toml};
use qbus_server_kit::tls::server_tls;
use qbus_wire::tls::ServerTls;
use serde::Deserialize;

pub use qbus_server_kit::units::parse_duration;
pub use qbus_server_kit::ConfigError;

/// Settings as given by one source; unset fields fall through to the next source.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// Address to listen on [default: 0.0.0.0]
    #[arg(long, env = "QBUS_TRACKER_BIND")]
    pub bind: Option<String>,
    /// Port for the binary protocol and HTTP (monitor page, /api/stats, /metrics,
    /// /topology) [default: 16666]
    #[arg(long, env = "QBUS_TRACKER_PORT")]
    pub port: Option<u16>,
    /// Reports in a row a node may miss before it is dropped (its lease) [default: 3]
    #[arg(long, env = "QBUS_TRACKER_LEASE_REPORTS")]
    pub lease_reports: Option<u32>,
    /// After start, how long the view counts as incomplete while brokers reconnect, e.g.
    /// 3s; subscribers keep brokers it does not list yet [default: 3s]
    #[arg(long, env = "QBUS_TRACKER_WARMUP")]
    pub warmup: Option<String>,
    /// TLS: this tracker's certificate chain, a PEM file; with it the port speaks TLS only
    /// [default: none, plain TCP]
    #[arg(long, env = "QBUS_TRACKER_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: the private key of --tls-cert, a PEM file
    #[arg(long, env = "QBUS_TRACKER_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// TLS: require client certificates (brokers', RPC servers', clients') that chain to
    /// the CAs in this PEM file (mTLS) [default: none]
    #[arg(long, env = "QBUS_TRACKER_TLS_CLIENT_CA", value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// Address ranges served without credentials, e.g. 127.0.0.1/32,10.0.0.0/8
    /// [default: loopback, 127.0.0.0/8 and ::1]
    #[arg(
        long,
        env = "QBUS_TRACKER_ANONYMOUS_FROM",
        value_delimiter = ',',
        value_name = "CIDR[,CIDR]"
    )]
    pub anonymous_from: Option<Vec<String>>,
    /// Serve clients without credentials from every address (with no users: every node
    /// may register) [default: false]
    #[arg(
        long,
        env = "QBUS_TRACKER_ALLOW_ANONYMOUS",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub allow_anonymous: Option<bool>,
    /// Users: `[[users]]` tables of the settings file only, as the broker's; nodes need
    /// the `register` permission (README, "Security").
    #[arg(skip)]
    pub users: Option<Vec<UserSpec>>,
}

impl Settings {
    /// Fills every unset field of `self` from `other`.
    pub fn or(self, other: Settings) -> Settings {
        Settings {
            bind: self.bind.or(other.bind),
            port: self.port.or(other.port),
            lease_reports: self.lease_reports.or(other.lease_reports),
            warmup: self.warmup.or(other.warmup),
            tls_cert: self.tls_cert.or(other.tls_cert),
            tls_key: self.tls_key.or(other.tls_key),
            tls_client_ca: self.tls_client_ca.or(other.tls_client_ca),
            anonymous_from: self.anonymous_from.or(other.anonymous_from),
            allow_anonymous: self.allow_anonymous.or(other.allow_anonymous),
            users: self.users.or(other.users),
        }
    }

    /// Reads a TOML file of settings.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        read_toml(path)
    }

    /// Validates and applies defaults.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let listen = listen_addr(self.bind, self.port.unwrap_or(DEFAULT_PORT))?;
        let lease_reports = self.lease_reports.unwrap_or(3);
        if lease_reports == 0 {
            return Err(ConfigError {
                key: "lease-reports".into(),
                message: "must be at least 1".into(),
            });
        }
        let warmup = match self.warmup {
            Some(text) => parse_duration(&text).map_err(ConfigError::at("warmup"))?,
            None => Duration::from_secs(3),
        };
        let tls = server_tls(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
        )?;
        let access = Access::new(
            self.users.unwrap_or_default(),
            self.anonymous_from,
            self.allow_anonymous.unwrap_or(false),
        )
        .map_err(ConfigError::at("users"))?;
        Ok(Config {
            listen,
            lease_reports,
            warmup,
            tls,
            access: Arc::new(access),
        })
    }
}

/// The tracker's default port.
pub const DEFAULT_PORT: u16 = 16666;

/// Resolved tracker configuration.
///
/// ```
/// use qbus_tracker::Config;
/// let config = Config::local(0);
/// assert_eq!(config.lease_reports, 3);
/// assert!(config.warmup.is_zero());
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Reports a node may miss before it is dropped.
    pub lease_reports: u32,
    /// How long after start the view counts as incomplete.
    pub warmup: Duration,
    /// TLS on the port (TLS only when set).
    pub tls: Option<ServerTls>,
    /// Users, permissions and who is served without credentials.
    pub access: Arc<Access>,
}

impl Config {
    /// Listens on `127.0.0.1:port` with the default lease, no warm-up and no users, every
    /// client served (for tests and in-process trackers that start before their brokers).
    pub fn local(port: u16) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            lease_reports: 3,
            warmup: Duration::ZERO,
            tls: None,
            access: Arc::new(Access::open()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_flags_over_file_and_named_errors() {
        let config = Settings::default().resolve().unwrap();
        assert_eq!(config.listen.port(), 16666);
        assert_eq!(config.warmup, Duration::from_secs(3));
        let file: Settings = toml::from_str("port = 16667\nwarmup = \"500ms\"").unwrap();
        let cli = Settings {
            lease_reports: Some(5),
            ..Settings::default()
        };
        let config = cli.or(file).resolve().unwrap();
        assert_eq!(
            (config.listen.port(), config.lease_reports, config.warmup),
            (16667, 5, Duration::from_millis(500))
        );
        let err = Settings {
            warmup: Some("soon".into()),
            ..Settings::default()
        }
        .resolve()
        .unwrap_err();
        assert_eq!(err.key, "warmup");
        assert!(toml::from_str::<Settings>("lease = 3").is_err());
    }
}
