//! Which pulls start now. One engine paces the whole operator; it is pure: time comes in as an
//! argument, and the same input always gives the same decision.
//!
//! The rules (written out with a timeline in `docs/pacing.md`):
//! - a PullPolicy is a budget shared by every image that references it; images without one share the
//!   built-in pace ([`Pace::builtin`]): 1 node at a time, 10 s apart, failures retried after 30 s
//!   doubling up to 5 min, no re-pulls;
//! - at most `maxConcurrentNodes` pulls of a policy are in flight at once;
//! - two pull starts under one policy are at least `minDelayBetweenPulls` apart, start to start;
//! - after a failure, the same image on the same node is retried after `initial · 2^(n-1)` (n failures
//!   in a row), never more than `max`;
//! - a cached image is pulled again `repullInterval` after its last success, if one is set;
//! - a registry with a budget never has more than that many pulls in flight, whatever their policies
//!   and images; a due pull that would exceed it waits for a pull from that registry to end;
//! - among pulls that are due, nodes that lack the image go before refreshes of nodes that have it,
//!   then lower `priority`, then image name, then node name;
//! - several pulls start in one decision when the limits allow;
//! - a pull in flight longer than the pull timeout is reported, so the caller can fail it.

use crate::api::{PullPolicySpec, defaults};
use crate::podbuilder;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// The PullPolicy pacing a pull: its name, or `None` for the built-in pace.
pub type PolicyKey = Option<Arc<str>>;

/// A registry host as written in image references after normalisation (`docker.io`,
/// `registry.example.com:5000`): what a pull budget per registry is keyed by.
pub type Registry = Arc<str>;

/// The limits of one PullPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pace {
    /// Most pulls in flight at once.
    pub max_concurrent: u32,
    /// Least time between two starts.
    pub min_delay: Duration,
    /// First retry delay.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Re-pull cached images this long after their last success (`None`: never).
    pub repull_interval: Option<Duration>,
}

impl Pace {
    /// The pace of images without a PullPolicy.
    pub fn builtin() -> Self {
        Self {
            max_concurrent: defaults::MAX_CONCURRENT_NODES as u32,
            min_delay: defaults::MIN_DELAY_BETWEEN_PULLS,
            backoff_initial: defaults::BACKOFF_INITIAL,
            backoff_max: defaults::BACKOFF_MAX,
            repull_interval: None,
        }
    }

    /// The pace a PullPolicy describes, with the defaults for what it leaves out.
    pub fn from_spec(spec: &PullPolicySpec) -> Self {
        let backoff = spec.failure_backoff.clone().unwrap_or_default();
        Self {
            max_concurrent: u32::try_from(spec.max_concurrent_nodes.max(1)).unwrap_or(1),
            min_delay: spec
                .min_delay_between_pulls
                .map_or(defaults::MIN_DELAY_BETWEEN_PULLS, Into::into),
            backoff_initial: backoff
                .initial
                .map_or(defaults::BACKOFF_INITIAL, Into::into),
            backoff_max: backoff.max.map_or(defaults::BACKOFF_MAX, Into::into),
            repull_interval: spec
                .repull_interval
                .map(Into::into)
                .filter(|d: &Duration| !d.is_zero()),
        }
    }

    /// How long to wait after the `failures`-th failure in a row: `initial · 2^(failures-1)`, at most
    /// `max` (and never less than the smaller of the two).
    pub fn retry_delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(31);
        self.backoff_initial
            .saturating_mul(1u32 << exp)
            .min(self.backoff_max)
            .max(self.backoff_initial.min(self.backoff_max))
    }
}

/// One image on one node. The names are shared (`Arc<str>`): a caller keeping a key per pair of a
/// large fleet can hand every key of one node the same name instead of a copy each.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PullKey {
    /// CachedImage name.
    pub image: Arc<str>,
    /// Node name.
    pub node: Arc<str>,
}

impl PullKey {
    /// A key with names of its own.
    pub fn new(image: &str, node: &str) -> Self {
        Self {
            image: image.into(),
            node: node.into(),
        }
    }
}

