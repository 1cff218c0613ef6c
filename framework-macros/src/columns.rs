//! `#[derive(PrinterColumns)]`.

use crate::{serde_name, types};
use darling::{Error, FromMeta, Result};
use proc_macro2::TokenStream;
use quote::quote;
use syn::{Data, DeriveInput, Fields};

const TYPES: &[&str] = &["string", "integer", "number", "boolean", "date"];
const CONDITION_FIELDS: &[&str] = &["status", "reason", "message"];

#[derive(FromMeta)]
struct ColumnAttr {
    name: Option<String>,
    priority: Option<i32>,
    type_: Option<String>,
    path: Option<String>,
    description: Option<String>,
    condition: Option<String>,
    field: Option<String>,
}

struct Column {
    name: String,
    type_: String,
    /// Path below the prefix, e.g. `.replicas` or `.conditions[?(@.type=="Ready")].reason`.
    suffix: String,
    priority: i32,
    description: Option<String>,
}

pub fn derive(input: &DeriveInput) -> Result<TokenStream> {
    let Data::Struct(data) = &input.data else {
        return Err(Error::custom(
            "PrinterColumns can only be derived for a struct with named fields (a spec or status struct)",
        )
        .with_span(&input.ident));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(Error::custom(
            "PrinterColumns needs named fields: the column's JSONPath is derived from the field name",
        )
        .with_span(&input.ident));
    };
    let rule = serde_name::rename_all(&input.attrs)?;
    let mut errors = Error::accumulator();
    let mut columns = Vec::new();
    for field in &fields.named {
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("column")) {
            let parsed = match attr.meta {
                syn::Meta::Path(_) => ColumnAttr::from_list(&[]),
                _ => ColumnAttr::from_meta(&attr.meta),
            };
            let Some(col) = errors.handle(parsed) else {
                continue;
            };
            if let Some(c) =
                errors.handle(column(field, rule.as_deref(), col).map_err(|e| e.with_span(attr)))
            {
                columns.push(c);
            }
        }
    }
    errors.finish()?;

    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let items = columns.iter().map(|c| {
        let Column {
            name,
            type_,
            suffix,
            priority,
            description,
        } = c;
        let description = match description {
            Some(d) => quote!(::core::option::Option::Some(::std::string::String::from(#d))),
            None => quote!(::core::option::Option::None),
        };
        quote! {
            ::kube_plan::Column {
                name: ::std::string::String::from(#name),
                type_: #type_,
                json_path: ::std::format!("{}{}", prefix, #suffix),
                priority: #priority,
                description: #description,
            }
        }
    });
    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics ::kube_plan::PrinterColumns for #ident #ty_generics #where_clause {
            fn columns(prefix: &str) -> ::std::vec::Vec<::kube_plan::Column> {
                ::std::vec![#(#items),*]
            }
        }
    })
}

fn column(field: &syn::Field, rule: Option<&str>, attr: ColumnAttr) -> Result<Column> {
    if serde_name::is_flattened(field)? {
        return Err(Error::custom(
            "#[column] cannot be used on a #[serde(flatten)] field: it has no path of its own; \
             put #[column] on the fields of the flattened struct instead",
        ));
    }
    let wire = serde_name::wire_name(field, rule)?;
    if let Some(p) = attr.priority
        && p < 0
    {
        return Err(Error::custom(format!(
            "column priority must be 0 (always shown) or positive (shown with -o wide), not {p}"
        )));
    }
    if let Some(t) = &attr.type_
        && !TYPES.contains(&t.as_str())
    {
        return Err(Error::custom(format!(
            "unknown column type `{t}`: use one of {}",
            TYPES.join(", ")
        )));
    }
    let (suffix, inferred, default_name) = match (&attr.condition, &attr.field) {
        (Some(cond), field_name) => {
            if !types::is_condition_list(&field.ty) {
                return Err(Error::custom(format!(
                    "`condition = \"{cond}\"` selects from a conditions list, but this field is `{}`; \
                     use it on a Vec<Condition> field",
                    types::display(&field.ty)
                )));
            }
            let f = field_name.as_deref().ok_or_else(|| {
                Error::custom(format!(
                    "say which field of the `{cond}` condition to show: add `field = \"reason\"` \
                     (or \"status\", \"message\")"
                ))
            })?;
            if !CONDITION_FIELDS.contains(&f) {
                return Err(Error::custom(format!(
                    "a condition has no field `{f}` to show: use one of {}",
                    CONDITION_FIELDS.join(", ")
                )));
            }
            let suffix = format!(".{wire}[?(@.type==\"{cond}\")].{f}");
            (suffix, Some("string"), capitalise(f))
        }
        (None, Some(f)) => {
            return Err(Error::custom(format!(
                "`field = \"{f}\"` only applies to a conditions list: add `condition = \"Ready\"` \
                 (the condition type to read) or remove `field`"
            )));
        }
        (None, None) => match &attr.path {
            Some(sub) => {
                if !sub.starts_with('.') || sub.len() < 2 {
                    return Err(Error::custom(format!(
                        "`path = \"{sub}\"` continues the field's JSONPath, so it starts with a dot: \
                         `path = \".name\"`"
                    )));
                }
                // The macro cannot see the type below the field: `type_` has to say it.
                (format!(".{wire}{sub}"), None, capitalise(&wire))
            }
            None => (
                format!(".{wire}"),
                types::column_type(&field.ty),
                capitalise(&wire),
            ),
        },
    };
    let type_ = match (&attr.type_, inferred) {
        (Some(t), _) => t.clone(),
        (None, Some(t)) => t.to_owned(),
        (None, None) => {
            return Err(Error::custom(format!(
                "cannot infer a column type for `{}{}`: add `type_ = \"string\"` (one of {})",
                types::display(&field.ty),
                attr.path
                    .as_deref()
                    .map(|p| format!("` at `{p}"))
                    .unwrap_or_default(),
                TYPES.join(", ")
            )));
        }
    };
    Ok(Column {
        name: attr.name.unwrap_or(default_name),
        type_,
        suffix,
        priority: attr.priority.unwrap_or(0),
        description: attr.description,
    })
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}
