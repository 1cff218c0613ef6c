//! OCI registries: tag listing (`/v2/<repository>/tags/list`), following `Link` pagination (bounded),
//! with anonymous, basic or bearer-token access (the `WWW-Authenticate` challenge flow).

use super::client::{self, Credentials};
use super::{FailureKind, Found, SourceError};
use crate::api::RegistrySource;
use serde::Deserialize;

/// Most pages read per repository.
pub const MAX_PAGES: usize = 50;
/// Tags asked for per page.
pub const PAGE_SIZE: usize = 200;
/// The default image template.
pub const DEFAULT_TEMPLATE: &str = "{{.Registry}}/{{.Repository}}:{{.Tag}}";

#[derive(Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

/// Renders an image template with `{{.Registry}}`, `{{.Repository}}` and `{{.Tag}}`.
pub fn render(
    template: &str,
    registry: &str,
    repository: &str,
    tag: &str,
) -> Result<String, SourceError> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").ok_or_else(|| {
            SourceError::new(
                FailureKind::InvalidConfig,
                format!("imageTemplate {template:?}: unclosed {{{{"),
            )
        })?;
        let field = rest[start + 2..start + end].trim();
        out.push_str(match field {
            ".Registry" => registry,
            ".Repository" => repository,
            ".Tag" => tag,
            other => {
                return Err(SourceError::new(
                    FailureKind::InvalidConfig,
                    format!("imageTemplate {template:?}: unknown field {other}; use .Registry, .Repository or .Tag"),
                ));
            }
        });
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The `next` URL of a `Link` header, resolved against the registry's base URL. A link to another
/// origin is refused: pagination would carry the source's credentials there.
fn next_link(
    base: &str,
    headers: &reqwest::header::HeaderMap,
) -> Result<Option<String>, SourceError> {
    let Some(link) = headers
        .get(reqwest::header::LINK)
        .and_then(|l| l.to_str().ok())
    else {
        return Ok(None);
    };
    let Some(part) = link
        .split(',')
        .find(|p| p.contains("rel=\"next\"") || p.contains("rel=next"))
    else {
        return Ok(None);
    };
    let target = part
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>');
    if !(target.starts_with("http://") || target.starts_with("https://")) {
        return Ok(Some(format!("{base}{target}")));
    }
    if client::same_origin(base, target) {
        Ok(Some(target.to_owned()))
    } else {
        Err(SourceError::new(
            FailureKind::InvalidResponse,
            format!(
                "{}: the next page is on another origin ({}); not followed, credentials stay with their origin",
                client::redact(base),
                client::redact(target)
            ),
        ))
    }
}

