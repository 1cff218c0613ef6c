//! HTTP for discovery sources: credentials from a Secret, TLS with a custom CA and client
//! certificates, bounded requests, and failure classification.

use super::{FailureKind, SourceError};
use k8s_openapi::ByteString;
use std::collections::BTreeMap;
use std::time::Duration;

/// Longest wait for one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response body read (bytes).
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// What a source's Secret provides. Its Debug output never shows secret values.
#[derive(Clone, Default)]
pub struct Credentials {
    /// Bearer token (`token`).
    pub token: Option<String>,
    /// Basic auth (`username`, `password`).
    pub basic: Option<(String, String)>,
    /// CA bundle to trust (`ca.crt`).
    pub ca: Option<Vec<u8>>,
    /// Client certificate and key (`tls.crt`, `tls.key`).
    pub client_cert: Option<(Vec<u8>, Vec<u8>)>,
    /// Extra headers (`headers.<name>`).
    pub headers: Vec<(String, String)>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "basic",
                &self.basic.as_ref().map(|(u, _)| (u, "<redacted>")),
            )
            .field("ca", &self.ca.is_some())
            .field("client_cert", &self.client_cert.is_some())
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Credentials {
    /// Reads the keys Drop understands from a Secret's data.
    pub fn from_secret(
        name: &str,
        data: &BTreeMap<String, ByteString>,
    ) -> Result<Self, SourceError> {
        let text = |key: &str| -> Result<Option<String>, SourceError> {
            data.get(key)
                .map(|v| {
                    String::from_utf8(v.0.clone())
                        .map(|s| s.trim().to_owned())
                        .map_err(|_| {
                            SourceError::new(
                                FailureKind::InvalidConfig,
                                format!("Secret {name:?}: key {key:?} is not text"),
                            )
                        })
                })
                .transpose()
        };
        let bytes = |key: &str| data.get(key).map(|v| v.0.clone());
        let basic = both(
            name,
            text("username")?,
            text("password")?,
            "username and password",
        )?;
        let client_cert = both(
            name,
            bytes("tls.crt"),
            bytes("tls.key"),
            "tls.crt and tls.key",
        )?;
        let mut headers = Vec::new();
        for key in data.keys().filter(|k| k.starts_with("headers.")) {
            if let Some(v) = text(key)? {
                headers.push((key.trim_start_matches("headers.").to_owned(), v));
            }
        }
        Ok(Self {
            token: text("token")?,
            basic,
            ca: bytes("ca.crt"),
            client_cert,
            headers,
        })
    }

    /// The HTTP client for a source using these credentials: it trusts `ca.crt`, presents the
    /// client certificate, and refuses redirects to another origin (so no credential, custom header
    /// or certificate follows a redirect off the endpoint's own scheme, host and port).
    pub fn client(&self) -> Result<reqwest::Client, SourceError> {
        self.build_client(true)
    }

    /// A client for a host that is not the source's own (a token realm elsewhere): it trusts
    /// `ca.crt` but presents no client certificate.
    pub fn foreign_client(&self) -> Result<reqwest::Client, SourceError> {
        self.build_client(false)
    }

    fn build_client(&self, with_identity: bool) -> Result<reqwest::Client, SourceError> {
        let config = |what: &str, e: reqwest::Error| {
            SourceError::new(FailureKind::InvalidConfig, format!("{what}: {e}"))
        };
        let mut b = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            // reqwest drops only Authorization and cookies on a cross-host redirect; custom headers
            // and the client certificate would follow. So a redirect may not leave the origin.
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                let from = attempt.previous().first().map(origin);
                if attempt.previous().len() > 5 {
                    attempt.error("more than 5 redirects")
                } else if from.is_some_and(|f| f != origin(attempt.url())) {
                    let to = redact(attempt.url().as_str());
                    attempt.error(format!(
                        "redirect to another origin ({to}) refused: credentials stay with their origin"
                    ))
                } else {
                    attempt.follow()
                }
            }))
            .user_agent(concat!("drop/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &self.ca {
            for cert in
                reqwest::Certificate::from_pem_bundle(ca).map_err(|e| config("ca.crt", e))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        if let Some((cert, key)) = self.client_cert.as_ref().filter(|_| with_identity) {
            let mut pem = cert.clone();
            pem.push(b'\n');
            pem.extend_from_slice(key);
            b = b.identity(
                reqwest::Identity::from_pem(&pem).map_err(|e| config("tls.crt/tls.key", e))?,
            );
        }
        b.build().map_err(|e| config("HTTP client", e))
    }

    /// Adds the source's auth and extra headers to a request (`bearer` overrides the Secret's token).
    pub fn authorize(
        &self,
        mut req: reqwest::RequestBuilder,
        bearer: Option<&str>,
    ) -> reqwest::RequestBuilder {
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        match (bearer.or(self.token.as_deref()), &self.basic) {
            (Some(t), _) => req.bearer_auth(t),
            (None, Some((u, p))) => req.basic_auth(u, Some(p)),
            (None, None) => req,
        }
    }
}

