//! Broker settings: command-line flags over environment variables over an optional TOML
//! file over defaults. Every key is named the same in all three (`--fsync`, `QBUS_FSYNC`,
//! `fsync = ...`), and a bad value is reported with the key that holds it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qbus_client::ha::parse_trackers;
use qbus_client::protocol::Credentials;
use qbus_server_kit::auth::{Access, UserSpec};
use qbus_server_kit::config::{listen_addr, read_toml};
use qbus_server_kit::tls::{server_tls, tracker_tls};
use qbus_wire::tls::{ClientTls, ServerTls};
use serde::Deserialize;

pub use qbus_server_kit::units::{parse_duration, parse_size};
pub use qbus_server_kit::ConfigError;

/// Time between two reports to the trackers without a change, when the settings give none.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(2);
/// The ack timeout when neither the MQ nor the settings give one.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// When appended data is flushed to disk with fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before every acknowledgement, with group commit (the default).
    Always,
    /// In the background every interval; acknowledgements report `written`.
    Interval(Duration),
    /// Never explicitly; the OS writes back when it likes.
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => match other.strip_prefix("interval:") {
                Some(ms) => ms
                    .parse::<u64>()
                    .ok()
                    .filter(|&ms| ms > 0)
                    .map(|ms| FsyncPolicy::Interval(Duration::from_millis(ms)))
                    .ok_or_else(|| format!("bad interval {ms:?}: expected milliseconds > 0")),
                None => Err(format!(
                    "{other:?} is not a policy: use always, interval:<ms> or never"
                )),
            },
        }
    }
}

impl std::fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Interval(d) => write!(f, "interval:{}", d.as_millis()),
            FsyncPolicy::Never => f.write_str("never"),
        }
    }
}

