//! Warm before schedule: a node that joins with the warm-up taint keeps it, so no workload lands on
//! it, until every image that targets it is cached there, or until a deadline passes (a registry that
//! is down must never keep a node out of service). Opt-in: `drop run --warmup-taint KEY`.
//!
//! Pull Pods tolerate the taint, and targeting ignores it, so a warming node is pulled to like any
//! other. This module holds the rules (pure: time comes in as an argument); [`Warden`] applies them
//! to the cluster: it removes the taint, records an Event on the Node and counts it in the metrics.
//! The decision is written up in `docs/warmup.md`.

mod warden;

pub use warden::Warden;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Taint, Toleration};
use std::time::Duration;

/// The taint key the chart uses when warm-up is enabled.
pub const DEFAULT_TAINT: &str = "drop.corewire.io/warming";
/// How long a node waits for its images at most, counted from its creation.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(600);
/// `reason` of the taint's removal once every image is cached (metric label and Event reason).
pub const CACHED: &str = "WarmupComplete";
/// `reason` of the taint's removal at the deadline (metric label and Warning Event reason).
pub const DEADLINE: &str = "WarmupDeadlineExceeded";

/// Taints a node carries while it starts (set by the node lifecycle controller or the cloud
/// provider, removed by them): an image that does not tolerate them still goes to the node once
/// they are gone, so it counts among the images a warming node waits for.
pub const STARTUP_TAINTS: [&str; 4] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
    "node.kubernetes.io/network-unavailable",
    "node.cloudprovider.kubernetes.io/uninitialized",
];

/// The warm-up settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warmup {
    /// The taint key (any value, any effect) that marks a node as warming.
    pub taint: String,
    /// The longest a node keeps the taint, counted from its creation.
    pub deadline: Duration,
}

/// Where a warming node stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every image that targets it is cached there: remove the taint.
    Warm,
    /// Images are missing and the deadline is ahead: look again when something changes, or then.
    Waiting(Timestamp),
    /// The deadline has passed: remove the taint anyway.
    Expired,
}

impl Warmup {
    /// The toleration every pull Pod carries, so that pulls reach a warming node.
    pub fn toleration(&self) -> Toleration {
        Toleration {
            key: Some(self.taint.clone()),
            operator: Some("Exists".into()),
            ..Toleration::default()
        }
    }

    /// What a warming node's images are judged with: [`Warmup::toleration`] and the
    /// [`STARTUP_TAINTS`], so that an image counts for a node that is not ready yet. The
    /// [`Warden`] computes it once.
    pub fn judging_tolerations(&self) -> Vec<Toleration> {
        std::iter::once(self.toleration())
            .chain(STARTUP_TAINTS.iter().map(|key| Toleration {
                key: Some((*key).into()),
                operator: Some("Exists".into()),
                ..Toleration::default()
            }))
            .collect()
    }

    /// Whether `node` is warming: it carries the taint and is not being deleted.
    pub fn is_warming(&self, node: &Node) -> bool {
        node.metadata.deletion_timestamp.is_none() && taints(node).any(|t| t.key == self.taint)
    }

    /// When `node` must lose the taint at the latest.
    pub fn deadline_of(&self, node: &Node) -> Timestamp {
        let created = node
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(Timestamp::UNIX_EPOCH, |t| t.0);
        crate::pacing::after(created, self.deadline)
    }

    /// Where `node` stands, given the images that target it and are not cached there yet.
    pub fn verdict(&self, node: &Node, missing: &[String], now: Timestamp) -> Verdict {
        let deadline = self.deadline_of(node);
        if missing.is_empty() {
            Verdict::Warm
        } else if deadline <= now {
            Verdict::Expired
        } else {
            Verdict::Waiting(deadline)
        }
    }

