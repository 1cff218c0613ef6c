//! The name serde gives a field on the wire, so that derived JSONPaths match the serialized object.

use darling::{Error, Result};
use syn::{Attribute, Field};

/// What the macros read from `#[serde(...)]` attributes: string-valued keys and bare flags.
#[derive(Default)]
struct SerdeAttrs {
    values: Vec<(String, String)>,
    flags: Vec<String>,
}

impl SerdeAttrs {
    /// Reads every `#[serde(...)]` of `attrs`, skipping what is neither `key = "…"` nor a bare flag
    /// (such as `default = "path"` or nested lists).
    fn read(attrs: &[Attribute]) -> Result<Self> {
        let mut out = Self::default();
        for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
            attr.parse_nested_meta(|meta| {
                let key = meta
                    .path
                    .get_ident()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                if meta.input.peek(syn::Token![=]) {
                    let value: syn::Expr = meta.value()?.parse()?;
                    if let syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(s),
                        ..
                    }) = value
                    {
                        out.values.push((key, s.value()));
                    }
                } else if meta.input.peek(syn::token::Paren) {
                    let _ = meta.input.parse::<proc_macro2::Group>()?;
                } else {
                    out.flags.push(key);
                }
                Ok(())
            })
            .map_err(Error::from)?;
        }
        Ok(out)
    }

    fn value(&self, key: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The `rename_all` rule of a container, if any.
pub fn rename_all(attrs: &[Attribute]) -> Result<Option<String>> {
    Ok(SerdeAttrs::read(attrs)?
        .value("rename_all")
        .map(str::to_owned))
}

/// Whether the field is `#[serde(flatten)]`.
pub fn is_flattened(field: &Field) -> Result<bool> {
    Ok(SerdeAttrs::read(&field.attrs)?
        .flags
        .iter()
        .any(|f| f == "flatten"))
}

/// The serialized name of `field` under the container's `rename_all` rule.
pub fn wire_name(field: &Field, rule: Option<&str>) -> Result<String> {
    if let Some(name) = SerdeAttrs::read(&field.attrs)?.value("rename") {
        return Ok(name.to_owned());
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
