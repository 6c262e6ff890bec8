//! A snapshot of the broker for `GET /api/stats` (JSON), which `/metrics` and the monitor
//! page are drawn from as well, so the three always agree.

use qbus_wire::protocol::{MqInfo, PROTOCOL_VERSION};
use serde::Serialize;

use crate::core::Core;
use crate::metrics::rates::Rates;
use crate::metrics::{HistogramReading, MqTraffic, Protocol};
use crate::queue::mq::Mq;

/// The whole snapshot.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Identity and broker-wide numbers.
    pub broker: BrokerStats,
    /// fsync latency of the commit thread.
    pub fsync: HistogramReading,
    /// Every MQ, sorted by name.
    pub mqs: Vec<MqStats>,
}

/// Identity and broker-wide numbers.
#[derive(Debug, Serialize)]
pub struct BrokerStats {
    /// The address the request reached (the listen address may be 0.0.0.0).
    pub address: String,
    /// Broker software version.
    pub version: &'static str,
    /// Binary protocol version.
    pub protocol: u32,
    /// The user the request was served as (`anonymous` without credentials); absent
    /// where the request was not checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Milliseconds since the store was opened.
    pub uptime_ms: u64,
    /// Store directory.
    pub store: String,
    /// Bytes of every MQ's segments.
    pub store_bytes: u64,
    /// `always`, `interval:<ms>` or `never`.
    pub fsync_policy: String,
    /// Largest frame (and so message) accepted.
    pub max_frame: usize,
    /// Connections open now.
    pub connections: PerProtocol,
    /// Connections accepted since the start.
    pub connections_accepted: PerProtocol,
    /// HTTP requests served since the start.
    pub http_requests: u64,
    /// Requests refused for want of (good) credentials, status 401, since the start.
    pub denied_unauthenticated: PerProtocol,
    /// Requests refused by the permissions, status 403, since the start.
    pub denied_forbidden: PerProtocol,
    /// Rate samples taken since the start (one a second); every MQ's `rates` end at the
    /// same sample, so a poller can tell how many of them are new.
    pub rate_samples: u64,
    /// Transactions since the start (protocol 4).
    pub transactions: crate::txn::TxTotals,
    /// Open transactions (and commits not yet applied), oldest first.
    pub pending_transactions: Vec<qbus_wire::protocol::TxInfo>,
}

/// One number per client protocol.
#[derive(Debug, Serialize)]
pub struct PerProtocol {
    /// Binary protocol (TCP and in-process).
    pub binary: u64,
    /// HTTP.
    pub http: u64,
    /// The zbus protocol.
    pub zbus: u64,
}

/// One MQ: its description, depth and traffic.
#[derive(Debug, Serialize)]
pub struct MqStats {
    /// Offsets, size, options and groups.
    #[serde(flatten)]
    pub info: MqInfo,
    /// Records retained.
    pub depth: u64,
    /// Messages and bytes in and out since the start.
    pub traffic: MqTraffic,
    /// Records moved to the dead-letter MQ, all groups together.
    pub dead_lettered: u64,
    /// Redeliveries, all groups together.
    pub redelivered: u64,
    /// Whether the requesting user may administer this MQ (stats only; the monitor page
    /// hides the buttons it may not use).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<bool>,
    /// Dedupe ids remembered now.
    pub dedupe_ids: u64,
    /// Dedupe ids forgotten before their window ended because the MQ held the most it
    /// may (`queue::dedupe_table::MAX_IDS`).
    pub dedupe_evicted: u64,
    /// Messages in and out per second over the last seconds, newest last (stats only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rates: Option<Rates>,
}

impl MqStats {
    /// The stats of `mq` now.
    pub fn of(mq: &Mq) -> MqStats {
        let info = mq.info();
        MqStats {
            depth: info.depth(),
            traffic: mq.counters().read(),
            dead_lettered: info.groups.iter().map(|g| g.dead_lettered).sum(),
            redelivered: info.groups.iter().map(|g| g.redelivered).sum(),
            admin: None,
            dedupe_ids: mq.dedupe().held() as u64,
            dedupe_evicted: mq.dedupe().evicted(),
            rates: None,
            info,
        }
    }
}

/// Takes a snapshot with the last `seconds` of rates per MQ; `address` is where the caller
/// reached the broker.
pub fn collect(core: &Core, address: String, seconds: usize) -> Stats {
    let metrics = core.metrics();
    let (rate_samples, mut rates) = metrics.rates().recent(seconds);
    let mqs: Vec<MqStats> = core
        .registry()
        .list()
        .iter()
        .map(|mq| MqStats {
            rates: Some(rates.remove(mq.name()).unwrap_or_default()),
            ..MqStats::of(mq)
        })
        .collect();
    let per_protocol = |read: &dyn Fn(Protocol) -> u64| PerProtocol {
        binary: read(Protocol::Binary),
        http: read(Protocol::Http),
        zbus: read(Protocol::Zbus),
    };
    let config = core.config();
    Stats {
        broker: BrokerStats {
            address,
            version: env!("CARGO_PKG_VERSION"),
            protocol: PROTOCOL_VERSION,
            user: None,
            uptime_ms: u64::try_from(core.started().elapsed().as_millis()).unwrap_or(u64::MAX),
            store: config.store.display().to_string(),
            store_bytes: mqs.iter().map(|m| m.info.size_bytes).sum(),
            fsync_policy: config.fsync.to_string(),
            max_frame: config.max_frame,
            connections: per_protocol(&|p| metrics.open(p)),
            connections_accepted: per_protocol(&|p| metrics.accepted(p)),
            http_requests: metrics.http_requests(),
            denied_unauthenticated: per_protocol(&|p| metrics.denials(p).0),
            denied_forbidden: per_protocol(&|p| metrics.denials(p).1),
            rate_samples,
            transactions: core.txns().totals(),
            pending_transactions: core.txns().list(),
        },
        fsync: core.committer().fsync_latency().read(),
        mqs,
    }
}
