//! `GET /metrics`: the stats snapshot in the Prometheus text exposition format (version
//! 0.0.4): for each family a `# HELP` and a `# TYPE` line, then its samples.

use std::collections::BTreeMap;

use qbus_server_kit::prometheus::Exposition;
use qbus_wire::topology::NodeKind;

use super::stats::{NodeStats, Stats};

pub use qbus_server_kit::prometheus::CONTENT_TYPE;

/// Renders `stats`.
pub fn render(stats: &Stats) -> String {
    let mut out = Exposition::default();
    let tracker = &stats.tracker;

    out.family(
        "qbus_tracker_build_info",
        "gauge",
        "Tracker version; always 1.",
    );
    out.sample(
        "qbus_tracker_build_info",
        &[
            ("version", tracker.version),
            ("protocol", &tracker.protocol.to_string()),
        ],
        1,
    );
    out.family(
        "qbus_tracker_uptime_seconds",
        "gauge",
        "Seconds since the tracker started.",
    );
    out.sample(
        "qbus_tracker_uptime_seconds",
        &[],
        tracker.uptime_ms as f64 / 1000.0,
    );
    out.family(
        "qbus_tracker_ready",
        "gauge",
        "1 once the warm-up is over and the view counts as complete, else 0.",
    );
    out.sample("qbus_tracker_ready", &[], u8::from(tracker.ready));

    out.family(
        "qbus_tracker_nodes",
        "gauge",
        "Nodes known now, by kind (broker, rpc).",
    );
    // Both usual kinds always appear, so a dashboard sees 0 rather than no series.
    let mut kinds: BTreeMap<String, usize> = [NodeKind::Broker, NodeKind::RpcServer]
        .into_iter()
        .map(|kind| (kind.into(), 0))
        .collect();
    for node in &stats.brokers {
        *kinds.entry(kind_of(node)).or_default() += 1;
    }
    for (kind, count) in &kinds {
        out.sample("qbus_tracker_nodes", &[("kind", kind)], count);
    }
    out.family(
        "qbus_tracker_report_age_seconds",
        "gauge",
        "Seconds since the node's last report.",
    );
    for node in &stats.brokers {
        let kind = kind_of(node);
        out.sample(
            "qbus_tracker_report_age_seconds",
            &[("node", &node.state.id), ("kind", &kind)],
            node.report_age_ms as f64 / 1000.0,
        );
    }
    out.family(
        "qbus_tracker_subscribers",
        "gauge",
        "Connections subscribed to topology changes now.",
    );
    out.sample("qbus_tracker_subscribers", &[], tracker.subscribers);

    let counters: [(&str, &str, u64); 4] = [
        (
            "qbus_tracker_reports_total",
            "Report frames received from brokers and DirectRPC servers.",
            tracker.reports_received,
        ),
        (
            "qbus_tracker_topology_changes_total",
            "Topology changes published (nodes joined, changed or dropped).",
            tracker.seq,
        ),
        (
            "qbus_tracker_updates_pushed_total",
            "TopologyUpdate frames pushed to subscribers.",
            tracker.updates_pushed,
        ),
        (
            "qbus_tracker_http_requests_total",
            "HTTP requests served.",
            tracker.http_requests,
        ),
    ];
    for (name, help, value) in counters {
        out.family(name, "counter", help);
        out.sample(name, &[], value);
    }
    out.finish()
}

/// The node's kind as it is on the wire (`broker`, `rpc`, or as sent).
fn kind_of(node: &NodeStats) -> String {
    node.state.kind.clone().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Table;
    use qbus_wire::topology::NodeState;
    use std::time::Instant;

    #[test]
    fn every_kind_is_counted_and_label_values_escaped() {
        let table = Table::new(3, true);
        let node = |id: &str, kind: &str| NodeState {
            id: id.into(),
            addr: id.into(),
            kind: NodeKind::from(kind.to_owned()),
            seq: 1,
            ..NodeState::default()
        };
        let now = Instant::now();
        table
            .report(1, node("a\"b", "broker"), now, "node")
            .unwrap();
        table.report(1, node("gw", "gateway"), now, "node").unwrap();
        let text = render(&Stats::collect(&table, "here".into(), now));
        for line in [
            "qbus_tracker_nodes{kind=\"broker\"} 1\n",
            "qbus_tracker_nodes{kind=\"rpc\"} 0\n",
            "qbus_tracker_nodes{kind=\"gateway\"} 1\n",
            "qbus_tracker_report_age_seconds{node=\"a\\\"b\",kind=\"broker\"} 0\n",
            "qbus_tracker_topology_changes_total 2\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
    }
}
