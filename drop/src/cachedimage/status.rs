//! A CachedImage's status, conditions and transition Events, from what is known of each target node.
//! Pure.

use crate::api::{CachedImagePhase, CachedImageStatus, NodeFailure};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube_plan::conditions::{self, Cond};
use kube_plan::plan::EventKind;

/// How many failing nodes the status lists by name.
pub const MAX_FAILED_NODES: usize = 10;
/// The second condition type.
pub const PULL_PROGRESS: &str = "PullProgress";
/// `PullProgress` reason while the due pulls wait for their registry's budget.
pub const REGISTRY_BUDGET: &str = "WaitingForRegistry";

/// Where one target node stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// The image is on the node.
    Cached,
    /// A pull is under way.
    Pulling,
    /// The image is on the node and is being pulled again (`repullInterval`), to follow a moved
    /// tag. For the status it is cached: a routine refresh must not take the image out of Ready.
    Refreshing,
    /// The last pull failed; a retry comes after the backoff.
    Failed {
        /// The kubelet's reason.
        reason: String,
        /// The kubelet's message.
        message: String,
    },
    /// Not pulled yet: waiting for its turn.
    Waiting,
}

/// Why nothing can be decided for the image at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// Its `policyRef` names no PullPolicy.
    PolicyNotFound(String),
}

/// Everything the status is computed from.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Target nodes and their state, sorted by node name.
    pub nodes: Vec<(String, NodeState)>,
    /// Set when the image cannot be pulled at all.
    pub blocked: Option<Blocked>,
    /// Failed pulls in a row since the last success.
    pub consecutive_failures: u32,
    /// Last successful pull.
    pub last_pulled_at: Option<Timestamp>,
    /// Last pull start.
    pub last_attempted_at: Option<Timestamp>,
    /// Digest reported by the last successful pull.
    pub resolved_digest: Option<String>,
    /// The registry (and its budget of pulls in flight) holding back pulls that are due.
    pub registry_wait: Option<(String, u32)>,
}

impl Observed {
    fn count(&self, f: impl Fn(&NodeState) -> bool) -> usize {
        self.nodes.iter().filter(|(_, s)| f(s)).count()
    }

    /// Where `node` stands, if it is a target.
    pub fn node(&self, node: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|(n, _)| n == node).map(|(_, s)| s)
    }
}

impl NodeState {
    /// The image is on the node (refreshing or not).
    fn is_cached(&self) -> bool {
        matches!(self, Self::Cached | Self::Refreshing)
    }
}