/// The parameters of a `Bearer` challenge.
fn challenge(headers: &reqwest::header::HeaderMap) -> Option<(String, Vec<(String, String)>)> {
    let value = headers
        .get(reqwest::header::WWW_AUTHENTICATE)?
        .to_str()
        .ok()?;
    let params = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    // key="value" pairs; a quoted value may itself contain commas (scope="repository:a:pull,push").
    let pair = regex::Regex::new(r#"(\w+)="([^"]*)""#).ok()?;
    let mut realm = None;
    let mut query = Vec::new();
    for c in pair.captures_iter(params) {
        match &c[1] {
            "realm" => realm = Some(c[2].to_owned()),
            k @ ("service" | "scope") => query.push((k.to_owned(), c[2].to_owned())),
            _ => {}
        }
    }
    Some((realm?, query))
}

#[derive(Deserialize)]
struct Token {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// Lists every tag of one repository, in the registry's order.
async fn tags(
    http: &reqwest::Client,
    creds: &Credentials,
    base: &str,
    repo: &str,
) -> Result<Vec<String>, SourceError> {
    let mut url = format!("{base}/v2/{repo}/tags/list?n={PAGE_SIZE}");
    let mut bearer: Option<String> = None;
    let mut all = Vec::new();
    for _ in 0..MAX_PAGES {
        let (mut status, mut headers, mut body) =
            client::send(&url, creds.authorize(http.get(&url), bearer.as_deref())).await?;
        if status == reqwest::StatusCode::UNAUTHORIZED
            && bearer.is_none()
            && let Some((realm, query)) = challenge(&headers)
        {
            // The token flow: ask the realm for a token (with the basic credentials, if any), retry.
            let same_origin = client::same_origin(base, &realm);
            if creds.basic.is_some() && !same_origin && !realm.starts_with("https://") {
                return Err(SourceError::new(
                    FailureKind::InvalidResponse,
                    format!(
                        "{}: the token realm {} is neither HTTPS nor the registry itself; the credentials are not sent there",
                        client::redact(base),
                        client::redact(&realm)
                    ),
                ));
            }
            let foreign;
            let realm_http = if same_origin {
                http
            } else {
                foreign = creds.foreign_client()?;
                &foreign
            };
            let mut req = realm_http.get(&realm).query(&query);
            if let Some((u, p)) = &creds.basic {
                req = req.basic_auth(u, Some(p));
            }
            let (st, _, tb) = client::send(&realm, req).await?;
            if !st.is_success() {
                return Err(client::status_error(&realm, st, &tb));
            }
            let t: Token = client::decode(&realm, &tb, "a token answer")?;
            bearer = t.token.or(t.access_token);
            if bearer.is_none() {
                return Err(SourceError::new(
                    FailureKind::InvalidResponse,
                    format!("{}: the answer has no token", client::redact(&realm)),
                ));
            }
            (status, headers, body) =
                client::send(&url, creds.authorize(http.get(&url), bearer.as_deref())).await?;
        }
        if !status.is_success() {
            let mut e = client::status_error(&url, status, &body);
            if e.kind == FailureKind::RepositoryNotFound {
                e.message = format!("repository {repo:?} not found at {}", client::redact(base));
            }
            return Err(e);
        }
        let page: TagList = client::decode(&url, &body, "a tag list")?;
        all.extend(page.tags.unwrap_or_default());
        match next_link(base, &headers)? {
            Some(next) => url = next,
            None => return Ok(all),
        }
    }
    Err(SourceError::new(
        FailureKind::ResponseTooLarge,
        format!(
            "{}/v2/{repo}/tags/list: more than {MAX_PAGES} pages of tags",
            client::redact(base).trim_end_matches('/')
        ),
    ))
}

/// Lists the source's repositories; each kept tag becomes an image. The kept tags of a repository
/// score 1, 2, … in the registry's order, so with `topX` the last tags returned rank highest.
pub async fn list(src: &RegistrySource, creds: &Credentials) -> Result<Found, SourceError> {
    let base = src.url.trim_end_matches('/');
    let host = base.split_once("://").map_or(base, |(_, h)| h);
    let filter = src
        .tag_filter
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .map_err(|e| SourceError::new(FailureKind::InvalidConfig, format!("tagFilter: {e}")))?;
    let template = src.image_template.as_deref().unwrap_or(DEFAULT_TEMPLATE);
    let http = creds.client()?;
    let mut found = Found::new();
    for repo in &src.repositories {
        let mut kept: Vec<String> = tags(&http, creds, base, repo)
            .await?
            .into_iter()
            .filter(|t| filter.as_ref().is_none_or(|f| f.is_match(t)))
            .collect();
        if let Some(n) = src.top_x.and_then(|n| usize::try_from(n).ok()) {
            let skip = kept.len().saturating_sub(n);
            kept.drain(..skip);
        }
        for (i, tag) in kept.iter().enumerate() {
            found.insert(render(template, host, repo, tag)?, i as i64 + 1);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x0d20_9bad),
            ..ProptestConfig::default()
        })]

        /// `Link` and `WWW-Authenticate` values as a hostile registry would send them.
        #[test]
        fn hostile_link_and_challenge_headers(
            value in prop_oneof![
                ".{0,200}",
                "<[ -~]{0,60}>; rel=\"?next\"?(, .{0,20})?",
                "[Bb]earer (realm|service|scope|x)=\"[ -~]{0,40}\"(,(realm|scope)=\"[^\"]{0,20}\"){0,3}",
            ]
        ) {
            let mut h = reqwest::header::HeaderMap::new();
            if let Ok(v) = reqwest::header::HeaderValue::from_str(&value) {
                h.insert(reqwest::header::LINK, v.clone());
                h.insert(reqwest::header::WWW_AUTHENTICATE, v);
            }
            if let Ok(Some(next)) = next_link("http://r:5000", &h) {
                prop_assert!(client::same_origin("http://r:5000", &next) || next.starts_with("http://r:5000"));
            }
            let _ = challenge(&h);
        }
    }

    #[test]
    fn discovery_credentials_do_not_follow_a_link_to_another_origin() {
        let link = |v: &str| {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(reqwest::header::LINK, v.parse().unwrap());
            h
        };
        let same = link("<http://r:5000/v2/a/tags/list?last=x>; rel=\"next\"");
        assert!(next_link("http://r:5000", &same).unwrap().is_some());
        for other in [
            "<http://r:5001/v2/a/tags/list?last=x>; rel=\"next\"",
            "<https://r:5000/v2/a/tags/list?last=x>; rel=\"next\"",
            "<http://evil.example:5000/v2/a/tags/list>; rel=\"next\"",
        ] {
            let e = next_link("http://r:5000", &link(other)).unwrap_err();
            assert!(e.message.contains("another origin"), "{}", e.message);
        }
    }

    #[test]
    fn discovery_template_renders_and_rejects_unknown_fields() {
        assert_eq!(
            render(DEFAULT_TEMPLATE, "r:5000", "team/app", "v1").unwrap(),
            "r:5000/team/app:v1"
        );
        assert_eq!(
            render(
                "{{ .Registry }}/{{.Repository}}@{{.Tag}}",
                "r",
                "a",
                "sha256:x"
            )
            .unwrap(),
            "r/a@sha256:x"
        );
        let e = render("{{.Registry}}/{{.Image}}", "r", "a", "t").unwrap_err();
        assert_eq!(e.kind, FailureKind::InvalidConfig);
        assert!(e.message.contains("unknown field .Image"));
    }

    #[test]
    fn discovery_link_and_challenge_headers_are_understood() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::LINK,
            "</v2/a/tags/list?last=t2&n=2>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        assert_eq!(
            next_link("http://r:5000", &h).unwrap().as_deref(),
            Some("http://r:5000/v2/a/tags/list?last=t2&n=2")
        );
        h.insert(
            reqwest::header::WWW_AUTHENTICATE,
            "Bearer realm=\"https://auth.example/token\",service=\"registry\",scope=\"repository:a:pull,push\"".parse().unwrap(),
        );
        let (realm, q) = challenge(&h).unwrap();
        assert_eq!(realm, "https://auth.example/token");
        assert_eq!(
            q,
            vec![
                ("service".into(), "registry".into()),
                ("scope".into(), "repository:a:pull,push".into())
            ]
        );
    }
}
