//! `#[derive(Status)]`.

use crate::{serde_name, types};
use darling::{Error, FromMeta, Result};
use proc_macro2::TokenStream;
use quote::quote;
use syn::{Data, DeriveInput, Fields};

#[derive(FromMeta, Default)]
struct StatusAttr {
    #[darling(default)]
    conditions: bool,
    #[darling(default)]
    observed_generation: bool,
}

pub fn derive(input: &DeriveInput) -> Result<TokenStream> {
    let Data::Struct(data) = &input.data else {
        return Err(Error::custom(
            "Status can only be derived for a struct with named fields: a status is an object",
        )
        .with_span(&input.ident));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(Error::custom(
            "Status needs named fields: mark them #[status(conditions)] and \
                                  #[status(observed_generation)]",
        )
        .with_span(&input.ident));
    };
    let rule = serde_name::rename_all(&input.attrs)?;
    let mut errors = Error::accumulator();
    let mut conditions: Option<(&syn::Field, String)> = None;
    let mut generation: Option<&syn::Field> = None;
    for field in &fields.named {
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("status")) {
            let Some(a) = errors.handle(StatusAttr::from_meta(&attr.meta)) else {
                continue;
            };
            if !a.conditions && !a.observed_generation {
                errors.push(
                    Error::custom("say what this field is: #[status(conditions)] or #[status(observed_generation)]")
                        .with_span(attr),
                );
            }
            if a.conditions {
                if conditions.is_some() {
                    errors.push(
                        Error::custom("only one field may be #[status(conditions)]: keep every condition in one list")
                            .with_span(attr),
                    );
                } else if !types::is_condition_list(&field.ty) {
                    errors.push(
                        Error::custom(format!(
                            "#[status(conditions)] must be on a `Vec<Condition>` (or `Option<Vec<Condition>>`) \
                             field, found `{}`",
                            types::display(&field.ty)
                        ))
                        .with_span(&field.ty),
                    );
                } else if let Some(name) =
                    errors.handle(serde_name::wire_name(field, rule.as_deref()))
                {
                    conditions = Some((field, name));
                }
            }
            if a.observed_generation {
                if generation.is_some() {
                    errors.push(
                        Error::custom("only one field may be #[status(observed_generation)]")
                            .with_span(attr),
                    );
                } else if !types::is_generation(&field.ty) {
                    errors.push(
                        Error::custom(format!(
                            "#[status(observed_generation)] must be on an `Option<i64>` (or `i64`) field, \
                             like metadata.generation; found `{}`",
                            types::display(&field.ty)
                        ))
                        .with_span(&field.ty),
                    );
                } else {
                    generation = Some(field);
                }
            }
        }
    }
    errors.finish()?;

    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let condition_path =
        quote!(::kube_plan::k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition);
    let (field_name, get, get_mut) = match &conditions {
        Some((field, name)) => {
            let f = &field.ident;
            let optional = types::head(&field.ty).is_some_and(|(n, _)| n == "Option");
            if optional {
                (
                    quote!(::core::option::Option::Some(#name)),
                    quote!(self.#f.as_deref().unwrap_or(&[])),
                    quote!(::core::option::Option::Some(self.#f.get_or_insert_with(::std::vec::Vec::new))),
                )
            } else {
                (
                    quote!(::core::option::Option::Some(#name)),
                    quote!(&self.#f),
                    quote!(::core::option::Option::Some(&mut self.#f)),
                )
            }
        }
        None => (
            quote!(::core::option::Option::None),
            quote!(&[]),
            quote!(::core::option::Option::None),
        ),
    };
    let set_generation = match generation {
        Some(field) => {
            let f = &field.ident;
            if types::head(&field.ty).is_some_and(|(n, _)| n == "Option") {
                quote!(self.#f = generation;)
            } else {
                quote!(self.#f = generation.unwrap_or_default();)
            }
        }
        None => quote!(let _ = generation;),
    };
    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics ::kube_plan::ObjectStatus for #ident #ty_generics #where_clause {
            const CONDITIONS_FIELD: ::core::option::Option<&'static str> = #field_name;
            fn conditions(&self) -> &[#condition_path] {
                #get
            }
            fn conditions_mut(&mut self) -> ::core::option::Option<&mut ::std::vec::Vec<#condition_path>> {
                #get_mut
            }
            fn set_observed_generation(&mut self, generation: ::core::option::Option<i64>) {
                #set_generation
            }
        }
    })
}