/// Settings as given by one source; unset fields fall through to the next source.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// Address to listen on [default: 0.0.0.0]
    #[arg(long, env = "QBUS_BIND")]
    pub bind: Option<String>,
    /// Port to listen on [default: 15555]
    #[arg(long, env = "QBUS_PORT")]
    pub port: Option<u16>,
    /// Directory holding the MQs [default: ./store]
    #[arg(long, env = "QBUS_STORE")]
    pub store: Option<PathBuf>,
    // The doc is the flag's --help text, so `<ms>` stays as written, not as HTML.
    #[allow(rustdoc::invalid_html_tags)]
    /// always | interval:<ms> | never [default: always]
    #[arg(long, env = "QBUS_FSYNC")]
    pub fsync: Option<String>,
    /// Largest frame (and so message) accepted [default: 16MiB]
    #[arg(long, env = "QBUS_MAX_FRAME")]
    pub max_frame: Option<String>,
    /// Size at which a new segment file is started [default: 64MiB]
    #[arg(long, env = "QBUS_SEGMENT_SIZE")]
    pub segment_size: Option<String>,
    /// Delete the oldest segments of an MQ above this size [default: unlimited]
    #[arg(long, env = "QBUS_RETENTION_SIZE")]
    pub retention_size: Option<String>,
    /// Delete segments whose newest message is older than this, e.g. 7d [default: unlimited]
    #[arg(long, env = "QBUS_RETENTION_AGE")]
    pub retention_age: Option<String>,
    /// Redeliver a message not acknowledged within this time [default: 30s]
    #[arg(long, env = "QBUS_ACK_TIMEOUT")]
    pub ack_timeout: Option<String>,
    /// Deliveries of one message before it moves to the dead-letter MQ [default: 16]
    #[arg(long, env = "QBUS_MAX_DELIVERIES")]
    pub max_deliveries: Option<u32>,
    /// Unacknowledged deliveries one connection may hold per group [default: 65536]
    #[arg(long, env = "QBUS_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<u32>,
    /// HTTP: longest wait for a request's head or body, for the next request on an idle
    /// connection, and for a client to read a reply [default: 10s]
    #[arg(long, env = "QBUS_HTTP_TIMEOUT")]
    pub http_timeout: Option<String>,
    /// zbus protocol: close a connection that sends nothing for this long while no
    /// consume waits on it (zbus servers keep 300 s) [default: 300s]
    #[arg(long, env = "QBUS_ZBUS_IDLE")]
    pub zbus_idle: Option<String>,
    /// Trackers to report to, HOST:PORT[,HOST:PORT...] [default: none, no reporting]
    #[arg(long, env = "QBUS_TRACKER", value_name = "ADDR[,ADDR]")]
    pub tracker: Option<String>,
    /// Address clients should use for this broker, HOST:PORT [default: the bind address,
    /// or if that is 0.0.0.0 the local address facing the first tracker, and the port]
    #[arg(long, env = "QBUS_ADVERTISE", value_name = "ADDR")]
    pub advertise: Option<String>,
    /// How often to report to the trackers without a change; trackers drop a broker after
    /// a few missed reports [default: 2s]
    #[arg(long, env = "QBUS_REPORT_INTERVAL")]
    pub report_interval: Option<String>,
    /// TLS: this broker's certificate chain, a PEM file; with it the port speaks TLS only
    /// [default: none, plain TCP]
    #[arg(long, env = "QBUS_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: the private key of --tls-cert, a PEM file
    #[arg(long, env = "QBUS_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// TLS: require client certificates that chain to the CAs in this PEM file (mTLS)
    /// [default: none, no client certificates]
    #[arg(long, env = "QBUS_TLS_CLIENT_CA", value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// Report to the trackers over TLS, verifying them with the CAs in this PEM file (and
    /// presenting --tls-cert to trackers that ask) [default: none, plain TCP]
    #[arg(long, env = "QBUS_TRACKER_CA", value_name = "PEM")]
    pub tracker_ca: Option<PathBuf>,
    /// The node credential for the trackers: user name (with --tracker-password), if the
    /// trackers have users [default: none]
    #[arg(long, env = "QBUS_TRACKER_USER")]
    pub tracker_user: Option<String>,
    /// The node credential for the trackers: password of --tracker-user [default: none]
    #[arg(long, env = "QBUS_TRACKER_PASSWORD", hide_env_values = true)]
    pub tracker_password: Option<String>,
    /// The node credential for the trackers: a token, instead of user and password
    /// [default: none]
    #[arg(long, env = "QBUS_TRACKER_TOKEN", hide_env_values = true)]
    pub tracker_token: Option<String>,
    /// Address ranges served without credentials, e.g. 127.0.0.1/32,10.0.0.0/8
    /// [default: loopback, 127.0.0.0/8 and ::1]
    #[arg(
        long,
        env = "QBUS_ANONYMOUS_FROM",
        value_delimiter = ',',
        value_name = "CIDR[,CIDR]"
    )]
    pub anonymous_from: Option<Vec<String>>,
    /// Serve clients without credentials from every address (with no users: everyone
    /// may do everything) [default: false]
    #[arg(long, env = "QBUS_ALLOW_ANONYMOUS", num_args = 0..=1, default_missing_value = "true")]
    pub allow_anonymous: Option<bool>,
    /// Users, their hashed secrets and permissions: `[[users]]` tables of the settings file
    /// only (README, "Security").
    #[arg(skip)]
    pub users: Option<Vec<UserSpec>>,
}

