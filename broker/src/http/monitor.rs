//! The monitor page at `GET /`: one self-contained HTML file (styles and script inline, no
//! external resource, so it works on a machine without internet access) compiled into the
//! binary. It draws itself from `GET /api/stats` and manages MQs through the HTTP API.

use std::sync::LazyLock;

use bytes::Bytes;
use hyper::StatusCode;
use qbus_server_kit::page;

use super::reply::{bytes, Reply};

/// The page, with the look the monitor pages share spliced in once.
static PAGE: LazyLock<Bytes> =
    LazyLock::new(|| Bytes::from(page::assemble(include_str!("monitor.html"))));

/// The page.
pub fn page() -> Reply {
    bytes(StatusCode::OK, "text/html; charset=utf-8", PAGE.clone())
}

#[cfg(test)]
mod tests {
    use super::PAGE;

    #[test]
    fn the_page_is_whole() {
        let page = std::str::from_utf8(&PAGE).unwrap();
        assert_eq!(qbus_server_kit::page::flaws(page), Vec::<&str>::new());
        assert!(page.contains("/api/stats"));
    }
}
