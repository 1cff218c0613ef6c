//! DiscoveryPolicy: finds the images worth caching, in Prometheus or in a registry's tags.

use super::common::*;
use k8s_openapi::api::core::v1::LocalObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use kube_plan::{PrinterColumns, Status};
use serde::{Deserialize, Serialize};

/// Default `syncInterval`.
pub const DEFAULT_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30 * 60);
/// Default `maxImages`.
pub const DEFAULT_MAX_IMAGES: i32 = 50;
/// Upper bound of `maxImages` (also enforced at admission).
pub const MAX_MAX_IMAGES: i32 = 1000;
/// Default Prometheus range-query step.
pub const DEFAULT_STEP: &str = "5m";

/// Queries its sources every `syncInterval`, merges and ranks what they report, and publishes the best
/// `maxImages` images in its status, where CachedImageSets pick them up.
#[derive(
    CustomResource, KubeSchema, PrinterColumns, Serialize, Deserialize, Clone, Debug, PartialEq,
)]
#[kube(
    group = "drop.corewire.io",
    version = "v1alpha1",
    kind = "DiscoveryPolicy",
    category = "drop",
    status = "DiscoveryPolicyStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "DiscoveryPolicy finds images worth caching in Prometheus metrics or registry tags.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryPolicySpec {
    /// Where to look; at least one. All sources are merged and ranked together.
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("size(self) >= 1").message("sources needs at least one source"))]
    pub sources: Vec<DiscoverySource>,

    /// Keep only images whose reference matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new(REGEX_RULE).message(REGEX_MESSAGE))]
    pub image_filter: Option<String>,

    /// How often to query the sources again. Default `30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "30m"))]
    #[schemars(length(max = 64))]
    #[x_kube(
        validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE),
        validation = Rule::new(DURATION_MAX_RULE).message(DURATION_MAX_MESSAGE),
        validation = Rule::new(INTERVAL_MIN_RULE).message("syncInterval must be at least 10s: every sync queries all sources")
    )]
    pub sync_interval: Option<Duration>,

    /// Most images to publish; the lowest-scoring are dropped beyond it. Default 50, at most
    /// [`MAX_MAX_IMAGES`] (the list lives in the status, which must stay far below the API server's
    /// object size limit).
    #[serde(default = "default_max_images")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("maxImages must be between 1 and 1000"))]
    pub max_images: i32,
}

fn default_max_images() -> i32 {
    DEFAULT_MAX_IMAGES
}

/// The spec the API server produces from a spec without optional fields (its defaults).
impl Default for DiscoveryPolicySpec {
    fn default() -> Self {
        Self {
            sources: Vec::new(),
            image_filter: None,
            sync_interval: None,
            max_images: DEFAULT_MAX_IMAGES,
        }
    }
}

impl DiscoveryPolicySpec {
    /// `syncInterval`, or its default.
    pub fn sync_interval(&self) -> std::time::Duration {
        self.sync_interval.map_or(DEFAULT_SYNC_INTERVAL, Into::into)
    }
}

/// Kind of a discovery source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SourceType {
    /// A PromQL query whose results carry an `image` label.
    Prometheus,
    /// Tags listed from OCI registry repositories.
    Registry,
}

/// One place to discover images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new(
    "self.type == 'prometheus' ? (has(self.prometheus) && !has(self.registry)) : (has(self.registry) && !has(self.prometheus))"
).message("a source of type prometheus needs the prometheus block, one of type registry the registry block, and no other"))]
#[serde(rename_all = "camelCase")]
pub struct DiscoverySource {
    /// `prometheus` or `registry`; the block of the same name configures it.
    #[serde(rename = "type")]
    pub type_: SourceType,
    /// Settings when `type` is `prometheus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSource>,
    /// Settings when `type` is `registry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistrySource>,
    /// Secret (in the pull-Pod namespace) with credentials and TLS material. Keys: `token`,
    /// `username`, `password`, `ca.crt`, `tls.crt`, `tls.key`, and `headers.<name>` for extra headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalObjectReference>,
}

