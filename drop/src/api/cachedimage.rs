//! CachedImage: one image, kept cached on every matching node.

use super::common::*;
use super::node_names::NodeNames;
use k8s_openapi::api::core::v1::{LocalObjectReference, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use kube_plan::{PrinterColumns, Status};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Keeps one container image cached on the nodes that match, by pulling it through the kubelet with a
/// short-lived Pod per node, at the pace its PullPolicy allows.
#[derive(
    CustomResource,
    KubeSchema,
    PrinterColumns,
    Serialize,
    Deserialize,
    Clone,
    Debug,
    Default,
    PartialEq,
)]
#[kube(
    group = "drop.corewire.io",
    version = "v1alpha1",
    kind = "CachedImage",
    category = "drop",
    status = "CachedImageStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "CachedImage keeps one container image cached on the nodes that match its selector.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Set",
        type_ = "string",
        json_path = ".metadata.labels.drop\\.corewire\\.io/imageset",
        description = "Parent CachedImageSet",
        priority = 1
    )
)]
#[x_kube(validation = Rule::new(TAG_XOR_DIGEST_RULE).message(TAG_XOR_DIGEST_MESSAGE))]
#[serde(rename_all = "camelCase")]
pub struct CachedImageSpec {
    /// Repository of the image, without tag or digest: `docker.io/library/nginx`,
    /// `registry.example.com/team/app`.
    #[column]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new(IMAGE_RULE).message(IMAGE_MESSAGE))]
    #[x_kube(validation = Rule::new("self != ''").message("image must not be empty"))]
    pub image: String,

    /// Tag to cache, such as `1.25-alpine`. Leave empty to use `digest` instead; with neither, `latest`.
    #[column]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    #[x_kube(validation = Rule::new(TAG_RULE).message(TAG_MESSAGE))]
    pub tag: Option<String>,

    /// Digest to cache (`sha256:…`), for an exact, immutable image. Excludes `tag`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 71))]
    #[x_kube(validation = Rule::new(DIGEST_RULE).message(DIGEST_MESSAGE))]
    pub digest: Option<String>,

    /// When the kubelet asks the registry: `Always` (the default; follows a moved tag), `IfNotPresent`
    /// (keeps what the node has) or `Never` (only for images put on nodes some other way).
    #[serde(default)]
    pub image_pull_policy: ImagePullPolicy,

    /// Secrets with registry credentials (type `kubernetes.io/dockerconfigjson`), in the namespace where
    /// Drop runs its pull Pods (`drop-system` unless the operator runs with another `--pod-namespace`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Only nodes carrying every one of these labels get the image. Empty: every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Taints the pull Pods tolerate; a node whose taints are not all tolerated is skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Pull order across images: lower first, equal values by name. Unset counts as 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,

    /// The PullPolicy that paces this image's pulls. Unset: the built-in pace (one node at a time, 10 s
    /// apart, failures retried after 30 s doubling up to 5 min).
    #[column(name = "Policy", path = ".name", type_ = "string", priority = 1)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_ref: Option<PolicyReference>,
}

impl CachedImageSpec {
    /// The reference the pull Pods run: `image@digest`, `image:tag`, or `image:latest`.
    pub fn reference(&self) -> String {
        image_reference(&self.image, self.tag.as_deref(), self.digest.as_deref())
    }
}

/// Summary state of a CachedImage.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum CachedImagePhase {
    /// Nothing pulled yet, or no node matches.
    #[default]
    Pending,
    /// Pulls are under way or waiting for their turn.
    Pulling,
    /// Cached on every targeted node.
    Ready,
    /// Some nodes failed to pull and are retried with backoff.
    Degraded,
}

/// A node whose last pull failed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NodeFailure {
    /// Node name.
    pub node: String,
    /// The kubelet's reason, such as `ErrImagePull` or `ImagePullBackOff`.
    pub reason: String,
    /// The kubelet's message.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Where the caching of an image stands.
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
pub struct CachedImageStatus {
    /// The generation of the spec this status describes.
    #[status(observed_generation)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Summary: Pending, Pulling, Ready or Degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<CachedImagePhase>,

    /// `nodesReady/nodesTargeted`, for display.
    #[column]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,

    /// Digest the container runtime reported for the pulled image.
    #[column(name = "Digest", priority = 1)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_digest: Option<String>,

    /// Nodes that should hold the image.
    #[serde(default)]
    pub nodes_targeted: i32,

    /// Targeted nodes that hold it.
    #[serde(default)]
    pub nodes_ready: i32,

    /// Targeted nodes pulling it now.
    #[serde(default)]
    pub nodes_pulling: i32,

    /// Targeted nodes whose last pull failed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub nodes_failed: i32,

    /// Names of the nodes that hold the image, sorted.
    #[serde(default, skip_serializing_if = "NodeNames::is_empty")]
    pub cached_nodes: NodeNames,

    /// The first failing nodes (at most 10, sorted by name) with the kubelet's reason; `nodesFailed`
    /// has the full count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_nodes: Vec<NodeFailure>,

    /// Failed pulls in a row (across nodes) since the last success.
    #[serde(default)]
    pub consecutive_failures: i32,

    /// When a pull last succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pulled_at: Option<Time>,

    /// When a pull was last started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempted_at: Option<Time>,

    /// `Ready` (cached everywhere) and `PullProgress` (what the pulls are doing).
    #[status(conditions)]
    #[column(name = "Status", condition = "Ready", field = "reason")]
    #[column(name = "Message", condition = "Ready", field = "message", priority = 1)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}
