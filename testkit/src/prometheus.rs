//! A strict parser of the Prometheus text exposition format, for tests of `/metrics`.

use std::collections::{BTreeMap, BTreeSet};

/// Every metric type the format knows.
pub const ALL_KINDS: &[&str] = &["counter", "gauge", "histogram", "summary", "untyped"];

/// Parses the Prometheus text format strictly: every line is a `# HELP`, a `# TYPE` (of one
/// of `kinds`) or a sample of a family declared before it; names and labels are well
/// formed, counters end in `_total` and are not negative, values are finite numbers, no
/// series repeats; histograms are cumulative and end in `+Inf` equal to `_count`. Returns
/// each series (`name{labels}`) with its value.
pub fn parse(text: &str, kinds: &[&str]) -> BTreeMap<String, f64> {
    fn valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    assert!(
        text.ends_with('\n'),
        "the exposition must end with a newline"
    );
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    let mut series = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has a text");
            assert!(valid_name(name) && !help.is_empty(), "{line}");
            assert!(helped.insert(name.to_owned()), "second HELP: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
            assert!(valid_name(name), "{line}");
            assert!(kinds.contains(&kind), "{line}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter without _total: {line}");
            }
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{line}"
            );
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let (key, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(value.is_finite(), "{line}");
        let name = key.split('{').next().unwrap_or_default();
        assert!(valid_name(name), "{line}");
        let labels = &key[name.len()..];
        if !labels.is_empty() {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix("\"}"))
                .unwrap_or_else(|| panic!("bad labels in {line:?}"));
            for pair in inner.split("\",") {
                let (label, quoted) = pair.split_once("=\"").expect("label=\"value\"");
                assert!(valid_name(label), "{line}");
                assert!(!quoted.replace("\\\"", "").contains('"'), "{line}");
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| types.get(*base).is_some_and(|k| k == "histogram"))
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        assert!(helped.contains(family), "sample without HELP: {line}");
        if types[family] == "counter" {
            assert!(value >= 0.0, "negative counter: {line}");
        }
        assert!(
            series.insert(key.to_owned(), value).is_none(),
            "repeated {key}"
        );
    }
    for (name, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let prefix = format!("{name}_bucket{{le=\"");
        let mut buckets: Vec<(f64, f64)> = series
            .iter()
            .filter_map(|(key, value)| {
                let le = key.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, *value))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name} not cumulative"
        );
        let inf = buckets.last().expect("histogram buckets");
        assert!(inf.0.is_infinite(), "{name} lacks +Inf");
        assert_eq!(Some(&inf.1), series.get(&format!("{name}_count")));
        assert!(series.contains_key(&format!("{name}_sum")));
    }
    series
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_histograms() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\na_total{q=\"x\\\"y\"} 2\n\
                    # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\n\
                    h_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n";
        let series = parse(text, ALL_KINDS);
        assert_eq!(series["a_total{q=\"x\\\"y\"}"], 2.0);
        assert_eq!(series["h_count"], 2.0);
    }

    #[test]
    #[should_panic(expected = "sample before its TYPE")]
    fn samples_need_their_family() {
        parse("x 1\n", ALL_KINDS);
    }

    #[test]
    #[should_panic(expected = "# TYPE h histogram")]
    fn kinds_can_be_limited() {
        parse("# HELP h H.\n# TYPE h histogram\n", &["counter", "gauge"]);
    }
}