/// A Prometheus-compatible query API (Prometheus, Thanos, Mimir, VictoriaMetrics).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusSource {
    /// Base URL of the API, including any path prefix: `http://prometheus.monitoring.svc:9090`.
    #[schemars(length(max = 2048))]
    #[x_kube(
        validation = Rule::new("self.matches('^https?://[^/]+')").message("endpoint must be an http:// or https:// URL"),
        validation = Rule::new(NO_USERINFO_RULE).message("endpoint must not carry credentials (user:password@): put them in the Secret named by secretRef")
    )]
    pub endpoint: String,
    /// PromQL whose results carry an `image` label (the image reference); the value is the score,
    /// higher meaning more worth caching.
    #[schemars(length(max = 16384))]
    #[x_kube(validation = Rule::new("self != ''").message("query must not be empty"))]
    pub query: String,
    /// With a lookback, a range query over the last `lookback` whose values are summed per image;
    /// without, an instant query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(
        validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE),
        validation = Rule::new(DURATION_MAX_RULE).message(DURATION_MAX_MESSAGE)
    )]
    pub lookback: Option<Duration>,
    /// Resolution of the range query. Default `5m`.
    #[serde(default = "default_step")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^(([0-9]+(ms|s|m|h|d|w|y))+|[0-9]+([.][0-9]+)?)$')")
        .message("step must be a Prometheus duration such as 30s, 5m or 1h, or a number of seconds"))]
    pub step: String,
}

fn default_step() -> String {
    DEFAULT_STEP.to_owned()
}

impl Default for PrometheusSource {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            query: String::new(),
            lookback: None,
            step: default_step(),
        }
    }
}

/// Tags listed from repositories of an OCI registry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistrySource {
    /// Base URL of the registry, without repository: `https://ghcr.io`.
    #[schemars(length(max = 2048))]
    #[x_kube(
        validation = Rule::new("self.matches('^https?://[^/]+/?$')")
            .message("url must be the registry's base URL, like https://registry.example.com (no repository path)"),
        validation = Rule::new(NO_USERINFO_RULE).message("url must not carry credentials (user:password@): put them in the Secret named by secretRef")
    )]
    pub url: String,
    /// Repositories whose tags to list: `team/app`.
    #[schemars(length(max = 100), inner(length(max = 255)))]
    #[x_kube(validation = Rule::new("size(self) >= 1").message("repositories needs at least one repository"))]
    pub repositories: Vec<String>,
    /// Keep only tags matching this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new(REGEX_RULE).message(REGEX_MESSAGE))]
    pub tag_filter: Option<String>,
    /// Keep the last N matching tags of each repository, in the registry's order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("topX must be at least 1"))]
    pub top_x: Option<i32>,
    /// Go-template-style pattern of the image reference, with `{{.Registry}}` (host, no scheme),
    /// `{{.Repository}}` and `{{.Tag}}`. Default `{{.Registry}}/{{.Repository}}:{{.Tag}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new("self.contains('{{.Tag}}')").message("imageTemplate must use {{.Tag}}"))]
    pub image_template: Option<String>,
}

/// One discovered image.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct DiscoveredImage {
    /// Full image reference.
    pub image: String,
    /// Rank: higher is more worth caching.
    pub score: i64,
    /// The source that reported it.
    pub source: String,
}

/// What the last syncs found.
#[derive(
    Status,
    PrinterColumns,
    Serialize,
    Deserialize,
    Clone,
    Debug,
    Default,
    PartialEq,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryPolicyStatus {
    /// The generation of the spec this status describes.
    #[status(observed_generation)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the sources were last queried successfully.
    #[column(name = "LastSync")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// The ranked images, best first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub discovered_images: Vec<DiscoveredImage>,
    /// Number of discovered images.
    #[column(name = "Images")]
    #[serde(default)]
    pub image_count: i32,
    /// Number of configured sources.
    #[column(name = "Sources")]
    #[serde(default)]
    pub source_count: i32,
    /// `Ready` with the outcome of the last sync.
    #[status(conditions)]
    #[column(name = "Status", condition = "Ready", field = "reason")]
    #[column(name = "Message", condition = "Ready", field = "message", priority = 1)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
