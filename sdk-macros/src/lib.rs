//! `#[remote]`: turns a plain function into a remote function of the SDK.
//!
//! For `fn add(a: i64, b: i64) -> i64` it keeps the function as it is and adds a braced struct
//! `add` (type namespace only, so `add(1, 2)` still calls the function) with:
//! - `add::remote(a, b) -> ObjectRef<i64>` and `add::remote_with(&opts, a, b)`, whose
//!   parameters accept a value or an `ObjectRef` of it (`impl IntoArg<i64>`);
//! - `add::NAME`, the registered name (`module::path::add`);
//! - a registration in the SDK's registry, made at compile time, so a worker running this
//!   binary finds the function by name.

mod options;

use proc_macro::TokenStream;
use quote::{format_ident, quote};
use syn::{FnArg, ItemFn, ReturnType, parse_macro_input, spanned::Spanned};

/// What every call stub and invoker needs from a parameter list `(type, name)`.
struct Generated {
    /// `name: impl ::sdk::IntoArg<T>` for the stub's signature.
    params: Vec<proc_macro2::TokenStream>,
    names: Vec<syn::Ident>,
    /// `let name: T = FromArg::from_arg(next)?;` for the invoker.
    decode: Vec<proc_macro2::TokenStream>,
    count: usize,
}

