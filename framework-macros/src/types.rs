//! Syntactic inspection of field types (a derive macro sees tokens, not resolved types).

use syn::{GenericArgument, PathArguments, Type};

/// The last path segment's identifier and its single generic argument, if any: `Option<Vec<T>>` gives
/// `("Option", Some(Vec<T>))`.
pub fn head(ty: &Type) -> Option<(String, Option<&Type>)> {
    let Type::Path(p) = ty else { return None };
    let seg = p.path.segments.last()?;
    let arg = match &seg.arguments {
        PathArguments::AngleBracketed(a) if a.args.len() == 1 => match a.args.first() {
            Some(GenericArgument::Type(t)) => Some(t),
            _ => None,
        },
        _ => None,
    };
    Some((seg.ident.to_string(), arg))
}

/// `T` for `Option<T>`, else the type itself.
pub fn unwrap_option(ty: &Type) -> &Type {
    match head(ty) {
        Some((name, Some(inner))) if name == "Option" => inner,
        _ => ty,
    }
}

/// Whether the type is `Vec<Condition>` or `Option<Vec<Condition>>` (by name).
pub fn is_condition_list(ty: &Type) -> bool {
    match head(unwrap_option(ty)) {
        Some((vec, Some(inner))) if vec == "Vec" => {
            matches!(head(inner), Some((name, None)) if name == "Condition")
        }
        _ => false,
    }
}

/// Whether the type is `Option<i64>` or `i64`.
pub fn is_generation(ty: &Type) -> bool {
    matches!(head(unwrap_option(ty)), Some((name, None)) if name == "i64")
}

/// The OpenAPI column type for a scalar Rust type, if it is one the macro recognises.
pub fn column_type(ty: &Type) -> Option<&'static str> {
    let (name, _) = head(unwrap_option(ty))?;
    Some(match name.as_str() {
        "String" | "str" => "string",
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "isize" | "usize" => {
            "integer"
        }
        "f32" | "f64" => "number",
        "bool" => "boolean",
        "Time" | "MicroTime" | "Timestamp" => "date",
        _ => return None,
    })
}

/// A short rendering of a type for error messages.
pub fn display(ty: &Type) -> String {
    quote::quote!(#ty).to_string().replace(' ', "")
}