impl Settings {
    /// Fills every unset field of `self` from `other`.
    pub fn or(self, other: Settings) -> Settings {
        Settings {
            bind: self.bind.or(other.bind),
            port: self.port.or(other.port),
            store: self.store.or(other.store),
            fsync: self.fsync.or(other.fsync),
            max_frame: self.max_frame.or(other.max_frame),
            segment_size: self.segment_size.or(other.segment_size),
            retention_size: self.retention_size.or(other.retention_size),
            retention_age: self.retention_age.or(other.retention_age),
            ack_timeout: self.ack_timeout.or(other.ack_timeout),
            max_deliveries: self.max_deliveries.or(other.max_deliveries),
            max_in_flight: self.max_in_flight.or(other.max_in_flight),
            http_timeout: self.http_timeout.or(other.http_timeout),
            zbus_idle: self.zbus_idle.or(other.zbus_idle),
            tracker: self.tracker.or(other.tracker),
            advertise: self.advertise.or(other.advertise),
            report_interval: self.report_interval.or(other.report_interval),
            tls_cert: self.tls_cert.or(other.tls_cert),
            tls_key: self.tls_key.or(other.tls_key),
            tls_client_ca: self.tls_client_ca.or(other.tls_client_ca),
            tracker_ca: self.tracker_ca.or(other.tracker_ca),
            tracker_user: self.tracker_user.or(other.tracker_user),
            tracker_password: self.tracker_password.or(other.tracker_password),
            tracker_token: self.tracker_token.or(other.tracker_token),
            anonymous_from: self.anonymous_from.or(other.anonymous_from),
            allow_anonymous: self.allow_anonymous.or(other.allow_anonymous),
            users: self.users.or(other.users),
        }
    }

    /// Reads a TOML file of settings.
    pub fn from_file(path: &std::path::Path) -> Result<Settings, ConfigError> {
        read_toml(path)
    }

    /// Validates and applies defaults.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let bad = ConfigError::at;
        let listen = listen_addr(self.bind, self.port.unwrap_or(15555))?;
        let size = |key: &str, value: Option<String>| {
            value.map(|v| parse_size(&v).map_err(bad(key))).transpose()
        };
        let duration = |key: &str, value: Option<String>| {
            value
                .map(|v| parse_duration(&v).map_err(bad(key)))
                .transpose()
        };
        let max_frame = size("max-frame", self.max_frame)?.unwrap_or(16 << 20);
        if !(1024..=(1 << 30)).contains(&max_frame) {
            return Err(bad("max-frame")("must be between 1KiB and 1GiB".into()));
        }
        let max_deliveries = self.max_deliveries.unwrap_or(16);
        if max_deliveries == 0 {
            return Err(bad("max-deliveries")("must be at least 1".into()));
        }
        let http_timeout =
            duration("http-timeout", self.http_timeout)?.unwrap_or(Duration::from_secs(10));
        if http_timeout.is_zero() {
            return Err(bad("http-timeout")("must be more than 0, e.g. 10s".into()));
        }
        let zbus_idle = duration("zbus-idle", self.zbus_idle)?.unwrap_or(Duration::from_secs(300));
        if zbus_idle.is_zero() {
            return Err(bad("zbus-idle")("must be more than 0, e.g. 300s".into()));
        }
        let (cert, key) = (self.tls_cert.as_deref(), self.tls_key.as_deref());
        let tls = server_tls(cert, key, self.tls_client_ca.as_deref())?;
        let tracker_tls = tracker_tls(self.tracker_ca.as_deref(), cert, key)?;
        let access = Access::new(
            self.users.unwrap_or_default(),
            self.anonymous_from,
            self.allow_anonymous.unwrap_or(false),
        )
        .map_err(bad("users"))?;
        let mut reporting = Reporting::resolve(
            self.tracker,
            self.advertise,
            duration("report-interval", self.report_interval)?,
        )?;
        let node_credential =
            node_credential(self.tracker_user, self.tracker_password, self.tracker_token)?;
        if let Some(reporting) = &mut reporting {
            reporting.credentials = node_credential;
        }
        Ok(Config {
            listen,
            tls,
            tracker_tls,
            store: self.store.unwrap_or_else(|| PathBuf::from("./store")),
            fsync: self
                .fsync
                .map(|f| f.parse().map_err(bad("fsync")))
                .transpose()?
                .unwrap_or(FsyncPolicy::Always),
            max_frame: max_frame as usize,
            segment_size: size("segment-size", self.segment_size)?.unwrap_or(64 << 20),
            retention_size: size("retention-size", self.retention_size)?,
            retention_age: duration("retention-age", self.retention_age)?,
            ack_timeout: duration("ack-timeout", self.ack_timeout)?.unwrap_or(DEFAULT_ACK_TIMEOUT),
            max_deliveries,
            max_in_flight: self.max_in_flight.unwrap_or(65_536).max(1),
            http_timeout,
            zbus_idle,
            reporting,
            access: Arc::new(access),
        })
    }
}