fn i32_of(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The phase the observation amounts to.
pub fn phase(o: &Observed) -> CachedImagePhase {
    let total = o.nodes.len();
    let ready = o.count(NodeState::is_cached);
    let failed = o.count(|s| matches!(s, NodeState::Failed { .. }));
    let pulling = o.count(|s| *s == NodeState::Pulling);
    if o.blocked.is_some() || total == 0 {
        CachedImagePhase::Pending
    } else if ready == total {
        CachedImagePhase::Ready
    } else if failed > 0 {
        CachedImagePhase::Degraded
    } else if pulling > 0 || ready > 0 {
        CachedImagePhase::Pulling
    } else {
        CachedImagePhase::Pending
    }
}

/// The new status: counts, lists, phase and the `Ready` and `PullProgress` conditions. Conditions keep
/// their transition times from `previous` unless their status flips.
pub fn compute(
    previous: Option<&CachedImageStatus>,
    o: &Observed,
    now: Timestamp,
) -> CachedImageStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let total = o.nodes.len();
    let ready = o.count(NodeState::is_cached);
    let pulling = o.count(|s| *s == NodeState::Pulling);
    let failures: Vec<NodeFailure> = o
        .nodes
        .iter()
        .filter_map(|(node, s)| match s {
            NodeState::Failed { reason, message } => Some(NodeFailure {
                node: node.clone(),
                reason: reason.clone(),
                message: message.clone(),
            }),
            _ => None,
        })
        .collect();
    let phase = phase(o);

    status.phase = Some(phase);
    status.ready = Some(format!("{ready}/{total}"));
    status.nodes_targeted = i32_of(total);
    status.nodes_ready = i32_of(ready);
    status.nodes_pulling = i32_of(pulling);
    status.nodes_failed = i32_of(failures.len());
    status.cached_nodes = o
        .nodes
        .iter()
        .filter(|(_, s)| s.is_cached())
        .map(|(n, _)| n.as_str())
        .collect();
    status.failed_nodes = failures.iter().take(MAX_FAILED_NODES).cloned().collect();
    status.consecutive_failures = i32::try_from(o.consecutive_failures).unwrap_or(i32::MAX);
    if o.last_pulled_at.is_some() {
        status.last_pulled_at = o.last_pulled_at.map(Time);
    }
    if o.last_attempted_at.is_some() {
        status.last_attempted_at = o.last_attempted_at.map(Time);
    }
    if o.resolved_digest.is_some() {
        status.resolved_digest = o.resolved_digest.clone();
    }

    let fraction = format!("{ready}/{total} nodes ready");
    let ready_cond = match (&o.blocked, phase) {
        (Some(Blocked::PolicyNotFound(name)), _) => Cond::ready(
            false,
            "PolicyNotFound",
            format!("PullPolicy {name:?} does not exist; pulls wait until it does"),
        ),
        (None, _) if total == 0 => Cond::ready(
            false,
            "NoMatchingNodes",
            "no node matches the node selector and tolerations",
        ),
        (None, CachedImagePhase::Ready) => Cond::ready(
            true,
            "Cached",
            format!("Image cached on all {total} target nodes"),
        ),
        (None, CachedImagePhase::Degraded) => {
            let first = &failures[0];
            let more = if failures.len() > 1 {
                format!(" (and {} more failing)", failures.len() - 1)
            } else {
                String::new()
            };
            Cond::ready(
                false,
                "PullFailed",
                format!(
                    "{fraction}; {}: {} {}{more}",
                    first.node, first.reason, first.message
                )
                .trim_end()
                .to_owned(),
            )
        }
        (None, _) => Cond::ready(false, "InProgress", fraction.clone()),
    };
    let registry_wait = o.registry_wait.as_ref().map(|(registry, budget)| {
        format!("waiting for a slot at {registry} (its budget of {budget} pulls in flight is taken by other images)")
    });
    let progress = if pulling > 0 {
        let mut message =
            format!("Actively pulling on {pulling} node(s), {ready}/{total} complete");
        if let Some(wait) = &registry_wait {
            message = format!("{message}; others {wait}");
        }
        Cond::new(PULL_PROGRESS, true, "Pulling", message)
    } else if let Some(wait) = registry_wait {
        Cond::new(
            PULL_PROGRESS,
            false,
            REGISTRY_BUDGET,
            format!("{ready}/{total} nodes ready; {wait}"),
        )
    } else if phase == CachedImagePhase::Ready {
        Cond::new(PULL_PROGRESS, false, "Complete", "All pulls complete")
    } else if phase == CachedImagePhase::Degraded {
        Cond::new(
            PULL_PROGRESS,
            false,
            "Stalled",
            format!("Pull stalled: {ready}/{total} nodes ready, retrying with backoff"),
        )
    } else {
        Cond::new(PULL_PROGRESS, false, "Idle", "Waiting to start pulls")
    };
    conditions::set(&mut status.conditions, ready_cond, None, now);
    conditions::set(&mut status.conditions, progress, None, now);
    status
}

