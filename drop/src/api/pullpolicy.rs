//! PullPolicy: how fast pulls may go. Configuration only; it has no status.

use super::common::*;
use k8s_openapi::api::core::v1::Toleration;
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use kube_plan::PrinterColumns;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Built-in pace for images without a PullPolicy, and each field's default.
pub mod defaults {
    use std::time::Duration;
    /// Pulls in flight at once under one policy.
    pub const MAX_CONCURRENT_NODES: i32 = 1;
    /// Gap between two pull starts under one policy.
    pub const MIN_DELAY_BETWEEN_PULLS: Duration = Duration::from_secs(10);
    /// First retry delay after a failed pull.
    pub const BACKOFF_INITIAL: Duration = Duration::from_secs(30);
    /// Longest retry delay.
    pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
}

/// Paces the pulls of every image that references it: how many nodes pull at once, how far apart
/// pulls start, how failures are retried, and how often cached images are pulled again.
#[derive(
    CustomResource, KubeSchema, PrinterColumns, Serialize, Deserialize, Clone, Debug, PartialEq,
)]
#[kube(
    group = "drop.corewire.io",
    version = "v1alpha1",
    kind = "PullPolicy",
    category = "drop",
    derive = "PartialEq",
    derive = "Default",
    doc = "PullPolicy paces the image pulls of the CachedImages that reference it.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PullPolicySpec {
    /// Most pulls in flight at once, over all images using this policy. Default 1.
    #[column(name = "MaxNodes")]
    #[serde(default = "default_max_concurrent")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxConcurrentNodes must be at least 1"))]
    pub max_concurrent_nodes: i32,

    /// Least time between two pull starts under this policy (start to start). Default `10s`.
    #[column(name = "MinDelay", type_ = "string")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "10s"))]
    #[schemars(length(max = 64))]
    #[x_kube(
        validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE),
        validation = Rule::new(DURATION_MAX_RULE).message(DURATION_MAX_MESSAGE)
    )]
    pub min_delay_between_pulls: Option<Duration>,

    /// Retry delays after failed pulls. Default: 30 s, doubling up to 5 min.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_backoff: Option<BackoffConfig>,

    /// Pull cached images again this often, to pick up a moved tag. Unset or `0s`: never.
    #[column(name = "RepullInterval", type_ = "string")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(
        validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE),
        validation = Rule::new(DURATION_MAX_RULE).message(DURATION_MAX_MESSAGE),
        validation = Rule::new(REPULL_INTERVAL_RULE).message("repullInterval must be 0s (never) or at least 1m: each refresh pulls on every node")
    )]
    pub repull_interval: Option<Duration>,

    /// Limits the images using this policy to nodes carrying all these labels (in addition to each
    /// image's own selector).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Taints the pull Pods of images using this policy tolerate (added to each image's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

fn default_max_concurrent() -> i32 {
    defaults::MAX_CONCURRENT_NODES
}

/// The spec the API server produces from `spec: {}` (its defaults), so Rust code and the cluster agree.
impl Default for PullPolicySpec {
    fn default() -> Self {
        Self {
            max_concurrent_nodes: defaults::MAX_CONCURRENT_NODES,
            min_delay_between_pulls: None,
            failure_backoff: None,
            repull_interval: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
        }
    }
}

/// Exponential retry delays after failed pulls.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.initial) || !has(self.max) || duration(self.initial) <= duration(self.max)")
    .message("failureBackoff.initial must not exceed failureBackoff.max"))]
pub struct BackoffConfig {
    /// Delay before the first retry. Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "30s"))]
    #[schemars(length(max = 64))]
    #[x_kube(
        validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE),
        validation = Rule::new(DURATION_MAX_RULE).message(DURATION_MAX_MESSAGE)
    )]
    pub initial: Option<Duration>,
    /// Longest delay; each failure doubles the delay up to this. Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "5m"))]
    #[schemars(length(max = 64))]
    #[x_kube(
        validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE),
        validation = Rule::new(DURATION_MAX_RULE).message(DURATION_MAX_MESSAGE)
    )]
    pub max: Option<Duration>,
}
