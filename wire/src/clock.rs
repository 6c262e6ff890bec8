//! Wall-clock time as the wire carries it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: record timestamps, process epochs in node reports.
/// A clock set before 1970 reads 0 rather than failing, since these stamps order and
/// label things but never decide correctness.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_present() {
        // 2020-09-13: any real clock is past it, and it fits the millisecond range.
        assert!(now_ms() > 1_600_000_000_000);
    }
}