/// Scheme, host and port of a URL: where credentials may go.
pub fn origin(url: &reqwest::Url) -> (String, String, Option<u16>) {
    (
        url.scheme().to_owned(),
        url.host_str().unwrap_or_default().to_owned(),
        url.port_or_known_default(),
    )
}

/// Whether `a` and `b` (absolute URLs) share an origin; `false` if either does not parse.
pub fn same_origin(a: &str, b: &str) -> bool {
    match (reqwest::Url::parse(a), reqwest::Url::parse(b)) {
        (Ok(a), Ok(b)) => origin(&a) == origin(&b),
        _ => false,
    }
}

/// A URL as it may be shown (status, Events, logs, metric labels): without userinfo and query.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.to_string()
        }
        Err(_) => url.split('?').next().unwrap_or(url).to_owned(),
    }
}

/// Classifies a transport error (DNS, refused, timeout, TLS) into a reason and a message.
pub fn classify(url: &str, e: &reqwest::Error) -> SourceError {
    let mut parts = vec![e.to_string()];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    let lower = parts.join(": ").to_lowercase();
    let kind = if e.is_timeout() {
        FailureKind::Timeout
    } else if lower.contains("dns error")
        || lower.contains("failed to lookup address")
        || lower.contains("name or service not known")
    {
        FailureKind::DnsError
    } else if lower.contains("connection refused") {
        FailureKind::ConnectionRefused
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")
    {
        FailureKind::TlsError
    } else {
        FailureKind::SourceError
    };
    // The innermost cause says what went wrong; the outer ones repeat the URL.
    let cause = if e.is_timeout() {
        "timed out".to_owned()
    } else {
        parts.last().cloned().unwrap_or_default()
    };
    SourceError::new(kind, format!("{}: {cause}", redact(url)))
}

/// Two Secret keys that only make sense together: both or neither.
fn both<T>(
    secret: &str,
    a: Option<T>,
    b: Option<T>,
    keys: &str,
) -> Result<Option<(T, T)>, SourceError> {
    match (a, b) {
        (Some(a), Some(b)) => Ok(Some((a, b))),
        (None, None) => Ok(None),
        _ => Err(SourceError::new(
            FailureKind::InvalidConfig,
            format!("Secret {secret:?} has only one of {keys}"),
        )),
    }
}

/// Classifies an HTTP error status.
pub fn status_error(url: &str, status: reqwest::StatusCode, body: &[u8]) -> SourceError {
    let kind = match status.as_u16() {
        401 | 403 => FailureKind::Unauthorized,
        404 => FailureKind::RepositoryNotFound,
        _ => FailureKind::SourceError,
    };
    let snippet: String = String::from_utf8_lossy(body).chars().take(200).collect();
    SourceError::new(
        kind,
        format!("{}: HTTP {status}: {}", redact(url), snippet.trim()),
    )
}

/// Decodes a JSON answer from `url`; `what` names what it should have been ("a tag list").
pub fn decode<T: serde::de::DeserializeOwned>(
    url: &str,
    body: &[u8],
    what: &str,
) -> Result<T, SourceError> {
    serde_json::from_slice(body).map_err(|e| {
        SourceError::new(
            FailureKind::InvalidResponse,
            format!("{}: not {what}: {e}", redact(url)),
        )
    })
}

/// Sends a request and reads at most [`MAX_BODY`] bytes of the answer.
pub async fn send(
    url: &str,
    req: reqwest::RequestBuilder,
) -> Result<(reqwest::StatusCode, reqwest::header::HeaderMap, Vec<u8>), SourceError> {
    let mut resp = req.send().await.map_err(|e| classify(url, &e))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| classify(url, &e))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(SourceError::new(
                FailureKind::ResponseTooLarge,
                format!(
                    "{}: response larger than {} MiB",
                    redact(url),
                    MAX_BODY / (1024 * 1024)
                ),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, headers, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn discovery_credentials_read_the_documented_keys_and_never_print_secrets() {
        let c = Credentials::from_secret(
            "s",
            &data(&[
                ("token", "t0p"),
                ("username", "u"),
                ("password", "hunter2"),
                ("headers.X-Org", "drop"),
            ]),
        )
        .unwrap();
        assert_eq!(c.token.as_deref(), Some("t0p"));
        assert_eq!(c.headers, vec![("X-Org".to_owned(), "drop".to_owned())]);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("t0p") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn discovery_credentials_reject_half_pairs() {
        let e = Credentials::from_secret("s", &data(&[("username", "u")])).unwrap_err();
        assert_eq!(e.kind, FailureKind::InvalidConfig);
        assert!(e.message.contains("only one of username and password"));
        let e = Credentials::from_secret("s", &data(&[("tls.crt", "x")])).unwrap_err();
        assert!(e.message.contains("tls.crt and tls.key"));
    }
}