/// The credential a node logs in to trackers with: a user and password, or a token.
pub fn node_credential(
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
) -> Result<Option<Credentials>, ConfigError> {
    let bad = |key: &str, message: &str| ConfigError {
        key: key.into(),
        message: message.into(),
    };
    match (user, password, token) {
        (None, None, None) => Ok(None),
        (Some(user), Some(password), None) => Ok(Some(Credentials::password(user, password))),
        (None, None, Some(token)) => Ok(Some(Credentials::token(token))),
        (_, _, Some(_)) => Err(bad(
            "tracker-token",
            "give a token or a user and password, not both",
        )),
        (Some(_), None, None) => Err(bad("tracker-password", "needed with tracker-user")),
        (None, Some(_), None) => Err(bad("tracker-user", "needed with tracker-password")),
    }
}

/// Resolved broker configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// TLS on the port (TLS only when set).
    pub tls: Option<ServerTls>,
    /// TLS towards the trackers, when set.
    pub tracker_tls: Option<ClientTls>,
    /// Store directory.
    pub store: PathBuf,
    /// Fsync policy.
    pub fsync: FsyncPolicy,
    /// Largest frame accepted.
    pub max_frame: usize,
    /// Segment file size.
    pub segment_size: u64,
    /// Per-MQ retention by size.
    pub retention_size: Option<u64>,
    /// Per-MQ retention by age.
    pub retention_age: Option<Duration>,
    /// Default ack timeout.
    pub ack_timeout: Duration,
    /// Default delivery limit.
    pub max_deliveries: u32,
    /// Unacknowledged deliveries per connection and group.
    pub max_in_flight: u32,
    /// HTTP request, idle and reply-write timeout.
    pub http_timeout: Duration,
    /// zbus connection idle limit.
    pub zbus_idle: Duration,
    /// Reporting to trackers, when any are configured. Done by [`run`](crate::run), which
    /// knows the listening address; an embedded broker does not report.
    pub reporting: Option<Reporting>,
    /// Users, permissions and who is served without credentials (README, "Security").
    pub access: Arc<Access>,
}

/// Where and how often to report; part of [`Config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reporting {
    /// Tracker addresses.
    pub trackers: Vec<String>,
    /// `--advertise`, if given.
    pub advertise: Option<String>,
    /// Time between two reports without a change.
    pub interval: Duration,
    /// The node credential for the trackers (`tracker-user` and `tracker-password`, or
    /// `tracker-token`).
    pub credentials: Option<Credentials>,
}

impl Reporting {
    /// Checks the `tracker`, `advertise` and `report-interval` settings; `None` without
    /// trackers.
    ///
    /// ```
    /// use std::time::Duration;
    /// use qbus_broker::Reporting;
    /// let reporting = Reporting::resolve(Some("10.0.0.1:16666,10.0.0.2:16667".into()), None, None)
    ///     .unwrap()
    ///     .unwrap();
    /// assert_eq!(reporting.trackers.len(), 2);
    /// assert_eq!(reporting.interval, Duration::from_secs(2));
    /// assert!(Reporting::resolve(None, None, None).unwrap().is_none());
    /// ```
    pub fn resolve(
        tracker: Option<String>,
        advertise: Option<String>,
        interval: Option<Duration>,
    ) -> Result<Option<Reporting>, ConfigError> {
        let bad = |key: &str, message: String| ConfigError {
            key: key.into(),
            message,
        };
        if let Some(addr) = &advertise {
            let port = addr
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p > 0) {
                return Err(bad(
                    "advertise",
                    format!("{addr:?} is not HOST:PORT with a port from 1 to 65535"),
                ));
            }
        }
        let interval = interval.unwrap_or(DEFAULT_REPORT_INTERVAL);
        if interval < Duration::from_millis(10) {
            return Err(bad("report-interval", "must be at least 10ms".into()));
        }
        let Some(tracker) = tracker else {
            return Ok(None);
        };
        let trackers = parse_trackers(&tracker).map_err(|e| bad("tracker", e.to_string()))?;
        Ok(Some(Reporting {
            trackers,
            advertise,
            interval,
            credentials: None,
        }))
    }
}

