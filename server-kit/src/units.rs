//! Durations and sizes as settings write them: `500ms`, `30s`, `7d`; `4096`, `64KiB`, `10GiB`.

use std::time::Duration;

/// Parses `500ms`, `30s`, `10m`, `2h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 30s, 10m, 2h or 7d"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?} has no unit: use ms, s, m, h or d")),
    };
    Ok(Duration::from_millis(n.saturating_mul(ms)))
}

/// Parses `4096`, `64KiB`, `64MiB`, `10GiB` (also KB/MB/GB as powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4096, 64KiB, 64MiB or 10GiB"))?;
    let scale: u64 = match unit {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        _ => return Err(format!("{s:?} has an unknown unit: use KiB, MiB or GiB")),
    };
    Ok(n.saturating_mul(scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_need_known_units() {
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert!(parse_size("MiB").is_err());
    }
}
