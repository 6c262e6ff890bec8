//! The monitor page at `GET /`: one self-contained HTML file (styles and script inline, no
//! external resource, so it works on a machine without internet access) compiled into the
//! binary. It draws itself from `GET /api/stats` and manages MQs through the HTTP API.

use bytes::Bytes;
use hyper::StatusCode;

use super::reply::{bytes, Reply};

/// The page source.
const PAGE: &str = include_str!("../monitor.html");

/// The page.
pub fn page() -> Reply {
    bytes(
        StatusCode::OK,
        "text/html; charset=utf-8",
        Bytes::from_static(PAGE.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::PAGE;

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for external in ["http://", "https://", "//cdn", "src=\"//", "@import"] {
            assert!(!PAGE.contains(external), "monitor.html mentions {external}");
        }
        assert!(PAGE.contains("/api/stats"));
    }
}