/// The Event a phase change deserves (one per transition, not one per node or pull).
pub fn transition_event(
    before: Option<CachedImagePhase>,
    after: &CachedImageStatus,
    reference: &str,
) -> Option<(EventKind, &'static str, String)> {
    let now = after.phase?;
    if before == Some(now) {
        return None;
    }
    match now {
        CachedImagePhase::Ready => Some((
            EventKind::Normal,
            "Cached",
            format!(
                "{reference} cached on all {} target nodes",
                after.nodes_targeted
            ),
        )),
        CachedImagePhase::Degraded => {
            let first = after.failed_nodes.first()?;
            Some((
                EventKind::Warning,
                "PullFailed",
                format!(
                    "{reference} failed on {} node(s); first: {}: {} {}",
                    after.nodes_failed, first.node, first.reason, first.message
                )
                .trim_end()
                .to_owned(),
            ))
        }
        CachedImagePhase::Pulling if before != Some(CachedImagePhase::Degraded) => Some((
            EventKind::Normal,
            "Pulling",
            format!(
                "pulling {reference} onto {} target nodes",
                after.nodes_targeted
            ),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn observed(states: &[(&str, NodeState)]) -> Observed {
        let mut nodes: Vec<(String, NodeState)> = states
            .iter()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .collect();
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        Observed {
            nodes,
            ..Observed::default()
        }
    }

    fn failed(reason: &str) -> NodeState {
        NodeState::Failed {
            reason: reason.into(),
            message: "no such host".into(),
        }
    }

    fn cond<'a>(
        s: &'a CachedImageStatus,
        t: &str,
    ) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        conditions::get(&s.conditions, t).unwrap()
    }

    #[test]
    fn cachedimage_status_all_cached_is_ready() {
        let s = compute(
            None,
            &observed(&[
                ("a", NodeState::Cached),
                ("b", NodeState::Cached),
                ("c", NodeState::Cached),
            ]),
            at(0),
        );
        assert_eq!(s.phase, Some(CachedImagePhase::Ready));
        assert_eq!(s.ready.as_deref(), Some("3/3"));
        assert_eq!(s.cached_nodes.to_vec(), ["a", "b", "c"]);
        assert_eq!(
            (
                cond(&s, "Ready").status.as_str(),
                cond(&s, "Ready").reason.as_str()
            ),
            ("True", "Cached")
        );
        assert_eq!(
            cond(&s, "Ready").message,
            "Image cached on all 3 target nodes"
        );
        assert_eq!(cond(&s, PULL_PROGRESS).reason, "Complete");
    }

    #[test]
    fn cachedimage_status_pulling_names_counts() {
        let s = compute(
            None,
            &observed(&[
                ("a", NodeState::Cached),
                ("b", NodeState::Pulling),
                ("c", NodeState::Waiting),
            ]),
            at(0),
        );
        assert_eq!(s.phase, Some(CachedImagePhase::Pulling));
        assert_eq!(
            (s.nodes_targeted, s.nodes_ready, s.nodes_pulling),
            (3, 1, 1)
        );
        assert_eq!(cond(&s, "Ready").reason, "InProgress");
        assert_eq!(cond(&s, "Ready").message, "1/3 nodes ready");
        assert_eq!(
            cond(&s, PULL_PROGRESS).message,
            "Actively pulling on 1 node(s), 1/3 complete"
        );
    }

    #[test]
    fn cachedimage_status_failures_degrade_and_are_bounded() {
        let mut states: Vec<(String, NodeState)> = (0..15)
            .map(|i| (format!("n{i:02}"), failed("ErrImagePull")))
            .collect();
        states.push(("z".into(), NodeState::Cached));
        let o = Observed {
            nodes: states,
            consecutive_failures: 4,
            ..Observed::default()
        };
        let s = compute(None, &o, at(0));
        assert_eq!(s.phase, Some(CachedImagePhase::Degraded));
        assert_eq!(s.nodes_failed, 15);
        assert_eq!(s.failed_nodes.len(), MAX_FAILED_NODES);
        assert_eq!(s.failed_nodes[0].node, "n00");
        assert_eq!(s.consecutive_failures, 4);
        let ready = cond(&s, "Ready");
        assert_eq!(ready.reason, "PullFailed");
        assert_eq!(
            ready.message,
            "1/16 nodes ready; n00: ErrImagePull no such host (and 14 more failing)"
        );
        assert_eq!(cond(&s, PULL_PROGRESS).reason, "Stalled");
        assert_eq!(
            cond(&s, PULL_PROGRESS).message,
            "Pull stalled: 1/16 nodes ready, retrying with backoff"
        );
    }

    #[test]
    fn cachedimage_status_without_targets_or_policy_says_why() {
        let s = compute(None, &observed(&[]), at(0));
        assert_eq!(s.phase, Some(CachedImagePhase::Pending));
        assert_eq!(cond(&s, "Ready").reason, "NoMatchingNodes");
        assert_eq!(cond(&s, PULL_PROGRESS).reason, "Idle");
        let mut o = observed(&[("a", NodeState::Waiting)]);
        o.blocked = Some(Blocked::PolicyNotFound("fast".into()));
        let s = compute(None, &o, at(0));
        assert_eq!(cond(&s, "Ready").reason, "PolicyNotFound");
        assert!(cond(&s, "Ready").message.contains("\"fast\""));
    }

    #[test]
    fn cachedimage_status_is_stable_when_nothing_changes() {
        let o = observed(&[("a", NodeState::Cached), ("b", NodeState::Pulling)]);
        let first = compute(None, &o, at(0));
        let again = compute(Some(&first), &o, at(60));
        assert_eq!(
            first, again,
            "an unchanged world gives an unchanged status: no write, no loop"
        );
    }

    #[test]
    fn cachedimage_refreshing_a_cached_node_changes_nothing_a_user_sees() {
        let cached = compute(
            None,
            &observed(&[("a", NodeState::Cached), ("b", NodeState::Cached)]),
            at(0),
        );
        let refreshing = compute(
            Some(&cached),
            &observed(&[("a", NodeState::Refreshing), ("b", NodeState::Cached)]),
            at(3600),
        );
        assert_eq!(
            refreshing, cached,
            "no phase, condition, count or list change"
        );
        assert_eq!(
            transition_event(cached.phase, &refreshing, "nginx:1"),
            None,
            "no Event"
        );
    }

    #[test]
    fn cachedimage_status_keeps_the_last_digest_and_times() {
        let mut o = observed(&[("a", NodeState::Cached)]);
        o.resolved_digest = Some("sha256:1".into());
        o.last_pulled_at = Some(at(5));
        let first = compute(None, &o, at(10));
        let later = compute(Some(&first), &observed(&[("a", NodeState::Cached)]), at(20));
        assert_eq!(later.resolved_digest.as_deref(), Some("sha256:1"));
        assert_eq!(later.last_pulled_at, Some(Time(at(5))));
    }

    #[test]
    fn cachedimage_events_come_once_per_transition() {
        let ready = compute(None, &observed(&[("a", NodeState::Cached)]), at(0));
        let (kind, reason, msg) =
            transition_event(Some(CachedImagePhase::Pulling), &ready, "nginx:1").unwrap();
        assert_eq!((kind, reason), (EventKind::Normal, "Cached"));
        assert_eq!(msg, "nginx:1 cached on all 1 target nodes");
        assert_eq!(
            transition_event(Some(CachedImagePhase::Ready), &ready, "nginx:1"),
            None
        );
        let bad = compute(None, &observed(&[("a", failed("ImagePullBackOff"))]), at(0));
        let (kind, reason, _) =
            transition_event(Some(CachedImagePhase::Pulling), &bad, "x:1").unwrap();
        assert_eq!((kind, reason), (EventKind::Warning, "PullFailed"));
    }

    #[test]
    fn registry_budget_waiting_images_say_which_registry_holds_them() {
        let mut o = observed(&[("a", NodeState::Cached), ("b", NodeState::Waiting)]);
        o.registry_wait = Some(("docker.io".into(), 2));
        let st = compute(None, &o, at(0));
        let progress = conditions::get(&st.conditions, PULL_PROGRESS).unwrap();
        assert_eq!(progress.reason, REGISTRY_BUDGET);
        assert!(
            progress.message.contains("docker.io"),
            "{}",
            progress.message
        );
        assert!(
            progress.message.contains("budget of 2"),
            "{}",
            progress.message
        );
        assert_eq!(
            conditions::get(&st.conditions, "Ready").unwrap().reason,
            "InProgress"
        );
    }
}
