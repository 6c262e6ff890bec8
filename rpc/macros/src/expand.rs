//! Writing the code of a checked [`Service`]: the trait with `Send` futures, the client
//! proxy and the server-side installer.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{ItemTrait, TraitItem};

use crate::parse::{Method, Service};

pub fn expand(service: &Service, item: &ItemTrait) -> TokenStream {
    let vis = &item.vis;
    let name = &item.ident;
    let module = &service.module;
    let client = format_ident!("{}Client", name);
    let server = format_ident!("{}Server", name);

    let rewritten = rewrite_trait(item);
    let checks = service.methods.iter().flat_map(wire_checks);
    let client_methods = service.methods.iter().map(client_method);
    let installs = service.methods.iter().map(install);
    let client_doc = format!(
        "Client proxy of the [`{name}`] service (module `{}`): each method sends a call \
         through the invoker it was made with and resolves to `Result<T, RpcError>`.",
        module.value()
    );
    let server_doc = format!(
        "Installs an implementation of [`{name}`] in an `RpcProcessor`: \
         `processor.add({server}::new(implementation))`."
    );

    quote! {
        #rewritten

        #[doc = #client_doc]
        #[derive(Clone, Debug)]
        #vis struct #client {
            rpc: ::qbus_rpc::RpcClient,
        }

        impl #client {
            /// The module name calls are addressed to.
            pub const MODULE: &'static str = #module;

            /// A proxy calling through `invoker`, with default options (10 s deadline,
            /// MessagePack).
            pub fn new(invoker: impl ::qbus_rpc::Invoker) -> Self {
                Self { rpc: ::qbus_rpc::RpcClient::new(invoker, Self::MODULE) }
            }

            /// A proxy over a dynamic client (its module is replaced by this service's).
            pub fn from_rpc(rpc: ::qbus_rpc::RpcClient) -> Self {
                let invoker = ::std::sync::Arc::clone(rpc.invoker());
                let options = rpc.options();
                Self {
                    rpc: ::qbus_rpc::RpcClient::from_shared(invoker, Self::MODULE)
                        .with_options(options),
                }
            }

            /// The dynamic client underneath.
            pub fn rpc(&self) -> &::qbus_rpc::RpcClient {
                &self.rpc
            }

            /// A proxy whose calls have this deadline: `client.timeout(d).method(..)` for one
            /// call.
            pub fn timeout(&self, timeout: ::std::time::Duration) -> Self {
                Self { rpc: self.rpc.clone().timeout(timeout) }
            }

            /// A proxy sending its calls in `encoding`.
            pub fn encoding(&self, encoding: ::qbus_rpc::Encoding) -> Self {
                Self { rpc: self.rpc.clone().encoding(encoding) }
            }

            /// A proxy with `options`.
            pub fn with_options(&self, options: ::qbus_rpc::CallOptions) -> Self {
                Self { rpc: self.rpc.clone().with_options(options) }
            }

            #(#client_methods)*
        }

        #[doc = #server_doc]
        #vis struct #server<T>(::std::sync::Arc<T>);

        impl<T> ::core::fmt::Debug for #server<T> {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.write_str(::core::stringify!(#server))
            }
        }

        impl<T: #name> #server<T> {
            /// Wraps an implementation.
            pub fn new(service: T) -> Self {
                Self(::std::sync::Arc::new(service))
            }

            /// Wraps an implementation the application shares.
            pub fn from_arc(service: ::std::sync::Arc<T>) -> Self {
                Self(service)
            }
        }

        impl<T: #name> ::qbus_rpc::Service for #server<T> {
            fn name(&self) -> &str {
                #module
            }

            fn install(self, module: &mut ::qbus_rpc::Module) {
                let __qbus_service = self.0;
                #(#installs)*
            }
        }

        const _: () = {
            #[allow(dead_code)]
            fn check_wire_types() {
                #(#checks)*
            }
        };
    }
}

/// The trait as written, with each `async fn` turned into a method returning a `Send`
/// future and the supertraits a server needs to share it across threads.
fn rewrite_trait(item: &ItemTrait) -> TokenStream {
    let mut item = item.clone();
    item.supertraits
        .push(syn::parse_quote!(::core::marker::Send));
    item.supertraits
        .push(syn::parse_quote!(::core::marker::Sync));
    item.supertraits.push(syn::parse_quote!('static));
    if item.colon_token.is_none() {
        item.colon_token = Some(Default::default());
    }
    for trait_item in &mut item.items {
        if let TraitItem::Fn(method) = trait_item {
            let sig = &mut method.sig;
            sig.asyncness = None;
            let output = match &sig.output {
                syn::ReturnType::Default => quote!(()),
                syn::ReturnType::Type(_, ty) => quote!(#ty),
            };
            sig.output = syn::parse_quote! {
                -> impl ::core::future::Future<Output = #output> + ::core::marker::Send
            };
        }
    }
    quote!(#item)
}

/// Doc comments of a method, for the proxy.
fn docs(method: &Method) -> impl Iterator<Item = &syn::Attribute> {
    method.attrs.iter().filter(|a| a.path().is_ident("doc"))
}

fn params_tuple(method: &Method) -> TokenStream {
    let names = method.params.iter().map(|p| &p.name);
    if method.params.is_empty() {
        quote!([(); 0])
    } else {
        quote!((#(#names,)*))
    }
}

fn params_type(method: &Method) -> TokenStream {
    let types = method.params.iter().map(|p| &p.ty);
    if method.params.is_empty() {
        quote!([(); 0])
    } else {
        quote!((#(#types,)*))
    }
}

fn output(method: &Method) -> TokenStream {
    match &method.output {
        Some(ty) => quote!(#ty),
        None => quote!(()),
    }
}

fn client_method(method: &Method) -> TokenStream {
    let docs = docs(method);
    let name = &method.name;
    let wire_name = name.to_string();
    let args = method.params.iter().map(|p| {
        let (name, ty) = (&p.name, &p.ty);
        quote!(#name: #ty)
    });
    let tuple = params_tuple(method);
    let output = output(method);
    // Spanned at the method, so a type that cannot travel is reported there.
    let call = quote_spanned!(name.span()=> self.rpc.call(#wire_name, &#tuple));
    quote! {
        #(#docs)*
        pub fn #name(&self, #(#args),*) -> ::qbus_rpc::CallFuture<#output> {
            #call
        }
    }
}

fn install(method: &Method) -> TokenStream {
    let name = &method.name;
    let wire_name = name.to_string();
    let tuple = params_tuple(method);
    let pattern = if method.params.is_empty() {
        quote!(_)
    } else {
        tuple.clone()
    };
    let names = method.params.iter().map(|p| &p.name);
    let types = params_type(method);
    let register = quote_spanned! {name.span()=>
        module.method(#wire_name, move |#pattern: #types| {
            let __qbus_service = ::std::sync::Arc::clone(&__qbus_service);
            async move { __qbus_service.#name(#(#names),*).await }
        })
    };
    quote! {
        {
            let __qbus_service = ::std::sync::Arc::clone(&__qbus_service);
            #register;
        }
    }
}

/// Checks, at the user's own types, that every argument and result can travel.
fn wire_checks(method: &Method) -> Vec<TokenStream> {
    let types = method
        .params
        .iter()
        .map(|p| &p.ty)
        .chain(method.output.as_ref());
    types
        .map(|ty| quote_spanned!(ty.span()=> ::qbus_rpc::__private::assert_wire::<#ty>();))
        .collect()
}