/// A node that should hold an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Which image on which node.
    pub key: PullKey,
    /// The image's priority (lower first).
    pub priority: i32,
    /// The policy pacing it.
    pub policy: PolicyKey,
    /// The registry it is pulled from.
    pub registry: Registry,
}

/// What happened to one image on one node so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// When its last pull started.
    pub last_start: Option<Timestamp>,
    /// When a pull last succeeded.
    pub last_success: Option<Timestamp>,
    /// When a pull last failed.
    pub last_failure: Option<Timestamp>,
    /// Failures in a row since the last success.
    pub consecutive_failures: u32,
}

/// Where the engine finds each (image, node) pair's [`History`]: a map of histories, or a caller's
/// own store that keeps a history beside other things it knows of the pair. A pair with none has
/// never been pulled.
pub trait Histories: std::fmt::Debug {
    /// The history of `key`, if there is one (by value: a store may keep it in another form).
    fn history(&self, key: &PullKey) -> Option<History>;
}

impl Histories for BTreeMap<PullKey, History> {
    fn history(&self, key: &PullKey) -> Option<History> {
        self.get(key).cloned()
    }
}

/// A pull under way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight {
    /// Which image on which node.
    pub key: PullKey,
    /// The policy it was started under (it counts against that policy until it ends).
    pub policy: PolicyKey,
    /// The registry it pulls from (it counts against that registry's budget until it ends).
    pub registry: Registry,
    /// When it started.
    pub started: Timestamp,
}

impl InFlight {
    /// Reads a pull back from its Pod (after a restart): who, under which policy, since when.
    /// `None` for a Pod that is not a pull Pod.
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let view = podbuilder::PullPodView::of(pod)?;
        Some(Self {
            key: PullKey::new(&view.image, &view.node),
            policy: view.policy.map(Arc::from),
            registry: crate::api::registry_of(&view.reference).into(),
            started: view.created,
        })
    }
}

/// Everything the engine looks at.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    /// The current time.
    pub now: Timestamp,
    /// The pace of each policy in use; a policy missing here paces with [`Pace::builtin`].
    pub paces: &'a BTreeMap<PolicyKey, Pace>,
    /// The (image, node) pairs that should hold their image. A caller may leave out targets it
    /// knows are not due before `now` (cached with no re-pull due, waiting out a backoff), provided
    /// it reports their latest start per policy in `earlier_starts`.
    pub targets: &'a [&'a Target],
    /// The latest pull start under each policy among targets left out of `targets`; they still
    /// space the next start.
    pub earlier_starts: &'a BTreeMap<PolicyKey, Timestamp>,
    /// Pulls under way.
    pub in_flight: &'a [InFlight],
    /// Past pulls, per (image, node).
    pub history: &'a dyn Histories,
    /// How long a pull may take before it counts as failed.
    pub pull_timeout: Duration,
    /// The most pulls in flight per registry, across every policy and image; a registry missing
    /// here has no budget of its own.
    pub registry_budgets: &'a BTreeMap<Registry, u32>,
}

/// What to do now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Pulls to start now, in order.
    pub start: Vec<PullKey>,
    /// Pulls in flight past the pull timeout: fail them.
    pub timed_out: Vec<PullKey>,
    /// The next instant at which deciding again could start something (besides pulls ending).
    pub wake_at: Option<Timestamp>,
    /// Per policy held back only by its `minDelayBetweenPulls`, the target it starts next and when:
    /// the one image that needs waking then (the others' targets wait behind it).
    pub next_in_line: Vec<(PullKey, Timestamp)>,
    /// Due pulls that their policy would start now but their registry's budget holds back, with
    /// that registry: they start when one of its pulls ends (which re-runs the decision).
    pub registry_held: Vec<(PullKey, Registry)>,
}

/// Why a due pull is wanted: a node lacking the image comes before a refresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Need {
    Missing,
    Refresh,
}

/// `t + d`, saturating at the end of time.
pub fn after(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_add(d).unwrap_or(Timestamp::MAX)
}

/// When a target not in flight is next due under `pace`; `None` if it needs nothing (cached, no
/// re-pull). A caller can keep this per target between decisions and leave out of
/// [`Input::targets`] what is not due yet.
pub fn next_due(h: &History, pace: &Pace, now: Timestamp) -> Option<Timestamp> {
    due(h, pace, now).map(|(at, _)| at)
}

