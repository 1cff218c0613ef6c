//! CachedImageSet: a group of images, listed statically and/or discovered, each kept cached by a child
//! CachedImage.

use super::common::*;
use k8s_openapi::api::core::v1::{LocalObjectReference, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use kube_plan::{PrinterColumns, Status};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Keeps a group of images cached: one child CachedImage per image of the static list and of the
/// referenced DiscoveryPolicy's discovered list. The pull settings given here apply to every child.
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
    kind = "CachedImageSet",
    category = "drop",
    status = "CachedImageSetStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "CachedImageSet keeps a group of images cached, from a static list and/or a DiscoveryPolicy.",
    validation = Rule::new("size(self.metadata.name) <= 63").message(
        "a CachedImageSet name is at most 63 characters: it is the value of the drop.corewire.io/imageset label on every child"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct CachedImageSetSpec {
    /// The PullPolicy every child uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_ref: Option<PolicyReference>,

    /// A DiscoveryPolicy whose discovered images join the static list.
    #[column(name = "Source", path = ".name", type_ = "string")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery_policy_ref: Option<DiscoveryPolicyReference>,

    /// Pull policy of every child (see CachedImage). Default `Always`.
    #[serde(default)]
    pub image_pull_policy: ImagePullPolicy,

    /// Registry credentials for every child, in the pull-Pod namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Node selector of every child.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of every child.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Images to cache, each becoming one child CachedImage (at most 500).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 500))]
    pub images: Vec<ImageEntry>,
}

/// One image of a set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new(TAG_XOR_DIGEST_RULE).message(TAG_XOR_DIGEST_MESSAGE))]
#[serde(rename_all = "camelCase")]
pub struct ImageEntry {
    /// Repository, without tag or digest.
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new(IMAGE_RULE).message(IMAGE_MESSAGE))]
    #[x_kube(validation = Rule::new("self != ''").message("image must not be empty"))]
    pub image: String,
    /// Tag; excludes `digest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    #[x_kube(validation = Rule::new(TAG_RULE).message(TAG_MESSAGE))]
    pub tag: Option<String>,
    /// Digest (`sha256:…`); excludes `tag`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 71))]
    #[x_kube(validation = Rule::new(DIGEST_RULE).message(DIGEST_MESSAGE))]
    pub digest: Option<String>,
}

impl ImageEntry {
    /// The reference: `image@digest`, `image:tag`, or `image:latest`.
    pub fn reference(&self) -> String {
        image_reference(&self.image, self.tag.as_deref(), self.digest.as_deref())
    }
}

/// Summary state of a set.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum CachedImageSetPhase {
    /// Children are still being cached.
    #[default]
    Pending,
    /// Every child is cached.
    Ready,
    /// At least one child is failing.
    Degraded,
}

/// Where the set stands.
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
pub struct CachedImageSetStatus {
    /// The generation of the spec this status describes.
    #[status(observed_generation)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Summary: Pending, Ready or Degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<CachedImageSetPhase>,
    /// Child CachedImages.
    #[column(name = "Managed")]
    #[serde(default)]
    pub images_managed: i32,
    /// Children that are Ready.
    #[column(name = "Ready", type_ = "string")]
    #[serde(default)]
    pub images_ready: i32,
    /// `Ready`, with `Progressing` or `Degraded` reasons while not all children are cached.
    #[status(conditions)]
    #[column(name = "Status", condition = "Ready", field = "reason")]
    #[column(name = "Message", condition = "Ready", field = "message", priority = 1)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
