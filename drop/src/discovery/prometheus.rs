//! Prometheus-compatible query APIs (Prometheus, Thanos, Mimir, VictoriaMetrics).
//!
//! Without `lookback`: an instant query (`/api/v1/query`), score = the sample value. With it: a range
//! query (`/api/v1/query_range`, from now − lookback to now, at `step`), score = the sum of the values.
//! Every result must carry an `image` label (its value is the image reference); results without one
//! are skipped. The endpoint's path is kept (a Prometheus behind a proxy at `/prometheus` works).

use super::client::{self, Credentials};
use super::{FailureKind, Found, SourceError};
use crate::api::PrometheusSource;
use jiff::Timestamp;
use serde::Deserialize;

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<Series>,
}

#[derive(Deserialize)]
struct Series {
    metric: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    value: Option<(f64, String)>,
    #[serde(default)]
    values: Vec<(f64, String)>,
}

/// Queries one Prometheus source.
pub async fn query(
    src: &PrometheusSource,
    creds: &Credentials,
    now: Timestamp,
) -> Result<Found, SourceError> {
    let base = src.endpoint.trim_end_matches('/');
    let http = creds.client()?;
    let (url, params): (String, Vec<(&str, String)>) = match src.lookback {
        None => (
            format!("{base}/api/v1/query"),
            vec![
                ("query", src.query.clone()),
                ("time", now.as_second().to_string()),
            ],
        ),
        Some(lookback) => {
            let secs = std::time::Duration::from(lookback).as_secs() as i64;
            (
                format!("{base}/api/v1/query_range"),
                vec![
                    ("query", src.query.clone()),
                    ("start", (now.as_second() - secs).to_string()),
                    ("end", now.as_second().to_string()),
                    ("step", src.step.clone()),
                ],
            )
        }
    };
    let req = creds.authorize(http.get(&url).query(&params), None);
    let (status, _, body) = client::send(&url, req).await?;
    if !status.is_success() {
        return Err(client::status_error(&url, status, &body));
    }
    scores(&url, &body)
}

/// The scores a Prometheus API answer (`body`, from `url`) gives each image: the sum of each
/// series' samples, rounded, per `image` label. Anything the answer holds is handled: a malformed
/// answer is an error, a non-numeric or infinite sample is skipped, sums saturate.
pub fn scores(url: &str, body: &[u8]) -> Result<Found, SourceError> {
    let answer: Answer = client::decode(url, body, "a Prometheus API answer")?;
    if answer.status != "success" {
        return Err(SourceError::new(
            FailureKind::SourceError,
            format!(
                "{}: query failed: {}",
                client::redact(url),
                answer.error.unwrap_or_default()
            ),
        ));
    }
    let data = answer.data.ok_or_else(|| {
        SourceError::new(
            FailureKind::InvalidResponse,
            format!("{}: answer has no data", client::redact(url)),
        )
    })?;
    if !matches!(data.result_type.as_str(), "vector" | "matrix") {
        return Err(SourceError::new(
            FailureKind::InvalidConfig,
            format!(
                "{}: the query returns a {}, not a vector of series with an image label",
                client::redact(url),
                data.result_type
            ),
        ));
    }
    let mut found = Found::new();
    for s in data.result {
        let Some(image) = s.metric.get("image").filter(|i| !i.is_empty()) else {
            continue;
        };
        let samples = s.value.into_iter().chain(s.values);
        let sum: f64 = samples
            .filter_map(|(_, v)| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .sum();
        let score = found.entry(image.clone()).or_default();
        *score = score.saturating_add(sum.round() as i64);
    }
    Ok(found)
}
