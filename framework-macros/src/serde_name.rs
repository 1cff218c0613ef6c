//! The name serde gives a field on the wire, so that derived JSONPaths match the serialized object.

use darling::{Error, Result};
use syn::{Attribute, Field, LitStr};

/// The `rename_all` rule of a container, if any.
pub fn rename_all(attrs: &[Attribute]) -> Result<Option<String>> {
    let mut rule = None;
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("rename_all") {
                let value: LitStr = meta.value()?.parse()?;
                rule = Some(value.value());
            } else if meta.input.peek(syn::Token![=]) {
                let _: syn::Expr = meta.value()?.parse()?;
            } else if meta.input.peek(syn::token::Paren) {
                let _ = meta.input.parse::<proc_macro2::Group>()?;
            }
            Ok(())
        })
        .map_err(Error::from)?;
    }
    Ok(rule)
}

/// Serde facts about one field that matter to the macros.
pub struct FieldSerde {
    pub rename: Option<String>,
    pub flatten: bool,
}

pub fn field_serde(field: &Field) -> Result<FieldSerde> {
    let mut out = FieldSerde {
        rename: None,
        flatten: false,
    };
    for attr in field.attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("rename") {
                let value: LitStr = meta.value()?.parse()?;
                out.rename = Some(value.value());
            } else if meta.path.is_ident("flatten") {
                out.flatten = true;
            } else if meta.input.peek(syn::Token![=]) {
                let _: syn::Expr = meta.value()?.parse()?;
            } else if meta.input.peek(syn::token::Paren) {
                let _ = meta.input.parse::<proc_macro2::Group>()?;
            }
            Ok(())
        })
        .map_err(Error::from)?;
    }
    Ok(out)
}

/// The serialized name of `field` under the container's `rename_all` rule.
pub fn wire_name(field: &Field, rule: Option<&str>) -> Result<String> {
    let serde = field_serde(field)?;
    if let Some(name) = serde.rename {
        return Ok(name);
    }
    let ident = field
        .ident
        .as_ref()
        .ok_or_else(|| Error::custom("expected a named field"))?
        .to_string();
    let ident = ident.strip_prefix("r#").unwrap_or(&ident).to_owned();
    apply_rule(&ident, rule).ok_or_else(|| {
        Error::custom(format!(
            "unsupported serde rename_all rule `{}`",
            rule.unwrap_or_default()
        ))
    })
}

fn apply_rule(snake: &str, rule: Option<&str>) -> Option<String> {
    let words: Vec<&str> = snake.split('_').filter(|w| !w.is_empty()).collect();
    let cap = |w: &str| {
        let mut c = w.chars();
        c.next()
            .map(|f| f.to_uppercase().chain(c).collect::<String>())
            .unwrap_or_default()
    };
    Some(match rule {
        None | Some("snake_case") => snake.to_owned(),
        Some("lowercase") => snake.replace('_', "").to_lowercase(),
        Some("UPPERCASE") => snake.replace('_', "").to_uppercase(),
        Some("camelCase") => {
            let mut out = words.first().map(|w| w.to_string()).unwrap_or_default();
            out.extend(words.iter().skip(1).map(|w| cap(w)));
            out
        }
        Some("PascalCase") => words.iter().map(|w| cap(w)).collect(),
        Some("SCREAMING_SNAKE_CASE") => snake.to_uppercase(),
        Some("kebab-case") => snake.replace('_', "-"),
        Some("SCREAMING-KEBAB-CASE") => snake.replace('_', "-").to_uppercase(),
        Some(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::apply_rule;

    #[test]
    fn rules_follow_serde() {
        assert_eq!(
            apply_rule("nodes_ready", Some("camelCase")).unwrap(),
            "nodesReady"
        );
        assert_eq!(
            apply_rule("nodes_ready", Some("PascalCase")).unwrap(),
            "NodesReady"
        );
        assert_eq!(apply_rule("nodes_ready", None).unwrap(), "nodes_ready");
        assert_eq!(
            apply_rule("nodes_ready", Some("kebab-case")).unwrap(),
            "nodes-ready"
        );
        assert_eq!(apply_rule("top_x", Some("camelCase")).unwrap(), "topX");
        assert!(apply_rule("a", Some("weird")).is_none());
    }
}
