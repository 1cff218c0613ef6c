//! Targeting without re-reading every node on every reconcile.
//!
//! An image's reconcile needs its target nodes. Judging a node reads its labels and taints, and at
//! a thousand nodes that walk was the largest single cost of a reconcile (mostly cache misses on
//! label keys). Yet between two reconciles almost every node is the very same cached object: the
//! watch cache replaces a Node's `Arc` when an event changes it and never mutates one in place.
//!
//! [`TargetMemo`] keeps, per targeting (selectors and tolerations, shared by every image that has
//! the same), the verdict on each node object it judged, recognised by the object's address. A
//! `Weak` reference to each judged object keeps its allocation (not its contents) alive, so an
//! address cannot be reused by a different Node while the memo remembers it. Only nodes whose
//! object changed since the last pass are judged again, and the sorted list of names is rebuilt
//! only when the set of targets changed.

use super::Targeting;
use crate::api::{CachedImageSpec, PullPolicySpec};
use k8s_openapi::api::core::v1::{Node, Toleration};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

/// Passes after which a targeting nobody used is forgotten (an image deleted, a selector edited).
const FORGET_AFTER: u64 = 10_000;

/// Target nodes per targeting, remembered across reconciles. See the module documentation.
#[derive(Default)]
pub struct TargetMemo {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    groups: Vec<Group>,
    /// Passes so far.
    tick: u64,
}

/// What one targeting admitted at its last pass.
struct Group {
    key: Key,
    /// One per node, in the order of that pass.
    slots: Vec<Slot>,
    /// The admitted nodes' names, sorted.
    names: Arc<[String]>,
    last_used: u64,
}

struct Slot {
    node: Weak<Node>,
    /// Where its name is in `names`, if it is a target.
    target: Option<usize>,
}

/// A targeting, owned.
#[derive(PartialEq)]
struct Key {
    selectors: [Option<BTreeMap<String, String>>; 2],
    tolerations: Vec<Toleration>,
}

impl Key {
    fn of(t: &Targeting<'_>) -> Self {
        Self {
            selectors: t.selectors.map(|s| s.cloned()),
            tolerations: t.tolerations.iter().map(|&t| t.clone()).collect(),
        }
    }

    fn is(&self, t: &Targeting<'_>) -> bool {
        self.selectors
            .iter()
            .zip(&t.selectors)
            .all(|(a, b)| a.as_ref() == *b)
            && self.tolerations.len() == t.tolerations.len()
            && self
                .tolerations
                .iter()
                .zip(&t.tolerations)
                .all(|(a, b)| a == *b)
    }
}

impl TargetMemo {
    /// The names of the nodes among `nodes` that the image (under its policy, with the extra
    /// tolerations `also`) goes to, sorted: what [`super::targets`] gives, judging only the node
    /// objects not seen at this targeting's last pass.
    pub fn targets(
        &self,
        nodes: &[Arc<Node>],
        spec: &CachedImageSpec,
        policy: Option<&PullPolicySpec>,
        also: &[Toleration],
    ) -> Arc<[String]> {
        let targeting = Targeting::new(spec, policy, also);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.tick += 1;
        let tick = inner.tick;
        inner
            .groups
            .retain(|g| tick - g.last_used < FORGET_AFTER || g.key.is(&targeting));
        let at = match inner.groups.iter().position(|g| g.key.is(&targeting)) {
            Some(at) => at,
            None => {
                inner.groups.push(Group {
                    key: Key::of(&targeting),
                    slots: Vec::new(),
                    names: Arc::from([]),
                    last_used: tick,
                });
                inner.groups.len() - 1
            }
        };
        let group = &mut inner.groups[at];
        group.last_used = tick;
        group.pass(nodes, &targeting);
        Arc::clone(&group.names)
    }

    /// How many targetings are remembered.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .groups
            .len()
    }
}

impl Group {
    /// Judges the node objects that changed since the last pass and brings `names` up to date.
    fn pass(&mut self, nodes: &[Arc<Node>], targeting: &Targeting<'_>) {
        let mut before = std::mem::take(&mut self.slots).into_iter();
        let mut slots = Vec::with_capacity(nodes.len());
        // Whether every position adds to the target set what it added before.
        let mut same = true;
        for node in nodes {
            match before.next() {
                Some(slot) if std::ptr::eq(slot.node.as_ptr(), Arc::as_ptr(node)) => {
                    slots.push(slot);
                }
                was => {
                    let admitted = targeting.admits(node);
                    let target = match was.and_then(|s| s.target) {
                        Some(i) if admitted && self.names.get(i) == node.metadata.name.as_ref() => {
                            Some(i)
                        }
                        Some(_) => {
                            same = false;
                            admitted.then_some(usize::MAX)
                        }
                        None => {
                            same &= !admitted;
                            admitted.then_some(usize::MAX)
                        }
                    };
                    slots.push(Slot {
                        node: Arc::downgrade(node),
                        target,
                    });
                }
            }
        }
        // Nodes gone from the end of the list.
        same &= before.all(|s| s.target.is_none());
        if !same {
            let mut admitted: Vec<(&str, usize)> = nodes
                .iter()
                .zip(&slots)
                .enumerate()
                .filter(|(_, (_, s))| s.target.is_some())
                .filter_map(|(i, (n, _))| n.metadata.name.as_deref().map(|name| (name, i)))
                .collect();
            admitted.sort_unstable();
            for (at, &(_, i)) in admitted.iter().enumerate() {
                slots[i].target = Some(at);
            }
            self.names = admitted.iter().map(|(n, _)| (*n).to_owned()).collect();
        }
        self.slots = slots;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};

