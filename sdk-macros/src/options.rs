//! Options written on the attribute, as Ray users write `@ray.remote(num_cpus=2)`:
//! `#[sdk::remote(num_cpus = 2, resources(custom = 1), max_retries = 1, retry_exceptions = true)]`
//! and `#[sdk::actor(max_restarts = 1, max_task_retries = 1, max_concurrency = 4)]`. They
//! become the function's (or class's) `options()`, which `remote(…)` uses; call-site options
//! (`remote_with(&name::options().num_cpus(1.0), …)`) override them.

use proc_macro2::TokenStream;
use quote::quote;
use syn::parse::Parser;

/// Which attribute the options are on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum On {
    Function,
    Actor,
}

/// What kind of value an option takes, and how it is set on the options struct `__o`.
enum Ty {
    F64,
    U32,
    I64,
    Bool,
}

fn known(on: On, key: &str) -> Option<Ty> {
    Some(match (on, key) {
        (_, "num_cpus" | "num_gpus" | "memory") => Ty::F64,
        (On::Function, "max_retries") => Ty::U32,
        (On::Function, "retry_exceptions" | "enable_task_events") => Ty::Bool,
        (On::Actor, "max_restarts" | "max_task_retries") => Ty::I64,
        (On::Actor, "max_concurrency") => Ty::U32,
        (On::Actor, "detached") => Ty::Bool,
        _ => return None,
    })
}

fn names(on: On) -> &'static str {
    match on {
        On::Function => {
            "num_cpus, num_gpus, memory, resources(name = amount, …), max_retries, retry_exceptions, num_returns, enable_task_events"
        }
        On::Actor => {
            "num_cpus, num_gpus, memory, resources(name = amount, …), max_restarts, max_task_retries, max_concurrency, detached"
        }
    }
}

/// The statements that set the attribute's options on `__o`.
pub(crate) fn parse(attr: TokenStream, on: On) -> syn::Result<Vec<TokenStream>> {
    parse_all(attr, on).map(|p| p.sets)
}

/// What the attribute says.
pub(crate) struct Parsed {
    pub(crate) sets: Vec<TokenStream>,
    /// `num_returns = N` or `"streaming"` (functions only).
    pub(crate) num_returns: Option<Returns>,
}

pub(crate) enum Returns {
    N(u8),
    Streaming,
}

pub(crate) fn parse_all(attr: TokenStream, on: On) -> syn::Result<Parsed> {
    let mut sets = Vec::new();
    let mut num_returns = None;
    let parser = syn::meta::parser(|meta| {
        let key = meta
            .path
            .get_ident()
            .map(ToString::to_string)
            .unwrap_or_default();
        if key == "num_returns" && on == On::Function {
            let lit: syn::Lit = meta.value()?.parse()?;
            num_returns = Some(match &lit {
                syn::Lit::Int(n) => {
                    let v: u8 = n.base10_parse()?;
                    if !(1..=63).contains(&v) {
                        return Err(syn::Error::new(n.span(), "num_returns is 1 to 63"));
                    }
                    Returns::N(v)
                }
                syn::Lit::Str(s) if s.value() == "streaming" => Returns::Streaming,
                _ => {
                    return Err(syn::Error::new(
                        lit.span(),
                        "num_returns is a number (1 to 63) or \"streaming\"",
                    ));
                }
            });
            return Ok(());
        }
        if key == "resources" {
            return meta.parse_nested_meta(|m| {
                let name = m
                    .path
                    .get_ident()
                    .map(ToString::to_string)
                    .ok_or_else(|| m.error("a resource name is one identifier"))?;
                let e: syn::Expr = m.value()?.parse()?;
                sets.push(quote!(__o.resources.insert(#name.to_owned(), (#e) as f64);));
                Ok(())
            });
        }
        let Some(ty) = known(on, &key) else {
            return Err(meta.error(format!(
                "unknown option `{key}`; the options here are {}",
                names(on)
            )));
        };
        let field = syn::Ident::new(&key, meta.path.span());
        let e: syn::Expr = meta.value()?.parse()?;
        sets.push(match ty {
            Ty::F64 => quote!(__o.#field = (#e) as f64;),
            Ty::U32 => quote!(__o.#field = (#e) as u32;),
            Ty::I64 => quote!(__o.#field = (#e) as i64;),
            Ty::Bool => quote!(__o.#field = #e;),
        });
        Ok(())
    });
    parser.parse2(attr)?;
    Ok(Parsed { sets, num_returns })
}

use syn::spanned::Spanned;

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(src: &str, on: On) -> Result<Vec<String>, String> {
        let ts: TokenStream = src.parse().map_err(|e| format!("{e:?}"))?;
        parse(ts, on)
            .map(|v| v.iter().map(ToString::to_string).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn options_become_assignments_and_unknown_ones_are_named() {
        let s = sets(
            "num_cpus = 2, resources(custom = 1, gpu_a = 0.5), max_retries = 1, retry_exceptions = true",
            On::Function,
        )
        .unwrap();
        assert_eq!(s.len(), 5, "{s:?}");
        assert!(
            s[0].contains("num_cpus") && s[0].contains("as f64"),
            "{s:?}"
        );
        assert!(
            s[1].contains("\"custom\"") && s[2].contains("\"gpu_a\""),
            "{s:?}"
        );
        assert!(s[3].contains("as u32"), "{s:?}");
        let e = sets("max_restarts = 1", On::Function).unwrap_err();
        assert!(
            e.contains("unknown option `max_restarts`") && e.contains("retry_exceptions"),
            "{e}"
        );
        assert!(sets("max_restarts = -1, max_concurrency = 4", On::Actor).is_ok());
        let e = sets("retry_exceptions = true", On::Actor).unwrap_err();
        assert!(e.contains("max_task_retries"), "{e}");
        assert!(sets("num_cpus", On::Function).is_err(), "a value is needed");
        assert!(sets("", On::Actor).unwrap().is_empty());
    }
}