impl Config {
    /// Defaults with the store in `store` (for tests and embedding).
    pub fn with_store(store: impl Into<PathBuf>) -> Config {
        Settings {
            store: Some(store.into()),
            ..Settings::default()
        }
        .resolve()
        .expect("defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `qbus-broker.toml` as shipped, with every `# key = value` line uncommented.
    fn shipped_file_uncommented() -> String {
        let text = include_str!("../qbus-broker.toml");
        text.lines()
            .filter_map(|line| line.strip_prefix("# "))
            .filter(|line| {
                line.split_once(" = ")
                    .is_some_and(|(key, _)| !key.contains(' '))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_shipped_settings_file_names_every_key_and_its_defaults() {
        let text = shipped_file_uncommented();
        let file: Settings = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let keys: Vec<&str> = text.lines().filter_map(|l| l.split(" = ").next()).collect();
        for flag in [
            "bind",
            "port",
            "store",
            "fsync",
            "max-frame",
            "segment-size",
        ] {
            assert!(keys.contains(&flag), "{flag} missing from qbus-broker.toml");
        }
        assert_eq!(keys.len(), 24, "one line per setting: {keys:?}");
        // The TLS examples name files this machine does not have.
        let shipped = Settings {
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tracker_ca: None,
            ..file
        }
        .resolve()
        .unwrap();
        let defaults = Settings::default().resolve().unwrap();
        // Retention, trackers and the advertised address have no default; the file shows
        // an example of each. Every other value it shows is the default.
        assert_eq!(
            (
                shipped.listen,
                &shipped.store,
                shipped.fsync,
                shipped.max_frame
            ),
            (
                defaults.listen,
                &defaults.store,
                defaults.fsync,
                defaults.max_frame
            )
        );
        assert_eq!(
            (
                shipped.segment_size,
                shipped.ack_timeout,
                shipped.max_deliveries
            ),
            (
                defaults.segment_size,
                defaults.ack_timeout,
                defaults.max_deliveries
            )
        );
        assert_eq!(
            (
                shipped.max_in_flight,
                shipped.http_timeout,
                shipped.zbus_idle
            ),
            (
                defaults.max_in_flight,
                defaults.http_timeout,
                defaults.zbus_idle
            )
        );
        let reporting = shipped.reporting.expect("the example trackers");
        assert_eq!(reporting.interval, Duration::from_secs(2));
    }

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert!(parse_duration("7").is_err());
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1XB").is_err());
        assert_eq!(
            "interval:50".parse::<FsyncPolicy>().unwrap(),
            FsyncPolicy::Interval(Duration::from_millis(50))
        );
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
    }

    #[test]
    fn flags_override_file_and_errors_name_the_key() {
        let cli = Settings {
            port: Some(1),
            ..Settings::default()
        };
        let file: Settings = toml::from_str("port = 2\nfsync = \"never\"").unwrap();
        let config = cli.or(file).resolve().unwrap();
        assert_eq!(
            (config.listen.port(), config.fsync),
            (1, FsyncPolicy::Never)
        );
        let err = Settings {
            fsync: Some("sometimes".into()),
            ..Settings::default()
        }
        .resolve()
        .unwrap_err();
        assert_eq!(err.key, "fsync");
        assert!(toml::from_str::<Settings>("prot = 1").is_err());
    }

    #[test]
    fn settings_are_checked_with_their_key() {
        let err = Reporting::resolve(Some("nowhere".into()), None, None).unwrap_err();
        assert_eq!(err.key, "tracker");
        let err = Reporting::resolve(Some("a:1".into()), Some("host".into()), None).unwrap_err();
        assert_eq!(err.key, "advertise");
        let err = Reporting::resolve(Some("a:1".into()), None, Some(Duration::ZERO)).unwrap_err();
        assert_eq!(err.key, "report-interval");
    }
}
