//! The `#[service]` macro refuses what RPC cannot carry, with errors that point at the
//! user's code (expected output in `tests/ui/*.stderr`; regenerate with
//! `TRYBUILD=overwrite cargo test -p qbus-rpc-macros --test compile_fail` and review the diff).

#[test]
fn unsupported_signatures_are_compile_errors() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