/// When a target not in flight is due, and why; `None` if it needs nothing (cached, no re-pull).
fn due(h: &History, pace: &Pace, now: Timestamp) -> Option<(Timestamp, Need)> {
    let need = if h.last_success.is_some() {
        Need::Refresh
    } else {
        Need::Missing
    };
    if h.consecutive_failures > 0 {
        let since = h.last_failure.or(h.last_start).unwrap_or(now);
        return Some((after(since, pace.retry_delay(h.consecutive_failures)), need));
    }
    match (h.last_success, pace.repull_interval) {
        (None, _) => Some((now, Need::Missing)),
        (Some(ok), Some(every)) => Some((after(ok, every), Need::Refresh)),
        (Some(_), None) => None,
    }
}

/// What one image's targets can contribute to a decision while nothing about them changes: see
/// [`leaders`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leaders {
    /// Indices (into the targets handed to [`leaders`]) of the due targets not in flight that the
    /// engine would start first, in its order, at most the limit.
    pub first: Vec<usize>,
    /// When a target not due at `now` becomes due: until then the due set, and so `first`, stays
    /// as it is (`None`: never by itself).
    pub until: Option<Timestamp>,
    /// The latest pull start among the targets.
    pub last_start: Option<Timestamp>,
}

/// The targets of one image that a decision could start first, for a caller that keeps them between
/// decisions. No decision starts more than `max_concurrent` pulls of one policy, so an image whose
/// targets share one pace (one image, one policy) never has more than that many started at once; the
/// engine takes them in its own order. A caller may therefore hand the engine only `first` of such an
/// image (reporting `last_start` in [`Input::earlier_starts`]) in place of all its targets, and get
/// the same starts, for as long as the image's history and pulls in flight are unchanged and
/// `until` has not passed.
pub fn leaders(
    targets: &[Target],
    history: &impl Histories,
    in_flight: impl Fn(&PullKey) -> bool,
    pace: &Pace,
    now: Timestamp,
) -> Leaders {
    let mut out = Leaders::default();
    let mut due_now: Vec<(Need, i32, &PullKey, usize)> = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let h = &history.history(&t.key).unwrap_or_default();
        out.last_start = out.last_start.max(h.last_start);
        if in_flight(&t.key) {
            continue;
        }
        let Some((at, need)) = due(h, pace, now) else {
            continue;
        };
        if at <= now {
            due_now.push((need, t.priority, &t.key, i));
        } else {
            out.until = Some(out.until.map_or(at, |u| u.min(at)));
        }
    }
    due_now.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    let limit = usize::try_from(pace.max_concurrent).unwrap_or(usize::MAX);
    out.first = due_now.iter().take(limit).map(|d| d.3).collect();
    out
}

/// Records a start under `policy`, keeping the latest.
fn note_start<'a>(
    map: &mut BTreeMap<&'a PolicyKey, Timestamp>,
    policy: &'a PolicyKey,
    at: Timestamp,
) {
    map.entry(policy)
        .and_modify(|s| *s = (*s).max(at))
        .or_insert(at);
}

/// How many more pulls each policy may start now, given its pulls in flight. No decision starts
/// more than that under a policy. So a caller may leave out of [`Input::targets`] the targets of a
/// policy with none free, at the price of their wake-ups (a caller deciding for one image should
/// keep that image's own targets, so that it still wakes when a backoff or re-pull falls due); and
/// of an image's [`Leaders::first`] it may hand the engine only as many as its policy has free.
#[derive(Debug)]
pub struct FreeSlots<'a> {
    paces: &'a BTreeMap<PolicyKey, Pace>,
    flying: BTreeMap<&'a PolicyKey, u32>,
}

impl<'a> FreeSlots<'a> {
    /// Counts `in_flight` by policy.
    pub fn new(paces: &'a BTreeMap<PolicyKey, Pace>, in_flight: &'a [InFlight]) -> Self {
        let mut flying: BTreeMap<&PolicyKey, u32> = BTreeMap::new();
        for f in in_flight {
            *flying.entry(&f.policy).or_default() += 1;
        }
        Self { paces, flying }
    }

