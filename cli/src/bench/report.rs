//! What every load benchmark prints: a readable summary and one machine-readable line,
//! `RESULT system=qbus scenario=... size=.. count=.. window=.. msgs_per_s=.. mb_per_s=..
//! p50_us=.. p99_us=.. p999_us=..`, followed by extra `key=value` fields.

use std::time::Duration;

use super::histogram::Summary;

pub(super) struct Rate {
    pub(super) msgs_per_s: f64,
    pub(super) mb_per_s: f64,
}

impl Rate {
    pub(super) fn new(count: u64, size: usize, elapsed: Duration) -> Rate {
        let secs = elapsed.as_secs_f64().max(1e-9);
        Rate {
            msgs_per_s: count as f64 / secs,
            mb_per_s: (count as f64 * size as f64) / 1e6 / secs,
        }
    }
}

pub(super) fn print_latency(what: &str, lat: &Summary) {
    println!(
        "  {what}, us: min {} mean {} p50 {} p99 {} p99.9 {} max {}",
        lat.min, lat.mean, lat.p50, lat.p99, lat.p999, lat.max
    );
}

pub(super) fn result_line(
    scenario: &str,
    size: usize,
    count: u64,
    window: u32,
    rate: &Rate,
    lat: &Summary,
) -> String {
    format!(
        "RESULT system=qbus scenario={scenario} size={size} count={count} window={window} \
         msgs_per_s={:.0} mb_per_s={:.2} p50_us={} p99_us={} p999_us={}",
        rate.msgs_per_s, rate.mb_per_s, lat.p50, lat.p99, lat.p999
    )
}
