//! A snapshot of the tracker for `GET /api/stats` (JSON). `GET /metrics` and the monitor
//! page at `GET /` are drawn from it as well, so the three always agree.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use qbus_wire::protocol::PROTOCOL_VERSION;
use qbus_wire::topology::NodeState;
use serde::Serialize;

use crate::table::Table;

/// The whole snapshot.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Identity and tracker-wide numbers.
    pub tracker: TrackerStats,
    /// Every node (brokers and DirectRPC servers), sorted by id.
    pub brokers: Vec<NodeStats>,
    /// Every DirectRPC service offered, sorted by name.
    pub services: Vec<ServiceStats>,
}

/// Identity and tracker-wide numbers.
#[derive(Debug, Serialize)]
pub struct TrackerStats {
    /// The address the request reached (the listen address may be 0.0.0.0).
    pub address: String,
    /// Tracker software version.
    pub version: &'static str,
    /// Binary protocol version.
    pub protocol: u32,
    /// Milliseconds since the tracker started.
    pub uptime_ms: u64,
    /// False during the warm-up, while the view may still miss live brokers.
    pub ready: bool,
    /// The topology change counter: changes published since the start.
    pub seq: u64,
    /// Reports a node may miss before it is dropped.
    pub lease_reports: u32,
    /// Connections subscribed to topology changes now.
    pub subscribers: usize,
    /// `Report` frames received since the start.
    pub reports_received: u64,
    /// `TopologyUpdate` frames pushed to subscribers since the start.
    pub updates_pushed: u64,
    /// HTTP requests served since the start.
    pub http_requests: u64,
}

/// One node: what it last reported, and how fresh that is.
#[derive(Debug, Serialize)]
pub struct NodeStats {
    /// Its report: `id`, `addr`, `kind`, `epoch`, `seq`, `report_interval_ms`, `mqs`,
    /// `services`.
    #[serde(flatten)]
    pub state: NodeState,
    /// Milliseconds since its last report.
    pub report_age_ms: u64,
    /// Milliseconds before it is dropped unless it reports again.
    pub lease_left_ms: u64,
}

/// One DirectRPC service.
#[derive(Debug, Serialize)]
pub struct ServiceStats {
    /// Service (module) name.
    pub name: String,
    /// Addresses of the nodes offering it, sorted by node id.
    pub providers: Vec<String>,
}

impl Stats {
    /// Takes a snapshot of `table` at `now`; `address` is where the caller reached the
    /// tracker.
    pub fn collect(table: &Table, address: String, now: Instant) -> Stats {
        let status = table.status(now);
        let metrics = table.metrics();
        let mut services: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for node in &status.nodes {
            for service in &node.state.services {
                services
                    .entry(service)
                    .or_default()
                    .push(node.state.addr.clone());
            }
        }
        let services = services
            .into_iter()
            .map(|(name, providers)| ServiceStats {
                name: name.to_owned(),
                providers,
            })
            .collect();
        Stats {
            tracker: TrackerStats {
                address,
                version: env!("CARGO_PKG_VERSION"),
                protocol: PROTOCOL_VERSION,
                uptime_ms: millis(metrics.uptime()),
                ready: status.ready,
                seq: status.seq,
                lease_reports: status.lease_reports,
                subscribers: status.subscribers,
                reports_received: metrics.reports_received(),
                updates_pushed: metrics.updates_pushed(),
                http_requests: metrics.http_requests(),
            },
            services,
            brokers: status
                .nodes
                .into_iter()
                .map(|node| NodeStats {
                    report_age_ms: millis(node.report_age),
                    lease_left_ms: millis(node.lease_left),
                    state: node.state,
                })
                .collect(),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qbus_wire::topology::NodeKind;

    #[test]
    fn services_are_gathered_from_every_node() {
        let table = Table::new(3, true);
        let now = Instant::now();
        let node = |id: &str, kind, services: &[&str]| NodeState {
            id: id.into(),
            addr: format!("{id}:1"),
            kind,
            seq: 1,
            services: services.iter().map(|s| s.to_string()).collect(),
            ..NodeState::default()
        };
        for state in [
            node("b", NodeKind::RpcServer, &["calc", "echo"]),
            node("a", NodeKind::RpcServer, &["calc"]),
            node("c", NodeKind::Broker, &[]),
        ] {
            table.report(1, state, now, "node").unwrap();
        }
        let stats = Stats::collect(&table, "here".into(), now);
        let services: Vec<(&str, Vec<&str>)> = stats
            .services
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.providers.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            services,
            [("calc", vec!["a:1", "b:1"]), ("echo", vec!["b:1"])]
        );
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["brokers"][0]["addr"], "a:1");
        assert_eq!(json["brokers"][0]["kind"], "rpc");
        assert_eq!(json["brokers"][0]["report_age_ms"], 0);
        assert_eq!(
            json["brokers"][0]["lease_left_ms"], 6000,
            "3 x the default 2 s"
        );
        assert_eq!(json["tracker"]["seq"], 3);
    }
}