    /// The pulls `policy` may still start (the built-in pace for a policy `paces` does not know).
    pub fn of(&self, policy: &PolicyKey) -> usize {
        let builtin = Pace::builtin();
        let limit = self.paces.get(policy).unwrap_or(&builtin).max_concurrent;
        let taken = self.flying.get(policy).copied().unwrap_or(0);
        usize::try_from(limit.saturating_sub(taken)).unwrap_or(usize::MAX)
    }
}

/// Decides which pulls start now.
pub fn decide(input: &Input<'_>) -> Decision {
    let builtin = Pace::builtin();
    let pace_of = |p: &PolicyKey| input.paces.get(p).unwrap_or(&builtin);
    let now = input.now;
    let mut decision = Decision::default();
    let mut wake: Option<Timestamp> = None;
    let mut wake_at = |t: Timestamp| wake = Some(wake.map_or(t, |w| w.min(t)));
    let mut next_in_line: BTreeMap<&PolicyKey, (PullKey, Timestamp)> = BTreeMap::new();

    let mut count: BTreeMap<&PolicyKey, u32> = BTreeMap::new();
    let mut at_registry: BTreeMap<&Registry, u32> = BTreeMap::new();
    let mut last_start: BTreeMap<&PolicyKey, Timestamp> = BTreeMap::new();
    for (policy, at) in input.earlier_starts {
        note_start(&mut last_start, policy, *at);
    }
    let mut flying: Vec<&InFlight> = input.in_flight.iter().collect();
    flying.sort_by(|a, b| a.key.cmp(&b.key));
    let flying_keys: BTreeSet<&PullKey> = flying.iter().map(|f| &f.key).collect();
    for f in &flying {
        *count.entry(&f.policy).or_default() += 1;
        *at_registry.entry(&f.registry).or_default() += 1;
        note_start(&mut last_start, &f.policy, f.started);
        let deadline = after(f.started, input.pull_timeout);
        if deadline <= now {
            decision.timed_out.push(f.key.clone());
        } else {
            wake_at(deadline);
        }
    }
    let mut due_now: Vec<(Need, i32, &Target)> = Vec::new();
    for t in input.targets {
        let h = &input.history.history(&t.key).unwrap_or_default();
        if let Some(s) = h.last_start {
            note_start(&mut last_start, &t.policy, s);
        }
        if flying_keys.contains(&t.key) {
            continue;
        }
        match due(h, pace_of(&t.policy), now) {
            Some((at, need)) if at <= now => due_now.push((need, t.priority, t)),
            Some((at, _)) => wake_at(at),
            None => {}
        }
    }
    due_now.sort_by(|a, b| (a.0, a.1, &a.2.key).cmp(&(b.0, b.1, &b.2.key)));
    due_now.dedup_by(|a, b| a.2.key == b.2.key);

    for (_, _, t) in due_now {
        let pace = pace_of(&t.policy);
        let in_flight = count.get(&t.policy).copied().unwrap_or(0);
        if in_flight >= pace.max_concurrent {
            continue; // a pull ending (a Pod event) re-runs the decision
        }
        if let Some(last) = last_start.get(&t.policy) {
            let next = after(*last, pace.min_delay);
            if next > now {
                wake_at(next);
                next_in_line
                    .entry(&t.policy)
                    .or_insert_with(|| (t.key.clone(), next));
                continue;
            }
        }
        let pulling_there = at_registry.get(&t.registry).copied().unwrap_or(0);
        if let Some(budget) = input.registry_budgets.get(&t.registry)
            && pulling_there >= *budget
        {
            // A pull from that registry ending (a Pod event) re-runs the decision.
            decision
                .registry_held
                .push((t.key.clone(), Arc::clone(&t.registry)));
            continue;
        }
        decision.start.push(t.key.clone());
        *count.entry(&t.policy).or_default() += 1;
        *at_registry.entry(&t.registry).or_default() += 1;
        last_start.insert(&t.policy, now);
    }
    decision.wake_at = wake;
    decision.next_in_line = next_in_line.into_values().collect();
    decision
}

#[cfg(test)]
mod tests;
