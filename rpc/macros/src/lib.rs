//! The `#[service]` attribute of `qbus-rpc` (use it as `qbus_rpc::service`; its
//! documentation is there).
//!
//! - `parse.rs`: checks the trait and reads it into a model, with errors that point
//!   at the user's code.
//! - `expand.rs`: writes the trait, the client proxy and the server installer.

mod expand;
mod parse;

use proc_macro::TokenStream;

/// Turns a trait of `async fn`s into an RPC service: see `qbus_rpc::service`.
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = match parse::Args::parse(attr.into()) {
        Ok(args) => args,
        Err(e) => return e.to_compile_error().into(),
    };
    let item: syn::Item = match syn::parse(item) {
        Ok(item) => item,
        Err(e) => return e.to_compile_error().into(),
    };
    let syn::Item::Trait(item) = item else {
        let span = syn::spanned::Spanned::span(&item);
        return syn::Error::new(span, "#[service] goes on a trait of `async fn` methods")
            .to_compile_error()
            .into();
    };
    match parse::service(args, &item) {
        Ok(service) => expand::expand(&service, &item).into(),
        Err(e) => e.to_compile_error().into(),
    }
}
