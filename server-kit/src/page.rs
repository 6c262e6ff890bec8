//! The look every qbus monitor page shares (`qbus-broker`'s and `qbus-tracker`'s `GET /`):
//! theme, header, cards and tables in `page/base.css`, small script helpers in
//! `page/base.js`, written once and spliced into each page where it says so. Pages stay
//! self-contained single files once assembled: nothing is loaded from elsewhere, so they work
//! on a machine without internet access.
//!
//! ```
//! let page = qbus_server_kit::page::assemble(
//!     "<style>\n/* qbus:base.css */\n</style><script>\n// qbus:base.js\nrefreshForever(async () => {});\n</script>",
//! );
//! assert!(page.contains("--accent") && page.contains("function refreshForever"));
//! ```

/// Where a page's `<style>` takes the shared styles (on a line of its own, first, so the
/// page's own rules can refine them).
pub const CSS_MARKER: &str = "/* qbus:base.css */";
/// Where a page's `<script>` takes the shared helpers (before the code that uses them).
pub const JS_MARKER: &str = "// qbus:base.js";

const BASE_CSS: &str = include_str!("page/base.css");
const BASE_JS: &str = include_str!("page/base.js");

/// `page` with the shared styles and helpers in place of its markers.
pub fn assemble(page: &str) -> String {
    page.replacen(CSS_MARKER, BASE_CSS, 1)
        .replacen(JS_MARKER, BASE_JS, 1)
}

/// What keeps an assembled page from standing alone: references to other sites (it must
/// work without internet access) and markers left unfilled. Empty when the page is whole.
pub fn flaws(page: &str) -> Vec<&'static str> {
    let foreign = [
        "http://", "https://", "//cdn", "src=\"//", "@import", "url(",
    ];
    foreign
        .into_iter()
        .chain([CSS_MARKER, JS_MARKER])
        .filter(|flaw| page.contains(flaw))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_parts_stand_alone() {
        let page = assemble(&format!("{CSS_MARKER}\n{JS_MARKER}"));
        assert_eq!(flaws(&page), Vec::<&str>::new());
        assert_eq!(flaws("a page without its base.css"), Vec::<&str>::new());
        assert_eq!(flaws(CSS_MARKER), vec![CSS_MARKER]);
    }
}
