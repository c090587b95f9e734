//! `#[remote]`: turns a plain function into a remote function of the SDK.
//!
//! For `fn add(a: i64, b: i64) -> i64` it keeps the function as it is and adds a braced struct
//! `add` (type namespace only, so `add(1, 2)` still calls the function) with:
//! - `add::remote(a, b) -> ObjectRef<i64>` and `add::remote_with(&opts, a, b)`, whose
//!   parameters accept a value or an `ObjectRef` of it (`impl IntoArg<i64>`);
//! - `add::NAME`, the registered name (`module::path::add`);
//! - a registration in the SDK's registry, made at compile time, so a worker running this
//!   binary finds the function by name.

use proc_macro::TokenStream;
use quote::{format_ident, quote};
use syn::{parse_macro_input, spanned::Spanned, FnArg, ItemFn, ReturnType};

#[proc_macro_attribute]
pub fn remote(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        let a = proc_macro2::TokenStream::from(attr);
        return syn::Error::new(a.span(), "#[remote] takes no arguments; pass options with `name::remote_with(&opts, …)`")
            .to_compile_error()
            .into();
    }
    let f = parse_macro_input!(item as ItemFn);
    match expand(&f) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand(f: &ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    let sig = &f.sig;
    if let Some(a) = &sig.asyncness {
        return Err(syn::Error::new(a.span(), "a remote function cannot be async (it runs on a worker thread; use blocking calls)"));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(sig.generics.span(), "a remote function cannot be generic: workers find it by name"));
    }
    if let Some(v) = &sig.variadic {
        return Err(syn::Error::new(v.span(), "a remote function cannot be variadic"));
    }
    let name = &sig.ident;
    let vis = &f.vis;
    let mut tys = Vec::new();
    for (i, a) in sig.inputs.iter().enumerate() {
        match a {
            FnArg::Receiver(r) => return Err(syn::Error::new(r.span(), "a remote function cannot take self (use an actor)")),
            FnArg::Typed(t) => {
                if let syn::Type::Reference(r) = &*t.ty {
                    return Err(syn::Error::new(r.span(), "remote function parameters are owned values (or sdk::View<T> for a zero-copy view)"));
                }
                tys.push(((*t.ty).clone(), format_ident!("__arg{i}")));
            }
        }
    }
    let ret = match &sig.output {
        ReturnType::Default => quote!(()),
        ReturnType::Type(_, t) => quote!(#t),
    };
    let params: Vec<_> = tys.iter().map(|(t, n)| quote!(#n: impl ::sdk::IntoArg<#t>)).collect();
    let names: Vec<_> = tys.iter().map(|(_, n)| n.clone()).collect();
    let decode: Vec<_> = tys
        .iter()
        .map(|(t, n)| quote!(let #n: #t = <#t as ::sdk::__private::FromArg>::from_arg(__args.next()?)?;))
        .collect();
    let count = tys.len();
    let doc = format!("Remote form of [`{name}()`]: `{name}::remote(…)` runs it on the cluster.");
    Ok(quote! {
        #f

        #[doc = #doc]
        #[allow(non_camel_case_types)]
        #vis struct #name {
            _private: (),
        }

        #[allow(dead_code)]
        impl #name {
            /// The name workers find this function by.
            pub const NAME: &'static str = concat!(module_path!(), "::", stringify!(#name));

            /// Submits a call with default options; the value comes back through the ref.
            #vis fn remote(#(#params),*) -> ::sdk::ObjectRef<#ret> {
                Self::remote_with(&::sdk::TaskOptions::default(), #(#names),*)
            }

            /// Submits a call with `opts` (resources, retries, scheduling strategy).
            #vis fn remote_with(opts: &::sdk::TaskOptions, #(#params),*) -> ::sdk::ObjectRef<#ret> {
                ::sdk::__private::submit::<#ret>(Self::NAME, opts, ::std::vec![#(::sdk::IntoArg::into_arg(#names)),*])
            }

            #[doc(hidden)]
            fn __invoke(__args: &mut ::sdk::__private::Args<'_>) -> ::std::result::Result<::sdk::__private::Encoded, ::sdk::__private::ArgError> {
                __args.expect(#count)?;
                #(#decode)*
                let __out: #ret = #name(#(#names),*);
                ::sdk::__private::encode_return(__args, &__out)
            }
        }

        ::sdk::__private::inventory::submit! {
            ::sdk::__private::RemoteFunction { name: #name::NAME, invoke: #name::__invoke }
        }
    })
}
