//! Which nodes an image goes to. Pure.
//!
//! A node is a target when its labels carry every pair of the image's `nodeSelector` and of its
//! PullPolicy's `nodeSelector`, and every `NoSchedule` or `NoExecute` taint on it is tolerated by the
//! image's or the policy's tolerations (the rules the kubelet and scheduler apply). Cordoned, not-ready
//! and unreachable nodes carry such taints, so they drop out unless tolerated on purpose (the pacer
//! still remembers where the image was cached while such a node's Node exists).

mod memo;

pub use memo::TargetMemo;

use crate::api::{CachedImageSpec, PullPolicySpec};
use k8s_openapi::api::core::v1::{Node, Taint, Toleration};
use std::collections::BTreeMap;

/// Whether `toleration` tolerates `taint`.
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect_ok = toleration
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let key_ok = match toleration.operator.as_deref() {
        Some("Exists") => toleration
            .key
            .as_deref()
            .is_none_or(|k| k.is_empty() || k == taint.key),
        // "Equal" is the default operator.
        _ => {
            toleration.key.as_deref() == Some(taint.key.as_str())
                && toleration.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
    };
    effect_ok && key_ok
}

fn labels_match(node: &Node, selector: &BTreeMap<String, String>) -> bool {
    let labels = node.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// Whether the image (under its policy) goes to `node`. `also` are tolerations every pull Pod carries
/// besides the image's and the policy's (the warm-up taint's, see [`crate::warmup`]).
pub fn is_target(
    node: &Node,
    spec: &CachedImageSpec,
    policy: Option<&PullPolicySpec>,
    also: &[Toleration],
) -> bool {
    Targeting::new(spec, policy, also).admits(node)
}

/// The names of the target nodes, sorted.
pub fn targets<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    spec: &CachedImageSpec,
    policy: Option<&PullPolicySpec>,
    also: &[Toleration],
) -> Vec<String> {
    let targeting = Targeting::new(spec, policy, also);
    let mut names: Vec<String> = nodes
        .into_iter()
        .filter(|n| targeting.admits(n))
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    names.sort_unstable();
    names
}

/// What chooses an image's nodes, gathered once for a pass over the fleet.
struct Targeting<'a> {
    selectors: [Option<&'a BTreeMap<String, String>>; 2],
    tolerations: Vec<&'a Toleration>,
}

impl<'a> Targeting<'a> {
    fn new(
        spec: &'a CachedImageSpec,
        policy: Option<&'a PullPolicySpec>,
        also: &'a [Toleration],
    ) -> Self {
        Self {
            selectors: [Some(&spec.node_selector), policy.map(|p| &p.node_selector)],
            tolerations: spec
                .tolerations
                .iter()
                .chain(policy.map(|p| p.tolerations.as_slice()).unwrap_or_default())
                .chain(also)
                .collect(),
        }
    }

    fn admits(&self, node: &Node) -> bool {
        if node.metadata.deletion_timestamp.is_some() {
            return false;
        }
        if !self
            .selectors
            .iter()
            .flatten()
            .all(|s| labels_match(node, s))
        {
            return false;
        }
        node.spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .into_iter()
            .flatten()
            .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
            .all(|taint| self.tolerations.iter().any(|t| tolerates(t, taint)))
    }
}

/// What about a node decides whether it is a target: labels, taints (key, value, effect), and
/// whether it is being deleted.
pub type Relevance = (
    Option<BTreeMap<String, String>>,
    Vec<(String, String, String)>,
    bool,
    Option<u64>,
);

