//! The pull Pod: how one image gets onto one node, and how to read the outcome. Pure: no client, no
//! clock.
//!
//! A pull Pod is pinned to its node (`spec.nodeName`), never restarted, and runs one container whose
//! image is the image to cache. The kubelet pulls the image before it can start the container, so the
//! pull has happened as soon as the container has an `imageID`: the container's own fate is beside the
//! point. Its command is a path that no image contains, so nothing from the cached image is ever
//! executed, and images without a shell or any binary (distroless, scratch) are cached like any other.
//! A real kubelet then reports the failure (containerd fails the container when it starts it, with
//! an image ID; CRI-O when it creates it, without one); [`outcome`] reads the pull, not the exit.
//!
//! The Pod meets the Pod Security "restricted" profile: non-root user, no privilege escalation, every
//! capability dropped, the runtime's default seccomp profile, no service-account token, no host
//! namespaces, and no volumes.

use crate::api::{CachedImage, PullPolicySpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerState, ContainerStatus, Pod, PodSecurityContext, PodSpec,
    PodStatus, ResourceRequirements, SeccompProfile, SecurityContext, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Name of the pull container.
pub const CONTAINER: &str = "pull";
/// The container's command: a path that exists in no image, so no image code runs.
pub const COMMAND: &str = "/.drop-pull-only/never-run";
/// Label on every pull Pod.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "drop");
/// Label naming the CachedImage (hashed when longer than a label value may be).
pub const IMAGE_LABEL: &str = "drop.corewire.io/cachedimage";
/// Label naming the node (hashed when longer than a label value may be).
pub const NODE_LABEL: &str = "drop.corewire.io/node";
/// Annotation with the CachedImage's full name.
pub const IMAGE_ANNOTATION: &str = "drop.corewire.io/cachedimage";
/// Annotation with the node's full name.
pub const NODE_ANNOTATION: &str = "drop.corewire.io/node";
/// Annotation with the image reference pulled.
pub const REFERENCE_ANNOTATION: &str = "drop.corewire.io/reference";
/// Annotation with the pull's attempt number for this image and node.
pub const ATTEMPT_ANNOTATION: &str = "drop.corewire.io/attempt";
/// Annotation with the PullPolicy pacing the pull (empty for the built-in pace).
pub const POLICY_ANNOTATION: &str = "drop.corewire.io/policy";
/// UID and GID the container runs as (`nobody`).
pub const RUN_AS: i64 = 65534;

/// Everything that determines one pull Pod.
#[derive(Clone, Copy, Debug)]
pub struct PullPod<'a> {
    /// The image to cache (its spec, name and UID).
    pub image: &'a CachedImage,
    /// The node to cache it on.
    pub node: &'a str,
    /// Namespace of the pull Pods.
    pub namespace: &'a str,
    /// The image's PullPolicy, if it has one: its tolerations are added.
    pub policy: Option<&'a PullPolicySpec>,
    /// Which pull of this image on this node this is (1 for the first); part of the Pod's name, so a
    /// retry never collides with the Pod of the previous attempt.
    pub attempt: u32,
    /// Tolerations the operator gives every pull Pod (the warm-up taint's), added after the image's
    /// and the policy's.
    pub tolerations: &'a [Toleration],
}

/// Why a Pod could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    /// The CachedImage was not read from the API server (no name or UID), so it cannot own the Pod.
    #[error("CachedImage has no {0}; it must come from the API server")]
    Missing(&'static str),
}

