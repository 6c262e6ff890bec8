//! `GET /metrics`: the stats snapshot in the Prometheus text exposition format (version
//! 0.0.4): for each family a `# HELP` and a `# TYPE` line, then its samples.

use qbus_server_kit::prometheus::Exposition;

use super::stats::Stats;
use crate::metrics::{HistogramReading, Protocol};

pub use qbus_server_kit::prometheus::CONTENT_TYPE;

/// Renders `stats`.
pub fn render(stats: &Stats) -> String {
    let mut out = Exposition::default();
    let broker = &stats.broker;

    out.family("qbus_build_info", "gauge", "Broker version; always 1.");
    out.sample(
        "qbus_build_info",
        &[
            ("version", broker.version),
            ("protocol", &broker.protocol.to_string()),
        ],
        1,
    );
    out.family(
        "qbus_uptime_seconds",
        "gauge",
        "Seconds since the store was opened.",
    );
    out.sample("qbus_uptime_seconds", &[], broker.uptime_ms as f64 / 1000.0);
    out.family(
        "qbus_store_bytes",
        "gauge",
        "Bytes of every MQ's segment files.",
    );
    out.sample("qbus_store_bytes", &[], broker.store_bytes);

    let tx = &broker.transactions;
    for (name, help, value) in [
        (
            "qbus_tx_begun_total",
            "Transactions begun since the start.",
            tx.begun,
        ),
        (
            "qbus_tx_committed_total",
            "Transactions committed (by the producer or by policy).",
            tx.committed,
        ),
        (
            "qbus_tx_rolled_back_total",
            "Transactions rolled back (by the producer or by policy).",
            tx.rolled_back,
        ),
        (
            "qbus_tx_checked_total",
            "Times an undecided transaction's timeout or check interval passed.",
            tx.checked,
        ),
        (
            "qbus_tx_checks_sent_total",
            "Checks sent to a live producer of the transaction's group.",
            tx.checks_sent,
        ),
        (
            "qbus_tx_timed_out_total",
            "Transactions resolved by the broker's policy after their maximum checks.",
            tx.timed_out,
        ),
    ] {
        out.family(name, "counter", help);
        out.sample(name, &[], value);
    }
    out.family(
        "qbus_tx_pending",
        "gauge",
        "Open transactions (and commits not yet applied).",
    );
    out.sample(
        "qbus_tx_pending",
        &[],
        broker.pending_transactions.len() as u64,
    );

    out.family("qbus_connections", "gauge", "Client connections open now.");
    for (protocol, open) in [
        (Protocol::Binary, broker.connections.binary),
        (Protocol::Http, broker.connections.http),
        (Protocol::Zbus, broker.connections.zbus),
    ] {
        out.sample("qbus_connections", &[("protocol", protocol.name())], open);
    }
    out.family(
        "qbus_connections_accepted_total",
        "counter",
        "Client connections accepted since the start.",
    );
    for (protocol, accepted) in [
        (Protocol::Binary, broker.connections_accepted.binary),
        (Protocol::Http, broker.connections_accepted.http),
        (Protocol::Zbus, broker.connections_accepted.zbus),
    ] {
        let labels = [("protocol", protocol.name())];
        out.sample("qbus_connections_accepted_total", &labels, accepted);
    }
    out.family(
        "qbus_http_requests_total",
        "counter",
        "HTTP requests served.",
    );
    out.sample("qbus_http_requests_total", &[], broker.http_requests);
    out.family(
        "qbus_denied_total",
        "counter",
        "Requests refused: status 401 (no or bad credentials) or 403 (not allowed).",
    );
    for (status, per) in [
        ("401", &broker.denied_unauthenticated),
        ("403", &broker.denied_forbidden),
    ] {
        for (protocol, count) in [
            (Protocol::Binary, per.binary),
            (Protocol::Http, per.http),
            (Protocol::Zbus, per.zbus),
        ] {
            let labels = [("protocol", protocol.name()), ("status", status)];
            out.sample("qbus_denied_total", &labels, count);
        }
    }

    type PerMq = fn(&super::stats::MqStats) -> u64;
    let per_mq: [(&str, &str, &str, PerMq); 14] = [
        (
            "qbus_messages_in_total",
            "counter",
            "Messages accepted for appending.",
            |m| m.traffic.messages_in,
        ),
        (
            "qbus_bytes_in_total",
            "counter",
            "Bytes of messages accepted, record headers included.",
            |m| m.traffic.bytes_in,
        ),
        (
            "qbus_messages_out_total",
            "counter",
            "Messages delivered to consumers, redeliveries included.",
            |m| m.traffic.messages_out,
        ),
        (
            "qbus_bytes_out_total",
            "counter",
            "Bytes of messages delivered.",
            |m| m.traffic.bytes_out,
        ),
        (
            "qbus_messages_acked_total",
            "counter",
            "Deliveries acknowledged.",
            |m| m.traffic.acked,
        ),
        (
            "qbus_messages_lost_total",
            "counter",
            "Offsets skipped because their records are damaged on disk.",
            |m| m.traffic.lost,
        ),
        (
            "qbus_messages_dropped_total",
            "counter",
            "Memory MQs: messages a group lost because the ring dropped them before it read them, once per group.",
            |m| m.traffic.dropped,
        ),
        (
            "qbus_messages_expired_total",
            "counter",
            "Messages a group met past their TTL and did not deliver (dropped or dead-lettered), once per group.",
            |m| m.traffic.expired,
        ),
        (
            "qbus_mq_delayed",
            "gauge",
            "Delayed messages stored and not yet due.",
            |m| m.info.delayed
        ),
        (
            "qbus_messages_duplicate_total",
            "counter",
            "Messages not stored because their dedupe id was stored within the MQ's window.",
            |m| m.traffic.duplicates,
        ),
        (
            "qbus_mq_dedupe_ids",
            "gauge",
            "Dedupe ids the MQ remembers now.",
            |m| m.dedupe_ids,
        ),
        (
            "qbus_mq_dedupe_evicted_total",
            "counter",
            "Dedupe ids forgotten before their window ended because the MQ held the most it may.",
            |m| m.dedupe_evicted,
        ),
        ("qbus_mq_depth", "gauge", "Messages retained.", |m| m.depth),
        (
            "qbus_mq_size_bytes",
            "gauge",
            "Bytes of the MQ's segment files.",
            |m| m.info.size_bytes,
        ),
    ];
    for (name, kind, help, value) in per_mq {
        out.family(name, kind, help);
        for mq in &stats.mqs {
            out.sample(name, &[("mq", &mq.info.name)], value(mq));
        }
    }

    type PerGroup = fn(&qbus_wire::protocol::GroupInfo) -> u64;
    let per_group: [(&str, &str, &str, PerGroup); 5] = [
        (
            "qbus_group_lag",
            "gauge",
            "Messages retained and not yet acknowledged by the group.",
            |g| g.lag,
        ),
        (
            "qbus_group_in_flight",
            "gauge",
            "Deliveries awaiting an ack.",
            |g| g.in_flight,
        ),
        (
            "qbus_group_consumers",
            "gauge",
            "Connections consuming for the group.",
            |g| g.consumers.into(),
        ),
        (
            "qbus_redeliveries_total",
            "counter",
            "Messages delivered again after a timeout, nack or lost consumer.",
            |g| g.redelivered,
        ),
        (
            "qbus_dead_letters_total",
            "counter",
            "Messages moved to the dead-letter MQ.",
            |g| g.dead_lettered,
        ),
    ];
    for (name, kind, help, value) in per_group {
        out.family(name, kind, help);
        for mq in &stats.mqs {
            for group in &mq.info.groups {
                let labels = [("mq", mq.info.name.as_str()), ("group", &group.name)];
                out.sample(name, &labels, value(group));
            }
        }
    }

    histogram(
        &mut out,
        "qbus_fsync_seconds",
        "Time the commit thread spent in fsync per batch.",
        &stats.fsync,
    );
    out.finish()
}

/// Writes a latency histogram as a `histogram` family.
fn histogram(out: &mut Exposition, name: &str, help: &str, reading: &HistogramReading) {
    out.histogram(
        name,
        help,
        &reading.buckets,
        reading.sum_seconds,
        reading.count,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::LatencyHistogram;
    use std::time::Duration;

    #[test]
    fn histogram_lines_follow_the_format() {
        let h = LatencyHistogram::new(&[0.001, 0.5]);
        h.observe(Duration::from_millis(2));
        let mut out = Exposition::default();
        histogram(&mut out, "x_seconds", "Help.", &h.read());
        assert_eq!(
            out.finish(),
            "# HELP x_seconds Help.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{le=\"0.001\"} 0\nx_seconds_bucket{le=\"0.5\"} 1\n\
             x_seconds_bucket{le=\"+Inf\"} 1\nx_seconds_sum 0.002\nx_seconds_count 1\n"
        );
    }
}
