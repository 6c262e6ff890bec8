//! Output helpers: aligned text tables, human-readable sizes and a minimal JSON writer.

use std::fmt::Write;

/// Renders rows as left-aligned columns separated by two spaces; the first row is the header.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|row| row.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `1536` → `1.5 KiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A JSON string literal for `s`.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON object built field by field, in insertion order.
#[derive(Debug, Default)]
pub struct JsonObject {
    fields: Vec<(String, String)>,
}

impl JsonObject {
    pub fn new() -> JsonObject {
        JsonObject::default()
    }

    /// Adds a field whose value is already JSON.
    pub fn raw(mut self, key: &str, json: String) -> JsonObject {
        self.fields.push((key.to_owned(), json));
        self
    }

    pub fn str(self, key: &str, value: &str) -> JsonObject {
        self.raw(key, json_string(value))
    }

    pub fn num(self, key: &str, value: impl Into<u64>) -> JsonObject {
        self.raw(key, value.into().to_string())
    }

    pub fn opt_num(self, key: &str, value: Option<impl Into<u64>>) -> JsonObject {
        let json = value.map_or_else(|| "null".to_owned(), |v| v.into().to_string());
        self.raw(key, json)
    }

    pub fn opt_str(self, key: &str, value: Option<&str>) -> JsonObject {
        let json = value.map_or_else(|| "null".to_owned(), json_string);
        self.raw(key, json)
    }

    pub fn finish(self) -> String {
        let fields: Vec<String> = self
            .fields
            .into_iter()
            .map(|(key, value)| format!("{}:{value}", json_string(&key)))
            .collect();
        format!("{{{}}}", fields.join(","))
    }
}

/// A JSON array of already-encoded values.
pub fn json_array(items: impl IntoIterator<Item = String>) -> String {
    format!("[{}]", items.into_iter().collect::<Vec<_>>().join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let rows = vec![
            vec!["NAME".into(), "DEPTH".into()],
            vec!["orders".into(), "12".into()],
        ];
        assert_eq!(table(&rows), "NAME    DEPTH\norders  12\n");
    }

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
    }

    #[test]
    fn json() {
        assert_eq!(json_string("a\"b\\\n\u{1}"), r#""a\"b\\\n\u0001""#);
        let obj = JsonObject::new()
            .str("name", "x")
            .num("n", 3u32)
            .opt_str("dl", None)
            .finish();
        assert_eq!(obj, r#"{"name":"x","n":3,"dl":null}"#);
        assert_eq!(json_array(vec!["1".into(), "2".into()]), "[1,2]");
    }
}