    fn node(name: &str, pool: &str) -> Arc<Node> {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some(BTreeMap::from([("pool".to_owned(), pool.to_owned())]));
        Arc::new(n)
    }

    fn spec(pool: &str) -> CachedImageSpec {
        CachedImageSpec {
            image: "nginx".into(),
            node_selector: BTreeMap::from([("pool".to_owned(), pool.to_owned())]),
            ..CachedImageSpec::default()
        }
    }

    fn plain(nodes: &[Arc<Node>], spec: &CachedImageSpec) -> Vec<String> {
        super::super::targets(nodes.iter().map(AsRef::as_ref), spec, None, &[])
    }

    #[test]
    fn cachedimage_targets_memo_agrees_with_a_fresh_pass_as_nodes_change() {
        let memo = TargetMemo::default();
        let a = spec("a");
        let mut nodes: Vec<Arc<Node>> = (0..20)
            .map(|i| node(&format!("n{i:02}"), if i % 2 == 0 { "a" } else { "b" }))
            .collect();
        assert_eq!(*memo.targets(&nodes, &a, None, &[]), *plain(&nodes, &a));
        // Unchanged objects: the same list, not rebuilt.
        let first = memo.targets(&nodes, &a, None, &[]);
        let again = memo.targets(&nodes, &a, None, &[]);
        assert!(Arc::ptr_eq(&first, &again));
        // A new object for a target that stays one (an image list changed): not rebuilt either.
        nodes[4] = node("n04", "a");
        let after = memo.targets(&nodes, &a, None, &[]);
        assert!(Arc::ptr_eq(&first, &after));
        // Relabelled out, relabelled in, tainted, removed, added, reordered.
        nodes[4] = node("n04", "b");
        assert_eq!(*memo.targets(&nodes, &a, None, &[]), *plain(&nodes, &a));
        nodes[5] = node("n05", "a");
        assert_eq!(*memo.targets(&nodes, &a, None, &[]), *plain(&nodes, &a));
        let mut tainted = Node::clone(&nodes[6]);
        tainted.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "k".into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        nodes[6] = Arc::new(tainted);
        assert_eq!(*memo.targets(&nodes, &a, None, &[]), *plain(&nodes, &a));
        nodes.remove(0);
        assert_eq!(*memo.targets(&nodes, &a, None, &[]), *plain(&nodes, &a));
        nodes.truncate(10);
        assert_eq!(*memo.targets(&nodes, &a, None, &[]), *plain(&nodes, &a));
        nodes.push(node("m00", "a"));
        nodes.reverse();
        assert_eq!(*memo.targets(&nodes, &a, None, &[]), *plain(&nodes, &a));
        // A node replaced at the same position by another node with the same verdict.
        nodes[0] = node("z99", "a");
        assert_eq!(*memo.targets(&nodes, &a, None, &[]), *plain(&nodes, &a));
    }

    #[test]
    fn cachedimage_targets_memo_keeps_one_targeting_per_selector_and_toleration_set() {
        let memo = TargetMemo::default();
        let nodes: Vec<Arc<Node>> = vec![node("x", "a"), node("y", "b")];
        assert_eq!(
            *memo.targets(&nodes, &spec("a"), None, &[]),
            ["x".to_owned()]
        );
        assert_eq!(
            *memo.targets(&nodes, &spec("b"), None, &[]),
            ["y".to_owned()]
        );
        assert_eq!(
            *memo.targets(&nodes, &spec("a"), None, &[]),
            ["x".to_owned()]
        );
        assert_eq!(memo.remembered(), 2);
        let warmup = Toleration {
            key: Some("warming".into()),
            operator: Some("Exists".into()),
            ..Toleration::default()
        };
        memo.targets(&nodes, &spec("a"), None, std::slice::from_ref(&warmup));
        assert_eq!(memo.remembered(), 3);
    }

    #[test]
    fn cachedimage_targets_memo_never_takes_a_new_object_at_a_reused_address_for_the_old_one() {
        // The memo holds a weak reference to each judged object, so its allocation outlives the
        // cache's copy and a new Node cannot be put at that address while the memo compares it.
        let memo = TargetMemo::default();
        let a = spec("a");
        for round in 0..200 {
            let pool = if round % 2 == 0 { "a" } else { "b" };
            let nodes = vec![node("n", pool)];
            assert_eq!(*memo.targets(&nodes, &a, None, &[]), *plain(&nodes, &a));
        }
    }
}