/// Builds the pull Pod.
pub fn build(p: &PullPod<'_>) -> Result<Pod, BuildError> {
    let image_name = p
        .image
        .metadata
        .name
        .clone()
        .ok_or(BuildError::Missing("name"))?;
    let uid = p
        .image
        .metadata
        .uid
        .clone()
        .ok_or(BuildError::Missing("uid"))?;
    let spec = &p.image.spec;
    let reference = spec.reference();
    let owner = OwnerReference {
        api_version: CachedImage::api_version(&()).into_owned(),
        kind: CachedImage::kind(&()).into_owned(),
        name: image_name.clone(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let mut tolerations: Vec<Toleration> = spec.tolerations.clone();
    let policy_tolerations = p.policy.map(|pol| pol.tolerations.as_slice());
    for t in policy_tolerations
        .unwrap_or_default()
        .iter()
        .chain(p.tolerations)
    {
        if !tolerations.contains(t) {
            tolerations.push(t.clone());
        }
    }
    let policy_name = spec
        .policy_ref
        .as_ref()
        .map(|r| r.name.clone())
        .unwrap_or_default();
    let metadata = ObjectMeta {
        name: Some(pod_name(&image_name, p.node, &reference, p.attempt)),
        namespace: Some(p.namespace.to_owned()),
        labels: Some(BTreeMap::from([
            (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
            (IMAGE_LABEL.to_owned(), label_value(&image_name)),
            (NODE_LABEL.to_owned(), label_value(p.node)),
        ])),
        annotations: Some(BTreeMap::from([
            (IMAGE_ANNOTATION.to_owned(), image_name.clone()),
            (NODE_ANNOTATION.to_owned(), p.node.to_owned()),
            (REFERENCE_ANNOTATION.to_owned(), reference.clone()),
            (ATTEMPT_ANNOTATION.to_owned(), p.attempt.to_string()),
            (POLICY_ANNOTATION.to_owned(), policy_name),
        ])),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    };
    let quantity = |s: &str| Quantity(s.to_owned());
    let container = Container {
        name: CONTAINER.to_owned(),
        image: Some(reference),
        image_pull_policy: Some(spec.image_pull_policy.as_str().to_owned()),
        command: Some(vec![COMMAND.to_owned()]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), quantity("1m")),
                ("memory".to_owned(), quantity("8Mi")),
            ])),
            limits: Some(BTreeMap::from([
                ("cpu".to_owned(), quantity("50m")),
                ("memory".to_owned(), quantity("32Mi")),
            ])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Ok(Pod {
        metadata,
        spec: Some(PodSpec {
            node_name: Some(p.node.to_owned()),
            restart_policy: Some("Never".to_owned()),
            containers: vec![container],
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            image_pull_secrets: (!spec.image_pull_secrets.is_empty())
                .then(|| spec.image_pull_secrets.clone()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(0),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                seccomp_profile: Some(runtime_default()),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        }),
        status: None,
    })
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

fn short_hash(parts: &[&str], len: usize) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    hex[..len].to_owned()
}

/// Keeps the first `max` characters of a DNS-style name and trims what may not end a name.
fn head(s: &str, max: usize) -> &str {
    let cut = s.char_indices().nth(max).map_or(s.len(), |(i, _)| i);
    s[..cut].trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
}

/// The Pod name for (CachedImage, node, reference, attempt): `<image>-<node>-<hash>-<attempt>`, with
/// both names shortened so the result never exceeds 63 characters. The hash covers the full names
/// and the reference, so shortened names cannot collide and a new tag gets a new Pod.
pub fn pod_name(image: &str, node: &str, reference: &str, attempt: u32) -> String {
    let hash = short_hash(&[image, node, reference], 8);
    let suffix = format!("-{hash}-{attempt}");
    // Room for both names and the dash between them; a short node name leaves the rest to the image.
    let room = 63 - suffix.len() - 1;
    let image_part = head(image, room - node.len().min(room / 2));
    let node_part = head(node, room - image_part.len());
    let mut name = format!("{image_part}-{node_part}{suffix}").to_ascii_lowercase();
    name.retain(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    name.trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// A label value for `value`: itself if it fits (63 characters), else a prefix and a hash.
pub fn label_value(value: &str) -> String {
    if value.len() <= 63 {
        return value.to_owned();
    }
    format!("{}-{}", head(value, 52), short_hash(&[value], 10))
}

/// A pull Pod read back from the cluster: who it pulls for, where, what, and how it is going. The one
/// place that reads the annotations [`build`] writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullPodView {
    /// Pod name.
    pub name: String,
    /// Pod UID (empty for a Pod not read from the API server).
    pub uid: String,
    /// The CachedImage it pulls for.
    pub image: String,
    /// The node it pulls on.
    pub node: String,
    /// The reference it pulls.
    pub reference: String,
    /// Its attempt number.
    pub attempt: u32,
    /// The PullPolicy pacing it (`None`: the built-in pace).
    pub policy: Option<String>,
    /// When it was created (the pull's start).
    pub created: jiff::Timestamp,
    /// What it says about the pull.
    pub outcome: PullOutcome,
}

impl PullPodView {
    /// Reads a pull Pod; `None` for a Pod that is not one, or has no creation time yet.
    pub fn of(pod: &Pod) -> Option<Self> {
        let ann = pod.metadata.annotations.as_ref()?;
        Some(Self {
            name: pod.metadata.name.clone()?,
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            image: ann.get(IMAGE_ANNOTATION)?.clone(),
            node: ann.get(NODE_ANNOTATION)?.clone(),
            reference: ann.get(REFERENCE_ANNOTATION)?.clone(),
            attempt: ann
                .get(ATTEMPT_ANNOTATION)
                .and_then(|a| a.parse().ok())
                .unwrap_or(1),
            policy: ann
                .get(POLICY_ANNOTATION)
                .filter(|p| !p.is_empty())
                .cloned(),
            created: pod.metadata.creation_timestamp.as_ref()?.0,
            outcome: outcome(pod),
        })
    }
}

/// What a pull Pod says about its pull.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PullOutcome {
    /// The pull has not finished.
    Pulling,
    /// The image is on the node; `digest` is what the runtime resolved (`sha256:…`).
    Pulled {
        /// Resolved digest, if the runtime reported one.
        digest: Option<String>,
    },
    /// The pull failed (or the node refused the Pod).
    Failed {
        /// Machine-readable reason (`ErrImagePull`, `ImagePullBackOff`, `OutOfcpu`, …).
        reason: String,
        /// The kubelet's message.
        message: String,
    },
}

/// The container waiting reason of a container that could not be created; the kubelet creates one
/// only after its image is on the node.
pub const CREATED_AFTER_PULL: &str = "CreateContainerError";

/// Container waiting reasons that mean the image could not be pulled (or will not be).
pub const PULL_ERRORS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "RegistryUnavailable",
    "ErrRegistryUnavailable",
    "ImageInspectError",
    "SignatureValidationFailed",
];

/// Reads the pull's outcome from the Pod: pulled once the container has an image ID (whatever
/// happened to the container afterwards), failed on a pull error or a Pod the node rejected.
pub fn outcome(pod: &Pod) -> PullOutcome {
    let Some(status) = &pod.status else {
        return PullOutcome::Pulling;
    };
    let container = status
        .container_statuses
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|c| c.name == CONTAINER);
    if let Some(c) = container {
        if !c.image_id.is_empty() {
            return PullOutcome::Pulled {
                digest: digest_of(&c.image_id),
            };
        }
        let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
        let reason = waiting.and_then(|w| w.reason.as_deref());
        // CRI-O fails the missing command when it *creates* the container (containerd when it
        // starts it) and reports no image ID then; the kubelet creates a container only once its
        // image is on the node, so the pull has happened all the same.
        if reason == Some(CREATED_AFTER_PULL) {
            return PullOutcome::Pulled { digest: None };
        }
        if let Some(w) = waiting
            && let Some(reason) = reason
            && PULL_ERRORS.contains(&reason)
        {
            return PullOutcome::Failed {
                reason: reason.to_owned(),
                message: w.message.clone().unwrap_or_default(),
            };
        }
    }
    if status.phase.as_deref() == Some("Failed") {
        return PullOutcome::Failed {
            reason: status
                .reason
                .clone()
                .unwrap_or_else(|| "PodFailed".to_owned()),
            message: status.message.clone().unwrap_or_default(),
        };
    }
    PullOutcome::Pulling
}

/// Cuts a pull Pod down to what the operator reads of it, as it enters the cache: its metadata (the
/// annotations name the image, node, reference, attempt and policy) and what [`outcome`] reads of
/// its status. The spec the operator wrote, the conditions, addresses and the other container
/// fields go, and with them most of what each of a Pod's five or so watch events would copy into
/// the cache.
pub fn trim(pod: &mut Pod) {
    pod.spec = None;
    pod.status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        reason: s.reason,
        message: s.message,
        container_statuses: s.container_statuses.map(|all| {
            all.into_iter()
                .filter(|c| c.name == CONTAINER)
                .map(|c| ContainerStatus {
                    name: c.name,
                    image_id: c.image_id,
                    state: c.state.map(|state| ContainerState {
                        waiting: state.waiting,
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                })
                .collect()
        }),
        ..PodStatus::default()
    });
}

/// The `sha256:…` part of a container's image ID (`repo@sha256:…`, `sha256:…`, or
/// `docker-pullable://repo@sha256:…`).
pub fn digest_of(image_id: &str) -> Option<String> {
    let tail = image_id.rsplit('@').next().unwrap_or(image_id);
    let hex = tail.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("sha256:{hex}"))
}

#[cfg(test)]
mod tests;