/// What about a node can change whether it is a target (its labels and its taints), or whether an
/// image is still on it (its image list, see [`super::presence`]). Node updates that leave these
/// alone (heartbeats, conditions) do not wake any image.
pub fn relevance(node: &Node) -> Relevance {
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    (
                        t.key.clone(),
                        t.value.clone().unwrap_or_default(),
                        t.effect.clone(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (
        node.metadata.labels.clone(),
        taints,
        node.metadata.deletion_timestamp.is_some(),
        super::presence::fingerprint(node),
    )
}

/// What the operator keeps of a Node: its metadata, spec, and the names of its images. Targeting
/// reads only labels, taints and the deletion mark, and presence the image names; the rest of the
/// status (conditions, addresses, capacity, image sizes) is the bulk of a real Node and changes with
/// every kubelet report, so it is dropped before the Node is cached.
pub fn trim(node: &mut Node) {
    super::presence::trim(node);
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;

    fn node(name: &str, labels: &[(&str, &str)], taints: &[(&str, &str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        n.spec = Some(NodeSpec {
            taints: Some(
                taints
                    .iter()
                    .map(|(k, v, e)| Taint {
                        key: k.to_string(),
                        value: (!v.is_empty()).then(|| v.to_string()),
                        effect: e.to_string(),
                        ..Taint::default()
                    })
                    .collect(),
            ),
            ..NodeSpec::default()
        });
        n
    }

    fn tol(key: Option<&str>, op: &str, value: Option<&str>, effect: Option<&str>) -> Toleration {
        Toleration {
            key: key.map(Into::into),
            operator: Some(op.into()),
            value: value.map(Into::into),
            effect: effect.map(Into::into),
            ..Toleration::default()
        }
    }

    fn spec(selector: &[(&str, &str)], tolerations: Vec<Toleration>) -> CachedImageSpec {
        CachedImageSpec {
            image: "nginx".into(),
            node_selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tolerations,
            ..CachedImageSpec::default()
        }
    }

    #[test]
    fn cachedimage_targets_follow_image_and_policy_selectors() {
        let nodes = [
            node("a", &[("pool", "ci"), ("zone", "1")], &[]),
            node("b", &[("pool", "ci"), ("zone", "2")], &[]),
            node("c", &[("pool", "web")], &[]),
        ];
        let s = spec(&[("pool", "ci")], vec![]);
        assert_eq!(targets(&nodes, &s, None, &[]), vec!["a", "b"]);
        let policy = PullPolicySpec {
            node_selector: BTreeMap::from([("zone".into(), "2".into())]),
            ..PullPolicySpec::default()
        };
        assert_eq!(
            targets(&nodes, &s, Some(&policy), &[]),
            vec!["b"],
            "the policy narrows the pool"
        );
        assert_eq!(
            targets(&nodes, &spec(&[], vec![]), None, &[]),
            vec!["a", "b", "c"]
        );
    }

    #[test]
    fn cachedimage_targets_skip_untolerated_taints() {
        let nodes = [
            node("plain", &[], &[]),
            node("build", &[], &[("dedicated", "ci", "NoSchedule")]),
            node("prefer", &[], &[("soft", "", "PreferNoSchedule")]),
            node(
                "cordoned",
                &[],
                &[("node.kubernetes.io/unschedulable", "", "NoSchedule")],
            ),
        ];
        assert_eq!(
            targets(&nodes, &spec(&[], vec![]), None, &[]),
            vec!["plain", "prefer"]
        );
        let t = tol(Some("dedicated"), "Equal", Some("ci"), Some("NoSchedule"));
        assert_eq!(
            targets(&nodes, &spec(&[], vec![t.clone()]), None, &[]),
            vec!["build", "plain", "prefer"]
        );
        let policy = PullPolicySpec {
            tolerations: vec![t],
            ..PullPolicySpec::default()
        };
        assert_eq!(
            targets(&nodes, &spec(&[], vec![]), Some(&policy), &[]),
            vec!["build", "plain", "prefer"],
            "the policy's tolerations count too"
        );
        let warming = tol(Some("dedicated"), "Exists", None, None);
        assert_eq!(
            targets(&nodes, &spec(&[], vec![]), None, &[warming]),
            vec!["build", "plain", "prefer"],
            "the tolerations every pull Pod carries count too"
        );
    }

    #[test]
    fn cachedimage_toleration_matching_follows_kubernetes() {
        let taint = Taint {
            key: "k".into(),
            value: Some("v".into()),
            effect: "NoExecute".into(),
            ..Taint::default()
        };
        assert!(
            tolerates(&tol(None, "Exists", None, None), &taint),
            "empty key with Exists tolerates all"
        );
        assert!(tolerates(&tol(Some("k"), "Exists", None, None), &taint));
        assert!(!tolerates(
            &tol(Some("other"), "Exists", None, None),
            &taint
        ));
        assert!(tolerates(
            &tol(Some("k"), "Equal", Some("v"), Some("NoExecute")),
            &taint
        ));
        assert!(!tolerates(
            &tol(Some("k"), "Equal", Some("w"), None),
            &taint
        ));
        assert!(!tolerates(
            &tol(Some("k"), "Exists", None, Some("NoSchedule")),
            &taint
        ));
        let default_op = Toleration {
            key: Some("k".into()),
            value: Some("v".into()),
            ..Toleration::default()
        };
        assert!(
            tolerates(&default_op, &taint),
            "Equal is the default operator"
        );
    }

    #[test]
    fn cachedimage_node_relevance_ignores_status_changes() {
        let a = node("a", &[("pool", "ci")], &[]);
        let mut b = a.clone();
        b.status = Some(Default::default());
        assert_eq!(relevance(&a), relevance(&b));
        let c = node("a", &[("pool", "web")], &[]);
        assert_ne!(relevance(&a), relevance(&c));
    }

    #[test]
    fn cachedimage_targets_read_nothing_the_cache_trim_drops() {
        use k8s_openapi::api::core::v1::{ContainerImage, NodeStatus};
        let mut full = node("a", &[("pool", "ci")], &[("dedicated", "ci", "NoSchedule")]);
        full.status = Some(NodeStatus {
            images: Some(vec![ContainerImage {
                names: Some(vec!["docker.io/library/nginx:1.27".into()]),
                size_bytes: Some(1 << 20),
            }]),
            ..NodeStatus::default()
        });
        let mut trimmed = full.clone();
        trim(&mut trimmed);
        let kept = trimmed
            .status
            .as_ref()
            .and_then(|s| s.images.as_ref())
            .unwrap();
        assert_eq!(
            kept[0].size_bytes,
            Some(1),
            "the count of images, not their sizes"
        );
        let (labels, taints, deleted, _) = relevance(&full);
        let (l, t, d, images) = relevance(&trimmed);
        assert_eq!((l, t, d), (labels, taints, deleted));
        assert!(images.is_some(), "the image list still counts");
        let tolerating = spec(
            &[("pool", "ci")],
            vec![tol(Some("dedicated"), "Equal", Some("ci"), None)],
        );
        for s in [spec(&[("pool", "ci")], vec![]), tolerating] {
            assert_eq!(
                is_target(&trimmed, &s, None, &[]),
                is_target(&full, &s, None, &[])
            );
        }
    }
}
