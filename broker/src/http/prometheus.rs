//! `GET /metrics`: the stats snapshot in the Prometheus text exposition format (version
//! 0.0.4): for each family a `# HELP` and a `# TYPE` line, then its samples.

use std::fmt::Write;

use super::stats::Stats;
use crate::metrics::{HistogramReading, Protocol};

/// Content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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

    out.family("qbus_connections", "gauge", "Client connections open now.");
    for (protocol, open) in [
        (Protocol::Binary, broker.connections.binary),
        (Protocol::Http, broker.connections.http),
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

    type PerMq = fn(&super::stats::MqStats) -> u64;
    let per_mq: [(&str, &str, &str, PerMq); 7] = [
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

    type PerGroup = fn(&qbus_client::protocol::GroupInfo) -> u64;
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

    out.histogram(
        "qbus_fsync_seconds",
        "Time the commit thread spent in fsync per batch.",
        &stats.fsync,
    );
    out.text
}

/// The text being built. Writing to a `String` cannot fail, so `write!` results are dropped.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    fn histogram(&mut self, name: &str, help: &str, reading: &HistogramReading) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (bound, count) in &reading.buckets {
            let le = bound.map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            self.sample(&bucket, &[("le", &le)], count);
        }
        self.sample(&format!("{name}_sum"), &[], reading.sum_seconds);
        self.sample(&format!("{name}_count"), &[], reading.count);
    }
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', r#"\""#)
        .replace('\n', r"\n")
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
        out.histogram("x_seconds", "Help.", &h.read());
        assert_eq!(
            out.text,
            "# HELP x_seconds Help.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{le=\"0.001\"} 0\nx_seconds_bucket{le=\"0.5\"} 1\n\
             x_seconds_bucket{le=\"+Inf\"} 1\nx_seconds_sum 0.002\nx_seconds_count 1\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), r#"a\"b\\c\nd"#);
    }
}
