//! The `#[weir_sdk::handler]` attribute.
//!
//! It keeps the user's fn as written, checks its signature against
//! `fn(weir_sdk::Event) -> Result<(), weir_sdk::Error>` on every target, and on wasm32
//! adds the export glue for the `weir:function/event-handler` world.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, Item, ItemFn, ReturnType};

const SHAPE: &str = "`fn NAME(event: weir_sdk::Event) -> Result<(), weir_sdk::Error>`";

/// Marks the fn that handles each event: `fn NAME(event: Event) -> Result<(), Error>`.
///
/// Built for wasm32 it exports the fn as the component's `handle`; built natively it
/// leaves the fn alone so tests can call it through `weir_sdk::testing::Harness`.
#[proc_macro_attribute]
pub fn handler(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(attr.into(), item.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

fn expand(attr: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    if !attr.is_empty() {
        return Err(syn::Error::new_spanned(
            attr,
            "#[weir_sdk::handler] takes no arguments",
        ));
    }
    let func = match syn::parse2::<Item>(item)? {
        Item::Fn(func) => func,
        other => {
            return Err(syn::Error::new_spanned(
                other,
                format!("#[weir_sdk::handler] goes on a free function {SHAPE}"),
            ));
        }
    };
    check_signature(&func)?;

    let name = &func.sig.ident;
    // Type-checks the signature on every target, and counts as a use of the fn so a
    // private handler is not dead code in a native build.
    let check = quote_spanned! {func.sig.span()=>
        #[doc(hidden)]
        const _: fn(::weir_sdk::Event) -> ::core::result::Result<(), ::weir_sdk::Error> = #name;
    };
    Ok(quote! {
        #func

        #check

        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        #[allow(unsafe_code)]
        const _: () = {
            struct __WeirHandler;

            impl ::weir_sdk::__bindings::Guest for __WeirHandler {
                fn handle(
                    event: ::weir_sdk::__bindings::Event,
                ) -> ::core::result::Result<(), ::weir_sdk::__bindings::Error> {
                    ::weir_sdk::__bindings::dispatch(#name, event)
                }
            }

            ::weir_sdk::__bindings::__export_event_handler!(
                __WeirHandler with_types_in ::weir_sdk::__bindings
            );
        };
    })
}

fn check_signature(func: &ItemFn) -> syn::Result<()> {
    let sig = &func.sig;
    let wrong = |span: proc_macro2::Span, what: &str| {
        Err(syn::Error::new(
            span,
            format!("#[weir_sdk::handler]: {what}; expected {SHAPE}"),
        ))
    };
    if let Some(token) = &sig.asyncness {
        return wrong(token.span, "the handler cannot be async");
    }
    if !sig.generics.params.is_empty() {
        return wrong(sig.generics.span(), "the handler cannot be generic");
    }
    if let Some(variadic) = &sig.variadic {
        return wrong(variadic.span(), "the handler cannot be variadic");
    }
    if sig.inputs.is_empty() {
        return wrong(sig.paren_token.span.join(), "the handler takes no argument");
    }
    if let Some(extra) = sig.inputs.iter().nth(1) {
        return wrong(extra.span(), "the handler takes more than one argument");
    }
    if let Some(FnArg::Receiver(receiver)) = sig.inputs.first() {
        return wrong(receiver.span(), "the handler cannot take `self`");
    }
    if let ReturnType::Default = sig.output {
        return wrong(sig.ident.span(), "the handler returns nothing");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::expand;
    use quote::quote;

    fn error(attr: proc_macro2::TokenStream, item: proc_macro2::TokenStream) -> String {
        match expand(attr, item) {
            Ok(tokens) => panic!("expected an error, got {tokens}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn keeps_the_fn_and_adds_the_check_and_wasm_glue() {
        let out = expand(
            quote!(),
            quote!(
                fn handle(event: Event) -> Result<(), Error> {
                    Ok(())
                }
            ),
        )
        .expect("a valid handler")
        .to_string();
        assert!(out.starts_with("fn handle (event : Event)"), "{out}");
        assert!(out.contains("= handle ;"), "{out}");
        assert!(out.contains("__export_event_handler !"), "{out}");
        assert!(out.contains("target_arch = \"wasm32\""), "{out}");
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(
            error(
                quote!(x),
                quote!(
                    fn h(e: Event) -> R {}
                )
            )
            .contains("no arguments")
        );
        assert!(
            error(
                quote!(),
                quote!(
                    struct S;
                )
            )
            .contains("free function")
        );
        assert!(
            error(
                quote!(),
                quote!(
                    fn h() -> R {}
                )
            )
            .contains("takes no argument")
        );
        assert!(
            error(
                quote!(),
                quote!(
                    fn h(a: A, b: B) -> R {}
                )
            )
            .contains("more than one")
        );
        assert!(
            error(
                quote!(),
                quote!(
                    async fn h(e: Event) -> R {}
                )
            )
            .contains("async")
        );
        assert!(
            error(
                quote!(),
                quote!(
                    fn h<T>(e: T) -> R {}
                )
            )
            .contains("generic")
        );
        assert!(
            error(
                quote!(),
                quote!(
                    fn h(e: Event) {}
                )
            )
            .contains("returns nothing")
        );
    }
}