    /// A JSON patch removing the taint from `node`: it first tests that the taints are still those
    /// of `node`, so a concurrent change (someone else's taint, a cordon) is never overwritten; the
    /// API server refuses the patch instead, and the change arrives through the Node watch.
    pub fn release_patch(&self, node: &Node) -> serde_json::Value {
        let current: Vec<&Taint> = taints(node).collect();
        let kept: Vec<&Taint> = taints(node).filter(|t| t.key != self.taint).collect();
        serde_json::json!([
            {"op": "test", "path": "/spec/taints", "value": current},
            {"op": "replace", "path": "/spec/taints", "value": kept},
        ])
    }
}

fn taints(node: &Node) -> impl Iterator<Item = &Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn warmup() -> Warmup {
        Warmup {
            taint: DEFAULT_TAINT.into(),
            deadline: Duration::from_secs(300),
        }
    }

    fn node(taints: &[(&str, &str)], created: Timestamp) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("n".into());
        n.metadata.creation_timestamp = Some(Time(created));
        n.spec = Some(NodeSpec {
            taints: Some(
                taints
                    .iter()
                    .map(|(k, e)| Taint {
                        key: (*k).into(),
                        effect: (*e).into(),
                        ..Taint::default()
                    })
                    .collect(),
            ),
            ..NodeSpec::default()
        });
        n
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    #[test]
    fn warmup_node_is_warming_only_with_the_taint_and_not_being_deleted() {
        let w = warmup();
        assert!(w.is_warming(&node(&[(DEFAULT_TAINT, "NoSchedule")], at(0))));
        assert!(w.is_warming(&node(&[(DEFAULT_TAINT, "NoExecute")], at(0))));
        assert!(!w.is_warming(&node(&[("other", "NoSchedule")], at(0))));
        assert!(!w.is_warming(&Node::default()));
        let mut going = node(&[(DEFAULT_TAINT, "NoSchedule")], at(0));
        going.metadata.deletion_timestamp = Some(Time(at(1)));
        assert!(!w.is_warming(&going));
    }

    #[test]
    fn warmup_verdict_waits_for_missing_images_until_the_deadline() {
        let w = warmup();
        let n = node(&[(DEFAULT_TAINT, "NoSchedule")], at(0));
        assert_eq!(w.verdict(&n, &[], at(10)), Verdict::Warm);
        let missing = vec!["img".to_owned()];
        assert_eq!(w.verdict(&n, &missing, at(10)), Verdict::Waiting(at(300)));
        assert_eq!(w.verdict(&n, &missing, at(300)), Verdict::Expired);
        assert_eq!(
            w.verdict(&n, &[], at(900)),
            Verdict::Warm,
            "a warm node past its deadline is warm, not expired"
        );
    }

    #[test]
    fn warmup_release_patch_keeps_other_taints_and_tests_the_current_ones() {
        let w = warmup();
        let n = node(
            &[
                ("dedicated", "NoSchedule"),
                (DEFAULT_TAINT, "NoSchedule"),
                ("node.kubernetes.io/unschedulable", "NoSchedule"),
            ],
            at(0),
        );
        let patch = w.release_patch(&n);
        let test = &patch[0];
        assert_eq!(test["op"], "test");
        assert_eq!(test["value"].as_array().unwrap().len(), 3);
        let replace = &patch[1];
        assert_eq!(replace["op"], "replace");
        let kept: Vec<&str> = replace["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["key"].as_str().unwrap())
            .collect();
        assert_eq!(kept, ["dedicated", "node.kubernetes.io/unschedulable"]);
    }

    #[test]
    fn warmup_toleration_tolerates_the_taint_with_any_effect() {
        let w = warmup();
        for effect in ["NoSchedule", "NoExecute"] {
            let taint = Taint {
                key: DEFAULT_TAINT.into(),
                effect: effect.into(),
                value: Some("true".into()),
                ..Taint::default()
            };
            assert!(crate::cachedimage::targets::tolerates(
                &w.toleration(),
                &taint
            ));
        }
    }
}
