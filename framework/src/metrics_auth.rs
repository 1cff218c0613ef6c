//! `/metrics` for authorised callers only: served over TLS, each caller authenticated with a
//! TokenReview and authorised with a SubjectAccessReview for `get` on the non-resource URL
//! `/metrics`, as the API server itself guards its own `/metrics`.
//!
//! A scraper (Prometheus, an agent) sends its ServiceAccount token as `Authorization: Bearer …`; it
//! is allowed when RBAC grants it `get` on `nonResourceURLs: ["/metrics"]`. The operator's own
//! identity needs `create` on `tokenreviews` and `subjectaccessreviews`. The token is passed to the
//! API server and nowhere else: never logged, never kept.

use http::HeaderValue;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Client;
use kube::api::{Api, PostParams};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;
use std::sync::Arc;

/// Where the TLS certificate of the secure `/metrics` endpoint comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Certificate {
    /// A self-signed certificate made at start-up (scrapers skip verification, or pin nothing).
    SelfSigned,
    /// A PEM certificate chain and private key, such as `tls.crt` and `tls.key` of a Secret that
    /// cert-manager fills. Read once at start-up.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
}

impl Certificate {
    /// `tls.crt` and `tls.key` in `dir` (the layout of a mounted `kubernetes.io/tls` Secret).
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self::Files {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        }
    }
}

/// Errors setting up TLS for `/metrics`.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file held no usable PEM certificate or key.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The self-signed certificate could not be made.
    #[error("making a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The certificate and key do not make a TLS server configuration (for example, they do not
    /// belong together).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn read(path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.clone(),
        source,
    })
}

/// The TLS server configuration for `certificate` (HTTP/1.1 only).
pub(crate) fn server_config(
    certificate: &Certificate,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (chain, key) = match certificate {
        Certificate::SelfSigned => {
            let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
            let key = PrivateKeyDer::try_from(made.signing_key.serialize_der()).map_err(|e| {
                TlsError::Pem {
                    path: PathBuf::from("<self-signed>"),
                    message: e.to_owned(),
                }
            })?;
            (vec![made.cert.der().clone()], key)
        }
        Certificate::Files { cert, key } => {
            let pem = read(cert)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Pem {
                    path: cert.clone(),
                    message: e.to_string(),
                })?;
            if chain.is_empty() {
                return Err(TlsError::Pem {
                    path: cert.clone(),
                    message: "no PEM certificate in it".into(),
                });
            }
            let key_pem = read(key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
                path: key.clone(),
                message: format!("no PEM private key in it ({e})"),
            })?;
            (chain, key_der)
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// What a caller of `/metrics` may do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Authenticated and authorised.
    Allowed,
    /// No token, or one the API server did not accept: 401.
    Unauthenticated(String),
    /// A known caller without the right: 403.
    Forbidden(String),
    /// A review could not be made: 500 (the caller may be allowed; try again).
    Failed(String),
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub(crate) fn bearer(header: Option<&HeaderValue>) -> Option<&str> {
    let value = header?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whether the caller with `authorization` may `get` the non-resource URL `path`.
pub(crate) async fn authorize(
    client: &Client,
    authorization: Option<&HeaderValue>,
    path: &str,
) -> Verdict {
    let Some(token) = bearer(authorization) else {
        return Verdict::Unauthenticated("a bearer token is required".into());
    };
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_owned(),
            audiences: None,
        },
        ..TokenReview::default()
    };
    let reviewed = match Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
    {
        Ok(r) => r,
        Err(e) => return Verdict::Failed(format!("token review: {}", crate::describe(&e))),
    };
    let status = reviewed.status.unwrap_or_default();
    let user = match (status.authenticated, status.user) {
        (Some(true), Some(user)) => user,
        _ => {
            return Verdict::Unauthenticated(
                status
                    .error
                    .unwrap_or_else(|| "the token was not accepted".into()),
            );
        }
    };
    let username = user.username.clone().unwrap_or_default();
    let access = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username,
            uid: user.uid,
            groups: user.groups,
            extra: user.extra,
            non_resource_attributes: Some(NonResourceAttributes {
                path: Some(path.to_owned()),
                verb: Some("get".into()),
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let decided = match Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &access)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return Verdict::Failed(format!("access review: {}", crate::describe(&e)));
        }
    };
    match decided.status {
        Some(s) if s.allowed => Verdict::Allowed,
        Some(s) => Verdict::Forbidden(format!(
            "{username} may not get {path}{}",
            s.reason
                .filter(|r| !r.is_empty())
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )),
        None => Verdict::Forbidden(format!("{username} may not get {path}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).unwrap()
    }

    #[test]
    fn metrics_secure_bearer_token_is_read_from_the_authorization_header() {
        assert_eq!(bearer(Some(&header("Bearer abc.def"))), Some("abc.def"));
        assert_eq!(bearer(Some(&header("bearer  abc"))), Some("abc"));
        assert_eq!(bearer(Some(&header("Basic dXNlcjpwdw=="))), None);
        assert_eq!(bearer(Some(&header("Bearer "))), None);
        assert_eq!(bearer(Some(&header("Bearer"))), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn metrics_secure_self_signed_certificate_makes_a_server_config() {
        assert!(server_config(&Certificate::SelfSigned).is_ok());
    }

    #[test]
    fn metrics_secure_certificate_files_are_read_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(dir.join("tls.crt"), made.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), made.signing_key.serialize_pem()).unwrap();
        assert!(server_config(&Certificate::in_dir(dir)).is_ok());

        // A key that does not belong to the certificate is refused at start-up.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.join("tls.key"), other.serialize_pem()).unwrap();
        let err = server_config(&Certificate::in_dir(dir)).unwrap_err();
        assert!(matches!(err, TlsError::Config(_)), "{err}");

        std::fs::write(dir.join("tls.crt"), "not a certificate").unwrap();
        let err = server_config(&Certificate::in_dir(dir)).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");

        let err = server_config(&Certificate::in_dir(dir.join("missing"))).unwrap_err();
        assert!(err.to_string().contains("missing/tls.crt"), "{err}");
    }
}
