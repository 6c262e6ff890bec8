//! Writing the Prometheus text exposition format (version 0.0.4): for each family a
//! `# HELP` and a `# TYPE` line, then its samples.
//!
//! ```
//! use qbus_server_kit::prometheus::Exposition;
//! let mut out = Exposition::default();
//! out.family("jobs_total", "counter", "Jobs done.");
//! out.sample("jobs_total", &[("queue", "a\"b")], 3);
//! assert_eq!(
//!     out.finish(),
//!     "# HELP jobs_total Jobs done.\n# TYPE jobs_total counter\njobs_total{queue=\"a\\\"b\"} 3\n"
//! );
//! ```

use std::fmt::Write;

/// Content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The text being built. Writing to a `String` cannot fail, so `write!` results are dropped.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// Starts the family `name` of type `kind` (`counter`, `gauge`, `histogram`).
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// One sample; label values are escaped.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
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

    /// A whole histogram family: `buckets` are upper bounds (`None` for `+Inf`, last) with
    /// cumulative counts, then the sum and the count of the observations.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        buckets: &[(Option<f64>, u64)],
        sum: f64,
        count: u64,
    ) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (bound, count) in buckets {
            let le = bound.map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            self.sample(&bucket, &[("le", &le)], count);
        }
        self.sample(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], count);
    }

    /// The exposition text.
    pub fn finish(self) -> String {
        self.text
    }
}

/// Escapes a label value: backslash, double quote and newline.
pub fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', r#"\""#)
        .replace('\n', r"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_lines_follow_the_format() {
        let mut out = Exposition::default();
        out.histogram(
            "x_seconds",
            "Help.",
            &[(Some(0.001), 0), (Some(0.5), 1), (None, 1)],
            0.002,
            1,
        );
        assert_eq!(
            out.finish(),
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