fn generated(tys: &[(syn::Type, syn::Ident)]) -> Generated {
    Generated {
        params: tys.iter().map(|(t, n)| quote!(#n: impl ::sdk::IntoArg<#t>)).collect(),
        names: tys.iter().map(|(_, n)| n.clone()).collect(),
        decode: tys
            .iter()
            .map(|(t, n)| quote!(let #n: #t = <#t as ::sdk::__private::FromArg>::from_arg(__args.next()?)?;))
            .collect(),
        count: tys.len(),
    }
}

/// The attributes take no arguments (options are passed at the call).
fn no_arguments(attr: TokenStream, what: &str, hint: &str) -> Option<TokenStream> {
    if attr.is_empty() {
        return None;
    }
    let a = proc_macro2::TokenStream::from(attr);
    Some(
        syn::Error::new(
            a.span(),
            format!("{what} takes no arguments; pass options with {hint}"),
        )
        .to_compile_error()
        .into(),
    )
}

/// `#[sdk::value]` on a struct or enum: everything it needs to be a task argument, a return
/// value or an object (rkyv's `Archive`, `Serialize` and `Deserialize`, through the SDK's
/// own rkyv, so the program needs no rkyv dependency of its own).
#[proc_macro_attribute]
pub fn value(attr: TokenStream, item: TokenStream) -> TokenStream {
    if let Some(e) = no_arguments(attr, "#[value]", "serde or rkyv attributes on the fields") {
        return e;
    }
    let item = proc_macro2::TokenStream::from(item);
    quote!(
        #[derive(::sdk::rkyv::Archive, ::sdk::rkyv::Serialize, ::sdk::rkyv::Deserialize)]
        #[rkyv(crate = ::sdk::rkyv)]
        #item
    )
    .into()
}

/// `#[sdk::remote]`, or with options: `#[sdk::remote(num_cpus = 2, num_gpus = 0, memory = …,
/// resources(custom = 1), max_retries = 1, retry_exceptions = true)]`.
#[proc_macro_attribute]
pub fn remote(attr: TokenStream, item: TokenStream) -> TokenStream {
    let f = parse_macro_input!(item as ItemFn);
    match options::parse_all(attr.into(), options::On::Function).and_then(|o| expand(&f, &o)) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand(f: &ItemFn, parsed: &options::Parsed) -> syn::Result<proc_macro2::TokenStream> {
    let opts = &parsed.sets;
    let sig = &f.sig;
    // An `async fn` runs to completion on the SDK's runtime in the worker.
    let call_async = sig.asyncness.is_some();
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "a remote function cannot be generic: workers find it by name",
        ));
    }
    if let Some(v) = &sig.variadic {
        return Err(syn::Error::new(
            v.span(),
            "a remote function cannot be variadic",
        ));
    }
    let name = &sig.ident;
    let vis = &f.vis;
    let mut tys = Vec::new();
    for (i, a) in sig.inputs.iter().enumerate() {
        match a {
            FnArg::Receiver(r) => {
                return Err(syn::Error::new(
                    r.span(),
                    "a remote function cannot take self (use an actor)",
                ));
            }
            FnArg::Typed(t) => {
                if let syn::Type::Reference(r) = &*t.ty {
                    return Err(syn::Error::new(
                        r.span(),
                        "remote function parameters are owned values (or sdk::View<T> for a zero-copy view)",
                    ));
                }
                tys.push(((*t.ty).clone(), format_ident!("__arg{i}")));
            }
        }
    }
    let ret = return_type(sig);
    let Generated {
        params,
        names,
        decode,
        count,
    } = generated(&tys);
    let doc = format!("Remote form of [`{name}()`]: `{name}::remote(…)` runs it on the cluster.");
    let call = if call_async {
        quote!(::sdk::__private::block_on(#name(#(#names),*)))
    } else {
        quote!(#name(#(#names),*))
    };
    let n_returns: u8 = match &parsed.num_returns {
        Some(options::Returns::N(n)) => *n,
        Some(options::Returns::Streaming) | None => 1,
    };
    let streaming = matches!(parsed.num_returns, Some(options::Returns::Streaming));
    // With num_returns = N > 1 the function returns an N-tuple and the call N refs; a
    // streaming one returns `impl Iterator<Item = T>` and the call a generator of refs.
    let (out_ty, submit_body, encode) = if streaming {
        let item = iterator_item(&sig.output).ok_or_else(|| {
            syn::Error::new(
                sig.output.span(),
                "with num_returns = \"streaming\" the function returns `impl Iterator<Item = T>`",
            )
        })?;
        (
            quote!(::sdk::ObjectRefGenerator<#item>),
            quote!(::sdk::__private::submit_stream::<#item>(Self::NAME, opts, ::std::vec![#(::sdk::IntoArg::into_arg(#names)),*])),
            quote!(::sdk::__private::stream_items(__args, __out)),
        )
    } else if n_returns > 1 {
        let tup = match &sig.output {
            ReturnType::Type(_, t) => match &**t {
                syn::Type::Tuple(tup) => tup,
                _ => {
                    return Err(syn::Error::new(
                        t.span(),
                        format!(
                            "with num_returns = {n_returns} the function returns a tuple of {n_returns} values"
                        ),
                    ));
                }
            },
            ReturnType::Default => {
                return Err(syn::Error::new(
                    sig.span(),
                    format!(
                        "with num_returns = {n_returns} the function returns a tuple of {n_returns} values"
                    ),
                ));
            }
        };
        if tup.elems.len() != usize::from(n_returns) {
            return Err(syn::Error::new(
                tup.span(),
                format!(
                    "num_returns = {n_returns} but the tuple has {} values",
                    tup.elems.len()
                ),
            ));
        }
        let elems: Vec<&syn::Type> = tup.elems.iter().collect();
        let idx: Vec<usize> = (0..elems.len()).collect();
        let outs: Vec<syn::Ident> = idx.iter().map(|i| format_ident!("__out{i}")).collect();
        let rest_idx: Vec<syn::LitInt> = (1..elems.len())
            .map(|i| syn::LitInt::new(&format!("{i}u8"), proc_macro2::Span::call_site()))
            .collect();
        let rest_outs = &outs[1..];
        let first = &outs[0];
        (
            quote!((#(::sdk::ObjectRef<#elems>),*)),
            quote! {
                let __r = ::sdk::__private::submit_n(Self::NAME, opts, ::std::vec![#(::sdk::IntoArg::into_arg(#names)),*], #n_returns);
                (#(::sdk::__private::typed::<#elems>(__r[#idx].clone())),*)
            },
            quote! {
                let (#(#outs),*) = __out;
                #(::sdk::__private::encode_return_at(__args, #rest_idx, &#rest_outs)?;)*
                ::sdk::__private::encode_return(__args, &#first)
            },
        )
    } else {
        (
            quote!(::sdk::ObjectRef<#ret>),
            quote!(::sdk::__private::submit::<#ret>(Self::NAME, opts, ::std::vec![#(::sdk::IntoArg::into_arg(#names)),*])),
            quote!(::sdk::__private::encode_return(__args, &__out)),
        )
    };
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

            /// The options written on the attribute (the defaults for the rest).
            #vis fn options() -> ::sdk::TaskOptions {
                #[allow(unused_mut)]
                let mut __o = ::sdk::TaskOptions::default();
                #(#opts)*
                __o
            }

            /// Submits a call with the attribute's options; the value comes back through the ref.
            #vis fn remote(#(#params),*) -> #out_ty {
                Self::remote_with(&Self::options(), #(#names),*)
            }

            /// Submits a call with `opts` (resources, retries, scheduling strategy) instead of
            /// the attribute's: start from `options()` to change only some.
            #vis fn remote_with(opts: &::sdk::TaskOptions, #(#params),*) -> #out_ty {
                #submit_body
            }

            #[doc(hidden)]
            fn __invoke(__args: &mut ::sdk::__private::Args<'_>) -> ::std::result::Result<::sdk::__private::Encoded, ::sdk::__private::ArgError> {
                __args.expect(#count)?;
                #(#decode)*
                let __out = #call;
                #encode
            }
        }

        ::sdk::__private::inventory::submit! {
            ::sdk::__private::RemoteFunction { name: #name::NAME, invoke: #name::__invoke }
        }
    })
}

/// `#[actor]` on an inherent impl block makes the type an actor class.
///
/// For `impl Counter { fn new(..) -> Self; fn incr(&mut self, by: i64) -> i64; … }` it keeps
/// the impl and adds:
/// - `Counter::remote(args…) -> Result<CounterHandle, sdk::Error>` and
///   `Counter::remote_with(&sdk::ActorOptions, args…)`, which create an actor running
///   `new(args…)` on the cluster;
/// - `CounterHandle`, with one method per method taking `&self` or `&mut self`, returning
///   an `ObjectRef` of its result; `CounterHandle::get_actor(name, namespace)` finds a named
///   actor; `handle()` gives the untyped `sdk::ActorHandle` (kill, info, ready);
/// - registrations of the constructor and the methods, so the actor's worker finds them.
///
/// `&self` methods may run in parallel (with `max_concurrency` > 1), so the type must be
/// `Send + Sync`.
///
/// With options: `#[sdk::actor(max_restarts = 1, max_task_retries = 1, max_concurrency = 4,
/// num_cpus = …, resources(…), detached = …)]`, the class's `actor_options()`.
#[proc_macro_attribute]
pub fn actor(attr: TokenStream, item: TokenStream) -> TokenStream {
    let imp = parse_macro_input!(item as syn::ItemImpl);
    match options::parse(attr.into(), options::On::Actor).and_then(|o| expand_actor(&imp, &o)) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn typed_params(sig: &syn::Signature, what: &str) -> syn::Result<Vec<(syn::Type, syn::Ident)>> {
    if let Some(a) = &sig.asyncness
        && what == "constructor"
    {
        return Err(syn::Error::new(
            a.span(),
            "an actor constructor cannot be async (methods can)",
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            format!("an actor {what} cannot be generic: workers find it by name"),
        ));
    }
    let mut tys = Vec::new();
    for (i, a) in sig.inputs.iter().enumerate() {
        if let FnArg::Typed(t) = a {
            if let syn::Type::Reference(r) = &*t.ty {
                return Err(syn::Error::new(
                    r.span(),
                    "actor method parameters are owned values (or sdk::View<T> for a zero-copy view)",
                ));
            }
            tys.push(((*t.ty).clone(), format_ident!("__arg{i}")));
        }
    }
    Ok(tys)
}

fn expand_actor(
    imp: &syn::ItemImpl,
    opts: &[proc_macro2::TokenStream],
) -> syn::Result<proc_macro2::TokenStream> {
    if let Some((_, t, _)) = &imp.trait_ {
        return Err(syn::Error::new(
            t.span(),
            "#[actor] goes on an inherent impl block, not a trait impl",
        ));
    }
    if !imp.generics.params.is_empty() {
        return Err(syn::Error::new(
            imp.generics.span(),
            "an actor type cannot be generic: workers find it by name",
        ));
    }
    let self_ty = &imp.self_ty;
    let ident = match &**self_ty {
        syn::Type::Path(p) if p.qself.is_none() => p.path.segments.last().map(|s| s.ident.clone()),
        _ => None,
    }
    .ok_or_else(|| syn::Error::new(self_ty.span(), "#[actor] needs a plain type name"))?;
    let handle = format_ident!("{ident}Handle");
    let mut ctor = None;
    let mut stubs = Vec::new();
    let mut invokers = Vec::new();
    let mut regs = Vec::new();
    for item in &imp.items {
        let syn::ImplItem::Fn(f) = item else { continue };
        let sig = &f.sig;
        let name = &sig.ident;
        let receiver = sig.inputs.iter().find_map(|a| match a {
            FnArg::Receiver(r) => Some(r.clone()),
            _ => None,
        });
        match receiver {
            None if name == "new" => {
                let tys = typed_params(sig, "constructor")?;
                ctor = Some(tys);
            }
            None => {}
            Some(r) => {
                if r.reference.is_none() {
                    return Err(syn::Error::new(
                        r.span(),
                        "actor methods take &self or &mut self (the actor keeps its state)",
                    ));
                }
                let mutable = r.mutability.is_some();
                let tys = typed_params(sig, "method")?;
                let ret = return_type(sig);
                let Generated {
                    params,
                    names,
                    decode,
                    count,
                } = generated(&tys);
                // An async method runs to completion on its call's thread; the actor runs
                // up to max_concurrency calls at once.
                let call = if sig.asyncness.is_some() {
                    quote!(::sdk::__private::block_on(__this.#name(#(#names),*)))
                } else {
                    quote!(__this.#name(#(#names),*))
                };
                let method_name = quote!(concat!(
                    module_path!(),
                    "::",
                    stringify!(#ident),
                    "::",
                    stringify!(#name)
                ));
                let invoker = format_ident!("__actor_call_{name}");
                let lock = if mutable {
                    quote! {
                        let mut __g = __cell.write().unwrap_or_else(|p| p.into_inner());
                        let __this = __g.downcast_mut::<#self_ty>().ok_or_else(|| ::sdk::__private::downcast_error(stringify!(#ident)))?;
                    }
                } else {
                    quote! {
                        let __g = __cell.read().unwrap_or_else(|p| p.into_inner());
                        let __this = __g.downcast_ref::<#self_ty>().ok_or_else(|| ::sdk::__private::downcast_error(stringify!(#ident)))?;
                    }
                };
                stubs.push(quote! {
                    /// Calls the actor's method; the result comes back through the ref.
                    pub fn #name(&self, #(#params),*) -> ::sdk::ObjectRef<#ret> {
                        self.inner.call::<#ret>(#method_name, ::std::vec![#(::sdk::IntoArg::into_arg(#names)),*])
                    }
                });
                invokers.push(quote! {
                    #[doc(hidden)]
                    fn #invoker(__cell: &::sdk::__private::ActorCell, __args: &mut ::sdk::__private::Args<'_>) -> ::std::result::Result<::sdk::__private::Encoded, ::sdk::__private::ArgError> {
                        __args.expect(#count)?;
                        #(#decode)*
                        let __out: #ret = {
                            #lock
                            #call
                        };
                        ::sdk::__private::encode_return(__args, &__out)
                    }
                });
                regs.push(quote! {
                    ::sdk::__private::inventory::submit! {
                        ::sdk::__private::ActorMethod { name: #method_name, invoke: <#self_ty>::#invoker }
                    }
                });
            }
        }
    }
    let ctor = ctor.ok_or_else(|| {
        syn::Error::new(
            imp.self_ty.span(),
            "an actor needs a constructor `fn new(…) -> Self`",
        )
    })?;
    let Generated {
        params,
        names,
        decode,
        count,
    } = generated(&ctor);
    let doc = format!(
        "A handle to a `{ident}` actor: one method per actor method, each returning an `ObjectRef`. A value: it can be passed to tasks and actors and returned from them."
    );
    Ok(quote! {
        #imp

        #[doc = #doc]
        #[derive(Clone, Debug, ::sdk::rkyv::Archive, ::sdk::rkyv::Serialize, ::sdk::rkyv::Deserialize)]
        #[rkyv(crate = ::sdk::rkyv)]
        #[allow(private_interfaces, dead_code)]
        pub struct #handle {
            inner: ::sdk::ActorHandle,
        }

        #[allow(private_interfaces, dead_code)]
        impl #handle {
            #(#stubs)*

            /// The untyped handle (kill, info, ready).
            pub fn handle(&self) -> &::sdk::ActorHandle {
                &self.inner
            }

            /// Finds a live actor of this class by name (namespace `None`: "default").
            pub fn get_actor(name: &str, namespace: ::std::option::Option<&str>) -> ::std::result::Result<Self, ::sdk::Error> {
                let h = ::sdk::get_actor(name, namespace)?;
                if h.class_name() != <#self_ty>::ACTOR_CLASS {
                    return ::std::result::Result::Err(::sdk::Error::Actor(format!("the actor named {name:?} is a {}, not a {}", h.class_name(), <#self_ty>::ACTOR_CLASS)));
                }
                ::std::result::Result::Ok(Self { inner: h })
            }
        }

        #[allow(private_interfaces, dead_code)]
        impl #self_ty {
            /// The class name workers find this actor type by.
            pub const ACTOR_CLASS: &'static str = concat!(module_path!(), "::", stringify!(#ident));

            /// The options written on the attribute (the defaults for the rest).
            pub fn actor_options() -> ::sdk::ActorOptions {
                #[allow(unused_mut)]
                let mut __o = ::sdk::ActorOptions::default();
                #(#opts)*
                __o
            }

            /// Creates an actor with the attribute's options (`new(…)` runs on the cluster).
            pub fn remote(#(#params),*) -> ::std::result::Result<#handle, ::sdk::Error> {
                Self::remote_with(&Self::actor_options(), #(#names),*)
            }

            /// Creates an actor with `opts` (name, lifetime, restarts, concurrency, resources).
            pub fn remote_with(opts: &::sdk::ActorOptions, #(#params),*) -> ::std::result::Result<#handle, ::sdk::Error> {
                let inner = ::sdk::__private::create_actor(Self::ACTOR_CLASS, opts, ::std::vec![#(::sdk::IntoArg::into_arg(#names)),*])?;
                ::std::result::Result::Ok(#handle { inner })
            }

            #[doc(hidden)]
            fn __actor_construct(__args: &mut ::sdk::__private::Args<'_>) -> ::std::result::Result<::std::boxed::Box<dyn ::std::any::Any + ::std::marker::Send + ::std::marker::Sync>, ::sdk::__private::ArgError> {
                __args.expect(#count)?;
                #(#decode)*
                let __state: #self_ty = <#self_ty>::new(#(#names),*);
                ::std::result::Result::Ok(::std::boxed::Box::new(__state))
            }

            #(#invokers)*
        }

        ::sdk::__private::inventory::submit! {
            ::sdk::__private::ActorClass { name: <#self_ty>::ACTOR_CLASS, construct: <#self_ty>::__actor_construct }
        }
        #(#regs)*
    })
}

/// What a function returns, `()` when it names nothing.
/// `T` of a return type `impl Iterator<Item = T>` (or `impl IntoIterator<Item = T>`).
fn iterator_item(out: &ReturnType) -> Option<syn::Type> {
    let ReturnType::Type(_, t) = out else {
        return None;
    };
    let syn::Type::ImplTrait(it) = &**t else {
        return None;
    };
    it.bounds.iter().find_map(|b| {
        let syn::TypeParamBound::Trait(tb) = b else {
            return None;
        };
        let seg = tb.path.segments.last()?;
        if seg.ident != "Iterator" && seg.ident != "IntoIterator" {
            return None;
        }
        let syn::PathArguments::AngleBracketed(a) = &seg.arguments else {
            return None;
        };
        a.args.iter().find_map(|g| match g {
            syn::GenericArgument::AssocType(at) if at.ident == "Item" => Some(at.ty.clone()),
            _ => None,
        })
    })
}

fn return_type(sig: &syn::Signature) -> proc_macro2::TokenStream {
    match &sig.output {
        ReturnType::Default => quote!(()),
        ReturnType::Type(_, t) => quote!(#t),
    }
}
