//! Where images worth caching come from: Prometheus queries and registry tag listings.
//!
//! Each source is queried with bounded requests (a timeout per request, a cap on response size, a cap
//! on pages) and either yields images with a score or fails with a classified reason. [`rank`] merges
//! every source's images, applies the policy's filter, ranks by score and caps the list.

pub mod client;
pub mod prometheus;
pub mod registry;

use crate::api::DiscoveredImage;
use std::collections::BTreeMap;

/// Why a source failed, as a condition reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The host name does not resolve.
    DnsError,
    /// Nothing listens at the address.
    ConnectionRefused,
    /// The repository (or API path) does not exist.
    RepositoryNotFound,
    /// The credentials were refused (401/403).
    Unauthorized,
    /// The source did not answer in time.
    Timeout,
    /// The TLS handshake failed (unknown CA, bad client certificate, …).
    TlsError,
    /// The answer was larger than Drop reads.
    ResponseTooLarge,
    /// The answer was not what the API promises.
    InvalidResponse,
    /// The configuration cannot work (bad regex, template, Secret).
    InvalidConfig,
    /// Anything else.
    SourceError,
}

impl FailureKind {
    /// The condition reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::DnsError => "DNSError",
            Self::ConnectionRefused => "ConnectionRefused",
            Self::RepositoryNotFound => "NotFound",
            Self::Unauthorized => "Unauthorized",
            Self::Timeout => "Timeout",
            Self::TlsError => "TLSError",
            Self::ResponseTooLarge => "ResponseTooLarge",
            Self::InvalidResponse => "InvalidResponse",
            Self::InvalidConfig => "InvalidConfig",
            Self::SourceError => "SourceError",
        }
    }
}

/// A source's failure: its kind and a message for humans.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    /// Classification.
    pub kind: FailureKind,
    /// What happened, naming the address.
    pub message: String,
}

impl SourceError {
    /// A failure of `kind`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// What one source found: image reference → score.
pub type Found = BTreeMap<String, i64>;

/// Merges the sources' images (an image found twice keeps its best score and that source), keeps those
/// matching `filter`, ranks by score (highest first, then by reference), and keeps the first `max`.
pub fn rank(
    found: &[(String, Found)],
    filter: Option<&regex::Regex>,
    max: usize,
) -> Vec<DiscoveredImage> {
    let mut best: BTreeMap<&str, (i64, &str)> = BTreeMap::new();
    for (source, images) in found {
        for (image, score) in images {
            if filter.is_some_and(|f| !f.is_match(image)) {
                continue;
            }
            let entry = best.entry(image).or_insert((*score, source));
            if *score > entry.0 {
                *entry = (*score, source);
            }
        }
    }
    let mut ranked: Vec<DiscoveredImage> = best
        .into_iter()
        .map(|(image, (score, source))| DiscoveredImage {
            image: image.to_owned(),
            score,
            source: source.to_owned(),
        })
        .collect();
    ranked.sort_by(|a, b| b.score.cmp(&a.score).then_with(|| a.image.cmp(&b.image)));
    ranked.truncate(max);
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(pairs: &[(&str, i64)]) -> Found {
        pairs.iter().map(|(i, s)| (i.to_string(), *s)).collect()
    }

    #[test]
    fn discovery_rank_merges_filters_orders_and_caps() {
        let sources = vec![
            (
                "prometheus".to_owned(),
                found(&[("a:1", 5), ("b:1", 9), ("x.io/c:1", 9)]),
            ),
            ("registry".to_owned(), found(&[("a:1", 7), ("d:1", 1)])),
        ];
        let all = rank(&sources, None, 10);
        let order: Vec<(&str, i64, &str)> = all
            .iter()
            .map(|d| (d.image.as_str(), d.score, d.source.as_str()))
            .collect();
        assert_eq!(
            order,
            vec![
                ("b:1", 9, "prometheus"),
                ("x.io/c:1", 9, "prometheus"),
                ("a:1", 7, "registry"),
                ("d:1", 1, "registry")
            ]
        );
        assert_eq!(
            rank(&sources, None, 2).len(),
            2,
            "capped at maxImages, lowest scores dropped"
        );
        let only_x = regex::Regex::new("^x\\.io/").unwrap();
        assert_eq!(
            rank(&sources, Some(&only_x), 10)
                .iter()
                .map(|d| d.image.as_str())
                .collect::<Vec<_>>(),
            vec!["x.io/c:1"]
        );
    }

    #[test]
    fn discovery_rank_is_deterministic_on_ties() {
        let a = vec![("s".to_owned(), found(&[("z:1", 1), ("a:1", 1), ("m:1", 1)]))];
        let ranked: Vec<String> = rank(&a, None, 10).into_iter().map(|d| d.image).collect();
        assert_eq!(ranked, vec!["a:1", "m:1", "z:1"]);
    }
}
