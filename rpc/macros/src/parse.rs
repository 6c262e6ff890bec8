//! Reading a `#[service]` trait into a [`Service`] model, refusing every signature the RPC
//! layer cannot carry with an error that points at the offending tokens.

use quote::ToTokens;
use syn::{
    Attribute, FnArg, Ident, ItemTrait, LitStr, Pat, ReturnType, TraitItem, TraitItemFn, Type,
};

/// Client proxy methods the generated code defines itself; a service method may not take
/// their names.
const RESERVED: &[&str] = &[
    "new",
    "from_rpc",
    "rpc",
    "timeout",
    "encoding",
    "with_options",
];

/// The arguments of the attribute: `#[service]` or `#[service(name = "...")]`.
#[derive(Default)]
pub struct Args {
    /// The module name callers use; the trait's name when not given.
    pub name: Option<LitStr>,
}

impl Args {
    pub fn parse(attr: proc_macro2::TokenStream) -> syn::Result<Args> {
        let mut args = Args::default();
        let parser = syn::meta::parser(|meta| {
            if meta.path.is_ident("name") {
                let name: LitStr = meta.value()?.parse()?;
                if name.value().is_empty() {
                    return Err(syn::Error::new(
                        name.span(),
                        "the module name cannot be empty",
                    ));
                }
                args.name = Some(name);
                Ok(())
            } else {
                Err(meta.error("unknown #[service] argument; the only one is `name = \"...\"`"))
            }
        });
        syn::parse::Parser::parse2(parser, attr)?;
        Ok(args)
    }
}

/// One argument of a method.
pub struct Param {
    pub name: Ident,
    pub ty: Type,
}

/// One method of the service.
pub struct Method {
    pub attrs: Vec<Attribute>,
    pub name: Ident,
    pub params: Vec<Param>,
    /// `None` for methods returning nothing.
    pub output: Option<Type>,
}

/// A checked service trait.
pub struct Service {
    pub module: LitStr,
    pub methods: Vec<Method>,
}

/// Checks `item` and reads its methods; every problem found is reported, not just the first.
pub fn service(args: Args, item: &ItemTrait) -> syn::Result<Service> {
    let mut errors = Errors::default();
    if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
        errors.push(&item.generics, "a #[service] trait cannot be generic: its calls cross process boundaries, where no type parameter can be chosen");
    }
    if let Some(unsafety) = &item.unsafety {
        errors.push(unsafety, "a #[service] trait cannot be `unsafe`");
    }
    if let Some(auto) = &item.auto_token {
        errors.push(auto, "a #[service] trait cannot be an auto trait");
    }
    let mut methods = Vec::new();
    for trait_item in &item.items {
        match trait_item {
            TraitItem::Fn(method) => {
                if let Some(method) = errors.check(self::method(method)) {
                    methods.push(method);
                }
            }
            other => errors.push(
                other,
                "a #[service] trait holds only `async fn` methods (no consts, types or macros)",
            ),
        }
    }
    errors.finish()?;
    let module = args
        .name
        .unwrap_or_else(|| LitStr::new(&item.ident.to_string(), item.ident.span()));
    Ok(Service { module, methods })
}

fn method(item: &TraitItemFn) -> syn::Result<Method> {
    let sig = &item.sig;
    let mut errors = Errors::default();
    if sig.asyncness.is_none() {
        errors.push(sig.fn_token, "#[service] methods must be `async fn`");
    }
    if let Some(constness) = &sig.constness {
        errors.push(constness, "#[service] methods cannot be `const`");
    }
    if let Some(unsafety) = &sig.unsafety {
        errors.push(unsafety, "#[service] methods cannot be `unsafe`");
    }
    if let Some(abi) = &sig.abi {
        errors.push(abi, "#[service] methods cannot name an ABI");
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.push(
            &sig.generics,
            "#[service] methods cannot be generic: a remote caller has no way to choose the type",
        );
    }
    if let Some(variadic) = &sig.variadic {
        errors.push(variadic, "#[service] methods cannot be variadic");
    }
    if let Some(body) = &item.default {
        errors.push(
            body,
            "#[service] methods cannot have a default body; write it in the `impl`",
        );
    }
    let name = sig.ident.to_string();
    if RESERVED.contains(&name.as_str()) {
        errors.push(&sig.ident, format!("`{name}` is a method of the generated client itself; give the service method another name"));
    }
    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(receiver))
            if receiver.reference.is_some()
                && receiver.mutability.is_none()
                && receiver.colon_token.is_none() => {}
        Some(FnArg::Receiver(receiver)) => errors.push(
            receiver,
            "#[service] methods take `&self`: the server runs many calls on one shared value",
        ),
        _ => errors.push(
            &sig.inputs,
            "#[service] methods take `&self` as their first argument",
        ),
    }
    let mut params = Vec::new();
    for input in inputs {
        let FnArg::Typed(typed) = input else {
            continue; // a second receiver is refused by rustc itself
        };
        let name = match &*typed.pat {
            Pat::Ident(ident) if ident.by_ref.is_none() && ident.subpat.is_none() => {
                ident.ident.clone()
            }
            other => {
                errors.push(other, "name each argument of a #[service] method with a plain identifier (patterns cannot be sent)");
                continue;
            }
        };
        if let Some(message) = unsupported(&typed.ty, "argument") {
            errors.push(&typed.ty, message);
        }
        params.push(Param {
            name,
            ty: (*typed.ty).clone(),
        });
    }
    let output = match &sig.output {
        ReturnType::Default => None,
        ReturnType::Type(_, ty) => {
            if let Some(message) = unsupported(ty, "return") {
                errors.push(ty, message);
            }
            Some((**ty).clone())
        }
    };
    errors.finish()?;
    Ok(Method {
        attrs: item.attrs.clone(),
        name: sig.ident.clone(),
        params,
        output,
    })
}

/// Why a type cannot travel in a call, if it cannot.
fn unsupported(ty: &Type, role: &str) -> Option<String> {
    match ty {
        Type::Reference(_) => Some(format!(
            "{role} types of #[service] methods must be owned: values are decoded on the other \
             side (use `String` for `&str`, `Vec<T>` for `&[T]`)"
        )),
        Type::ImplTrait(_) => Some(format!(
            "{role} types of #[service] methods must be concrete, not `impl Trait`"
        )),
        Type::TraitObject(_) => Some(format!(
            "{role} types of #[service] methods must be concrete, not `dyn Trait`"
        )),
        Type::Ptr(_) => Some(format!(
            "{role} types of #[service] methods cannot be raw pointers"
        )),
        Type::Paren(inner) => unsupported(&inner.elem, role),
        Type::Group(inner) => unsupported(&inner.elem, role),
        _ => None,
    }
}

/// Collects errors so a user sees every problem of a trait at once.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    /// An error covering all of `tokens`.
    fn push(&mut self, tokens: impl ToTokens, message: impl std::fmt::Display) {
        self.add(syn::Error::new_spanned(tokens, message));
    }

    fn add(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    fn check<T>(&mut self, result: syn::Result<T>) -> Option<T> {
        result.map_err(|e| self.add(e)).ok()
    }

    fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}
