//! The operator's one pacing state, shared by every CachedImage reconcile. The decisions themselves are
//! the pure engine's ([`crate::pacing::decide`]); this module only keeps what the engine needs between
//! reconciles: every image's targets, the pulls in flight, and what happened on each node.
//!
//! A reconcile of one image hands in what it observed (its target nodes, its pull Pods), and gets back
//! which of its Pods to keep, which pulls it may start now, and when to look again. When the engine
//! decides that *another* image should start a pull, that image is woken through a channel, so the
//! global order (priority, then name) holds no matter which image happened to reconcile.

use super::presence::Listed;
use super::status::{Blocked, NodeState, Observed};
use super::targets;
use crate::api::{CachedImage, CachedImageStatus, PullPolicySpec};
use crate::pacing::{self, History, InFlight, Pace, PolicyKey, PullKey, Target};
use crate::podbuilder::{PullOutcome, PullPodView};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// How long a pull just started may stay unseen in the Pod cache before it counts as gone.
const CREATION_GRACE: Duration = Duration::from_secs(30);
/// Failure reason of a pull whose Pod was deleted by someone else while it pulled.
pub const POD_DELETED: &str = "PullPodDeleted";
/// Failure reason of a pull whose Pod never appeared (its creation failed or was refused).
pub const POD_MISSING: &str = "PullPodMissing";
/// Failure reason of a pull whose Pod the API server refused to create (an admission policy or
/// webhook, a ResourceQuota).
pub const POD_REFUSED: &str = "PullPodRefused";

/// What one reconcile of an image hands in.
#[derive(Clone, Debug)]
pub struct Step<'a> {
    /// The current time.
    pub now: Timestamp,
    /// The image.
    pub image: &'a CachedImage,
    /// Its target nodes.
    pub targets: &'a [String],
    /// Its policy's pace, or why it has none.
    pub pace: Result<(PolicyKey, Pace), Blocked>,
    /// Its policy, if it names one that exists (its node selector and tolerations choose targets).
    pub policy: Option<&'a PullPolicySpec>,
    /// Its pull Pods.
    pub pods: &'a [PullPodView],
    /// Every CachedImage that exists and is not being deleted, with the policy it names. No pull
    /// starts under a policy until every image using that policy has told the pacer its targets, so
    /// the first image to reconcile (after a start, or after its policy appears) cannot jump the
    /// queue. An image missing here is forgotten.
    pub known_images: &'a [(String, PolicyKey)],
}

/// A pull that ended since the last reconcile.
#[derive(Clone, Debug, PartialEq)]
pub enum Ended {
    /// Pulled, after this long.
    Pulled(Duration),
    /// Failed, for this reason.
    Failed(String),
}

/// What the reconcile should do.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Pods to keep (pulls in flight).
    pub keep: Vec<String>,
    /// Pulls to start now: (node, attempt).
    pub start: Vec<(String, u32)>,
    /// When to reconcile again, at the latest: only for this image's own reasons (its next pull
    /// when it is next in line, a backoff or re-pull falling due, a pull timing out).
    pub wake_at: Option<Timestamp>,
    /// Other images to wake later: each is next in line under its policy at that time. Waking
    /// only the image whose pull can start, rather than every image with a pull waiting, keeps a
    /// paced rollout at a few reconciles per pull.
    pub wake_others: Vec<(String, Timestamp)>,
    /// Pulls that ended since last time.
    pub ended: Vec<Ended>,
    /// The input of the status.
    pub observed: Observed,
}

/// A [`History`] in 32 bytes rather than 80: its times as nanoseconds since the Unix epoch (exact
/// from 1677 to 2262; times beyond are clamped), [`Packed::NONE`] for none. At a million pairs the
/// difference is 46 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Packed {
    last_start: i64,
    last_success: i64,
    last_failure: i64,
    consecutive_failures: u32,
}

impl Default for Packed {
    fn default() -> Self {
        Self {
            last_start: Self::NONE,
            last_success: Self::NONE,
            last_failure: Self::NONE,
            consecutive_failures: 0,
        }
    }
}

impl Packed {
    const NONE: i64 = i64::MIN;

    fn pack(t: Option<Timestamp>) -> i64 {
        let Some(t) = t else { return Self::NONE };
        let ns = t.as_nanosecond();
        i64::try_from(ns).unwrap_or(if ns < 0 { Self::NONE + 1 } else { i64::MAX })
    }

    fn unpack(ns: i64) -> Option<Timestamp> {
        (ns != Self::NONE).then(|| Timestamp::from_nanosecond(i128::from(ns)).ok())?
    }

    fn history(&self) -> History {
        History {
            last_start: Self::unpack(self.last_start),
            last_success: Self::unpack(self.last_success),
            last_failure: Self::unpack(self.last_failure),
            consecutive_failures: self.consecutive_failures,
        }
    }

    fn set_start(&mut self, t: Timestamp) {
        self.last_start = Self::pack(Some(t));
    }

    fn set_success(&mut self, t: Option<Timestamp>) {
        self.last_success = Self::pack(t);
    }

    fn set_failure(&mut self, t: Timestamp) {
        self.last_failure = Self::pack(Some(t));
    }
}

/// What the pacer knows of one image on one node: its pull history and the rest.
#[derive(Debug, Default, PartialEq)]
struct Pair {
    history: Packed,
    attempts: u32,
    /// Cached with the image's current reference (a new reference drops the image's memory of
    /// every node, so no other reference can be cached here).
    cached: bool,
    /// The last failure's reason and message; boxed, as most nodes never fail.
    last_failure: Option<Box<(String, String)>>,
    /// The node has listed the image since it was last pulled there.
    listed: bool,
    /// The node has since stopped listing it (with room in its list): it is gone.
    gone: bool,
}

#[derive(Default)]
struct ImageMemory {
    reference: Option<String>,
    consecutive_failures: u32,
    seen: BTreeSet<String>,
    digest: Option<String>,
    /// Written by the image's own reconcile; `None` until its first.
    due: Option<DueSummary>,
}

/// One shared copy of each image and node name the pacer's keys use, so a million (image, node)
/// keys hold references to a few thousand names rather than two strings each.
#[derive(Default)]
struct Names(HashSet<Arc<str>>);

impl Names {
    /// The shared copy of `name`, made if there is none.
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.0.get(name) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = name.into();
        self.0.insert(Arc::clone(&shared));
        shared
    }

    /// The key of `image` on `node`, with shared names.
    fn key(&mut self, image: &str, node: &str) -> PullKey {
        PullKey {
            image: self.get(image),
            node: self.get(node),
        }
    }

    /// Lets go of the names no key uses any more.
    fn sweep(&mut self) {
        self.0.retain(|name| Arc::strong_count(name) > 1);
    }
}

/// Every pair's [`Pair`], by image, then node; the engine reads the histories in it. An image's
/// map is rebuilt whole when its targets change ([`Pairs::fit`]): built in one go from sorted keys,
/// its tree nodes are full, where one grown by inserting in order is about half empty.
#[derive(Debug, Default)]
struct Pairs(BTreeMap<Arc<str>, BTreeMap<Arc<str>, Pair>>);

impl Pairs {
    fn get(&self, k: &PullKey) -> Option<&Pair> {
        self.0.get(&k.image)?.get(&k.node)
    }

    fn get_mut(&mut self, image: &str, node: &str) -> Option<&mut Pair> {
        self.0.get_mut(image)?.get_mut(node)
    }

    /// The pair of `k`, made if there is none.
    fn entry(&mut self, k: &PullKey) -> &mut Pair {
        self.0
            .entry(Arc::clone(&k.image))
            .or_default()
            .entry(Arc::clone(&k.node))
            .or_default()
    }

    fn forget(&mut self, image: &str) {
        self.0.remove(image);
    }

    /// Gives `image` a pair on each of its `targets` (sorted by node) and none elsewhere, keeping
    /// what it knew of the nodes that stay.
    fn fit(&mut self, image: &Arc<str>, targets: &[Target]) {
        let mut old = self
            .0
            .remove(image)
            .unwrap_or_default()
            .into_iter()
            .peekable();
        let fitted: BTreeMap<Arc<str>, Pair> = targets
            .iter()
            .map(|t| {
                while old.next_if(|(node, _)| *node < t.key.node).is_some() {}
                let pair = old
                    .next_if(|(node, _)| *node == t.key.node)
                    .map(|(_, pair)| pair)
                    .unwrap_or_default();
                (Arc::clone(&t.key.node), pair)
            })
            .collect();
        self.0.insert(Arc::clone(image), fitted);
    }

    /// Removes `image`'s pairs on nodes outside `targets`; whether there were any. `fitted`: the
    /// image's pairs were fitted to these targets (and none removed since), so they are all there
    /// and any beyond their number are the ones to go.
    fn prune(&mut self, image: &str, targets: &BTreeSet<&str>, fitted: bool) -> bool {
        let Some(pairs) = self.0.get_mut(image) else {
            return false;
        };
        if fitted && pairs.len() == targets.len() {
            return false;
        }
        let before = pairs.len();
        pairs.retain(|node, _| targets.contains(&**node));
        pairs.len() != before
    }

    /// The key of every pair that holds more than a fresh one.
    fn remembered(&self) -> impl Iterator<Item = PullKey> {
        self.0.iter().flat_map(|(image, pairs)| {
            pairs
                .iter()
                .filter(|(_, p)| **p != Pair::default())
                .map(|(node, _)| PullKey {
                    image: Arc::clone(image),
                    node: Arc::clone(node),
                })
        })
    }
}

impl pacing::Histories for Pairs {
    fn history(&self, key: &PullKey) -> Option<History> {
        self.get(key).map(|p| p.history.history())
    }
}

/// What the other images' decisions need to know of an image until it reconciles again. Only its
/// own reconcile changes its history and its pulls in flight, so this stays true until then (a
/// refused pull, recorded outside a reconcile, clears it).
type DueSummary = pacing::Leaders;

#[derive(Default)]
struct State {
    paces: BTreeMap<PolicyKey, Pace>,
    /// The policies images named at their last reconcile, to tell which images a Node change
    /// concerns.
    policies: BTreeMap<String, PullPolicySpec>,
    targets: BTreeMap<String, Vec<Target>>,
    in_flight: BTreeMap<PullKey, InFlight>,
    /// Pulls in flight whose Pod has been seen pulling: the start of that pull. A pull that was
    /// seen and is no longer shown has lost its Pod; one never seen may still be on its way.
    seen_pulling: BTreeMap<PullKey, Timestamp>,
    /// One entry per (image, node) pair with anything to remember (one map, so each pair's key is
    /// held once: at a million pairs, the pacer's memory is mostly these).
    pairs: Pairs,
    /// The names in the keys above and in `targets`.
    names: Names,
    images: BTreeMap<String, ImageMemory>,
    /// Images told (through [`Outcome::wake_others`]) to wake at a time, until they reconcile.
    appointed: BTreeMap<String, Timestamp>,
}

/// The shared pacing state.
pub struct Pacer {
    state: Mutex<State>,
    wake: UnboundedSender<ObjectRef<CachedImage>>,
    pull_timeout: Duration,
}

impl Pacer {
    /// A pacer waking images through `wake`, failing pulls that take longer than `pull_timeout`.
    pub fn new(wake: UnboundedSender<ObjectRef<CachedImage>>, pull_timeout: Duration) -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake,
            pull_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pulls in flight over all images.
    pub fn active_pulls(&self) -> usize {
        self.lock().in_flight.len()
    }

    /// The images whose targets a change of `node` (created, relabelled, tainted, deleted) alters:
    /// those for which it was a target at their last reconcile and is not now, or the reverse.
    /// Images the pacer cannot judge (not reconciled yet, blocked, naming a policy it has not seen)
    /// are named too. Every other image is left alone, so a node joining a large fleet wakes only
    /// the images that go to it.
    pub fn retargeted_by(
        &self,
        node: &Node,
        images: &[Arc<CachedImage>],
    ) -> Vec<ObjectRef<CachedImage>> {
        let st = self.lock();
        let name = node.name_any();
        images
            .iter()
            .filter(|image| {
                let Some(known) = st.targets.get(&image.name_any()) else {
                    return true;
                };
                let policy = match &image.spec.policy_ref {
                    None => None,
                    Some(r) => match st.policies.get(&r.name) {
                        Some(p) => Some(p),
                        None => return true,
                    },
                };
                let was = known
                    .binary_search_by(|t| (*t.key.node).cmp(name.as_str()))
                    .is_ok();
                was != targets::is_target(node, &image.spec, policy)
            })
            .map(|image| ObjectRef::from_obj(image.as_ref()))
            .collect()
    }

    /// The images a change of `node`'s image list says are gone from it: cached there (and listed
    /// by the node since their pull), now missing from a list with room for them. They are marked
    /// to be pulled again and named, to be woken. `max_images` is the kubelet's
    /// `nodeStatusMaxImages`. An image listed for the first time since its pull is only noted.
    pub fn node_images_changed(&self, node: &Node, max_images: i32) -> Vec<ObjectRef<CachedImage>> {
        let mut st = self.lock();
        let st = &mut *st;
        let name = node.name_any();
        let mut gone = Vec::new();
        for (image, memory) in &st.images {
            let Some(reference) = memory.reference.as_deref() else {
                continue;
            };
            let Some(mem) = st.pairs.get_mut(image, &name) else {
                continue;
            };
            if !mem.cached || mem.gone {
                continue;
            }
            let names = super::presence::names(reference, memory.digest.as_deref());
            match super::presence::listed(node, &names, max_images) {
                Listed::Yes => mem.listed = true,
                Listed::No if mem.listed => {
                    mem.gone = true;
                    gone.push(ObjectRef::new(image));
                }
                Listed::No | Listed::Unknown => {}
            }
        }
        gone
    }

    /// How many (image, node) pairs the pacer remembers anything about.
    pub fn remembered_pairs(&self) -> usize {
        let st = self.lock();
        let mut keys: BTreeSet<PullKey> = st.pairs.remembered().collect();
        keys.extend(st.in_flight.keys().cloned());
        keys.extend(st.seen_pulling.keys().cloned());
        keys.len()
    }

    /// A pull this pacer started on `node` for `image` never began: the API server refused its Pod.
    /// It fails like a pull that failed (its slot is freed, it backs off), and the image is woken so
    /// its status says why.
    pub fn refused(&self, image: &str, node: &str, message: &str, now: Timestamp) {
        let mut st = self.lock();
        let k = PullKey::new(image, node);
        if st.in_flight.remove(&k).is_none() {
            return;
        }
        st.seen_pulling.remove(&k);
        record_failure(&mut st, &k, now, POD_REFUSED, message);
        if let Some(m) = st.images.get_mut(image) {
            m.due = None;
        }
        drop(st);
        let _ = self.wake.send(ObjectRef::new(image));
    }

    /// Forgets an image that is deleted or being deleted. The other images under its policy are
    /// woken: it may have been next in line, the one they were waiting behind.
    pub fn forget(&self, image: &str) {
        let mut st = self.lock();
        let policy = st
            .targets
            .get(image)
            .and_then(|ts| ts.first())
            .map(|t| t.policy.clone());
        forget(&mut st, image);
        let Some(policy) = policy else { return };
        let others: Vec<String> = st
            .targets
            .iter()
            .filter(|(_, ts)| ts.first().is_some_and(|t| t.policy == policy))
            .map(|(name, _)| name.clone())
            .collect();
        drop(st);
        for other in others {
            self.wake(&other);
        }
    }

    /// Wakes `image` now.
    pub fn wake(&self, image: &str) {
        let _ = self.wake.send(ObjectRef::new(image));
    }

    /// One reconcile's worth of bookkeeping and decision.
    pub fn step(&self, step: &Step<'_>) -> Outcome {
        let name = step.image.name_any();
        let reference = step.image.spec.reference();
        let now = step.now;
        let mut st = self.lock();
        let st = &mut *st;
        st.appointed.remove(&name);

        // Images the cache no longer has (a deletion the watch missed while it re-listed, so no
        // `deleted` call came) leave with everything they held: their slots, their due pulls.
        if st.targets.len() > step.known_images.len() {
            let known: BTreeSet<&str> = step.known_images.iter().map(|(n, _)| n.as_str()).collect();
            let gone: Vec<String> = st
                .targets
                .keys()
                .filter(|n| **n != name && !known.contains(n.as_str()))
                .cloned()
                .collect();
            for image in gone {
                forget(st, &image);
            }
        }
        // First sight of this image (operator start): take back what its status recorded.
        if !st.images.contains_key(&name) {
            restore(st, step.image, &reference, now);
        }
        // A new reference (a tag or digest edit): nothing of the old one counts as cached.
        let memory = st.images.entry(name.clone()).or_default();
        if memory.reference.as_deref() != Some(reference.as_str()) {
            memory.reference = Some(reference.clone());
            memory.consecutive_failures = 0;
            memory.digest = None;
            st.pairs.forget(&name);
            // Registered again below, which gives it a fresh pair on each target.
            st.targets.remove(&name);
        }

        let targets: BTreeSet<&str> = step.targets.iter().map(String::as_str).collect();
        if let (Ok((Some(policy), _)), Some(spec)) = (&step.pace, step.policy)
            && st.policies.get(policy) != Some(spec)
        {
            st.policies.insert(policy.clone(), spec.clone());
        }
        match &step.pace {
            Ok((policy, pace)) => {
                st.paces.insert(policy.clone(), pace.clone());
                let priority = step.image.spec.priority.unwrap_or(0);
                // Most reconciles see the targets they registered last time: keep those.
                let unchanged = st.targets.get(&name).is_some_and(|ts| {
                    ts.len() == targets.len()
                        && ts.iter().zip(&targets).all(|(t, n)| {
                            &*t.key.node == *n && t.priority == priority && t.policy == *policy
                        })
                });
                if !unchanged {
                    let image = st.names.get(&name);
                    let registered: Vec<Target> = targets
                        .iter()
                        .map(|n| Target {
                            key: PullKey {
                                image: Arc::clone(&image),
                                node: st.names.get(n),
                            },
                            priority,
                            policy: policy.clone(),
                        })
                        .collect();
                    st.pairs.fit(&image, &registered);
                    st.targets.insert(name.clone(), registered);
                    st.names.sweep();
                }
            }
            Err(_) => {
                st.targets.remove(&name);
            }
        }

        // What the Pods say.
        let mut keep = Vec::new();
        let mut ended = Vec::new();
        let mut observed_uids = BTreeSet::new();
        let mut observed_keys = BTreeSet::new();
        for pod in step.pods {
            observed_uids.insert(pod.uid.clone());
            let k = st.names.key(&name, &pod.node);
            let mem = st.pairs.entry(&k);
            mem.attempts = mem.attempts.max(pod.attempt);
            let current = targets.contains(pod.node.as_str()) && pod.reference == reference;
            // An ended pull is recorded once, however many reconciles still see its Pod.
            let ended_pull = !matches!(pod.outcome, PullOutcome::Pulling);
            let first_sight = ended_pull
                && st
                    .images
                    .entry(name.clone())
                    .or_default()
                    .seen
                    .insert(pod.uid.clone());
            match &pod.outcome {
                PullOutcome::Pulling if current => {
                    observed_keys.insert(k.clone());
                    st.seen_pulling.insert(k.clone(), pod.created);
                    st.in_flight.insert(
                        k.clone(),
                        InFlight {
                            key: k,
                            policy: step
                                .pace
                                .as_ref()
                                .ok()
                                .map(|(p, _)| p.clone())
                                .unwrap_or_default(),
                            started: pod.created,
                        },
                    );
                    keep.push(pod.name.clone());
                }
                PullOutcome::Pulled { digest } if current && first_sight => {
                    let mem = st.pairs.entry(&k);
                    mem.history.set_success(Some(now));
                    mem.history.consecutive_failures = 0;
                    mem.cached = true;
                    mem.last_failure = None;
                    let image = st.images.entry(name.clone()).or_default();
                    image.consecutive_failures = 0;
                    if digest.is_some() {
                        image.digest = digest.clone();
                    }
                    st.in_flight.remove(&k);
                    let took = now.duration_since(pod.created).unsigned_abs();
                    ended.push(Ended::Pulled(took));
                }
                PullOutcome::Failed { reason, message } if current && first_sight => {
                    record_failure(st, &k, now, reason, message);
                    st.in_flight.remove(&k);
                    ended.push(Ended::Failed(reason.clone()));
                }
                _ if !current
                    // Its node left the targets, or the image now has another reference: the Pod
                    // goes (it is not kept), and so does its place in flight.
                    && st
                        .in_flight
                        .get(&k)
                        .is_some_and(|f| f.started == pod.created) =>
                {
                    st.in_flight.remove(&k);
                }
                _ => {}
            }
        }
        if let Some(image) = st.images.get_mut(&name) {
            image.seen.retain(|uid| observed_uids.contains(uid));
        }
        forget_gone(st, &name);
        let grace_ends = settle_unseen(st, &name, &targets, &observed_keys, now, &mut ended);
        // Nodes that are no longer targets (gone, relabelled, tainted) take their memory along, so
        // the state follows the fleet instead of everything it ever was.
        let fitted = step.pace.is_ok();
        if st.pairs.prune(&name, &targets, fitted) {
            st.names.sweep();
        }

        // Decide over this image (its wake-up needs its own targets) and the other images that may
        // start a pull now: not those whose policy has every slot taken, and of the others only
        // the targets they could start first ([`pacing::leaders`]: none for those with nothing
        // due, which only space the starts of their policy). Each image's own reconcile woke it for
        // its next due time. This keeps a reconcile's cost near its own targets' instead of the
        // whole fleet's.
        let in_flight: Vec<InFlight> = st.in_flight.values().cloned().collect();
        let full = pacing::saturated(&st.paces, &in_flight);
        let mut due_targets: Vec<&Target> = Vec::new();
        let mut earlier_starts: BTreeMap<PolicyKey, Timestamp> = BTreeMap::new();
        for (image, targets) in &st.targets {
            if *image != name && targets.first().is_some_and(|t| full.contains(&t.policy)) {
                continue;
            }
            let summary = st.images.get(image).and_then(|m| m.due.as_ref());
            match summary {
                // Its due set is as its last reconcile left it: only the few it could start first
                // can start now (none if nothing is due; in a rollout, a handful instead of every
                // node), and its latest start still spaces its policy's next one.
                Some(due) if *image != name && due.until.is_none_or(|t| t > now) => {
                    if let (Some(at), Some(t)) = (due.last_start, targets.first()) {
                        let latest = earlier_starts.entry(t.policy.clone()).or_insert(at);
                        *latest = (*latest).max(at);
                    }
                    due_targets.extend(due.first.iter().filter_map(|&i| targets.get(i)));
                }
                _ => due_targets.extend(targets),
            }
        }
        let decision = pacing::decide(&pacing::Input {
            now,
            paces: &st.paces,
            targets: &due_targets,
            earlier_starts: &earlier_starts,
            in_flight: &in_flight,
            history: &st.pairs,
            pull_timeout: self.pull_timeout,
        });
        let mut wake = BTreeSet::new();
        // Policies some of whose images have not registered their targets yet: hold their starts
        // and wake those images.
        let mut held: BTreeSet<PolicyKey> = BTreeSet::new();
        for (image, policy) in step.known_images {
            if !st.targets.contains_key(image) && st.paces.contains_key(policy) && *image != name {
                held.insert(policy.clone());
                wake.insert(image.clone());
            }
        }
        let mut decision = decision;
        decision.start.retain(|k| {
            let policy = st.targets.get(&*k.image).and_then(|ts| ts.first());
            policy.is_none_or(|t| !held.contains(&t.policy))
        });
        for k in &decision.timed_out {
            if *k.image == *name {
                let message = format!("no pull outcome after {}s", self.pull_timeout.as_secs());
                record_failure(st, k, now, "PullTimeout", &message);
                st.in_flight.remove(k);
                keep.retain(|p| !step.pods.iter().any(|v| &v.name == p && *v.node == *k.node));
                ended.push(Ended::Failed("PullTimeout".into()));
            } else {
                wake.insert(k.image.to_string());
            }
        }
        let mut start = Vec::new();
        for k in &decision.start {
            if *k.image != *name {
                wake.insert(k.image.to_string());
                continue;
            }
            let mem = st.pairs.entry(k);
            mem.attempts += 1;
            mem.listed = false;
            mem.history.set_start(now);
            let attempt = mem.attempts;
            let policy = step
                .pace
                .as_ref()
                .ok()
                .map(|(p, _)| p.clone())
                .unwrap_or_default();
            st.in_flight.insert(
                k.clone(),
                InFlight {
                    key: k.clone(),
                    policy,
                    started: now,
                },
            );
            start.push((k.node.to_string(), attempt));
        }
        // Who wakes when the policy's delay ends: the image next in line, no other.
        let mut wake_at = grace_ends;
        let mut wake_others = Vec::new();
        for (k, t) in &decision.next_in_line {
            if *k.image == *name {
                wake_at = earliest(wake_at, *t);
            } else if !wake.contains(&*k.image) && st.appointed.get(&*k.image).is_none_or(|a| a > t)
            {
                st.appointed.insert(k.image.to_string(), *t);
                wake_others.push((k.image.to_string(), *t));
            }
        }
        for image in wake {
            let _ = self.wake.send(ObjectRef::new(&image));
        }
        let due = match (&step.pace, st.targets.get(&name)) {
            (Ok((_, pace)), Some(registered)) => Some(pacing::leaders(
                registered,
                &st.pairs,
                |k| st.in_flight.contains_key(k),
                pace,
                now,
            )),
            _ => None,
        };
        // Its own targets falling due (a backoff ending, a re-pull), and its pulls timing out.
        if let Some(until) = due.as_ref().and_then(|d| d.until) {
            wake_at = earliest(wake_at, until);
        }
        for (_, f) in of_image(&st.in_flight, &name) {
            wake_at = earliest(wake_at, pacing::after(f.started, self.pull_timeout));
        }
        st.images.entry(name.clone()).or_default().due = due;

        let observed = observe(st, &name, step);
        Outcome {
            keep,
            start,
            wake_at,
            wake_others,
            ended,
            observed,
        }
    }
}

fn earliest(a: Option<Timestamp>, b: Timestamp) -> Option<Timestamp> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// Drops everything about `image`.
fn forget(st: &mut State, image: &str) {
    st.targets.remove(image);
    st.images.remove(image);
    st.in_flight.retain(|k, _| &*k.image != image);
    st.seen_pulling.retain(|k, _| &*k.image != image);
    st.pairs.forget(image);
    st.appointed.remove(image);
    st.names.sweep();
}

/// Settles the image's pulls in flight that its Pods do not show: on a node that is no longer a
/// target, the pull is simply gone; a pull whose Pod was seen pulling and has disappeared failed
/// (someone deleted the Pod); a pull never seen is given [`CREATION_GRACE`] to appear (the cache may
/// lag behind the creation), then fails as well. A failure frees the slot and backs the node off like
/// any other. Returns when the earliest grace still running ends, so the image wakes to settle it.
fn settle_unseen(
    st: &mut State,
    name: &str,
    targets: &BTreeSet<&str>,
    observed: &BTreeSet<PullKey>,
    now: Timestamp,
    ended: &mut Vec<Ended>,
) -> Option<Timestamp> {
    let mut grace_ends: Option<Timestamp> = None;
    let unseen: Vec<(PullKey, Timestamp)> = of_image(&st.in_flight, name)
        .filter(|(k, _)| !observed.contains(*k))
        .map(|(k, f)| (k.clone(), f.started))
        .collect();
    for (k, started) in unseen {
        let was_seen = st.seen_pulling.get(&k) == Some(&started);
        let deadline = pacing::after(started, CREATION_GRACE);
        let failure = if !targets.contains(&*k.node) {
            None
        } else if was_seen {
            Some((
                POD_DELETED,
                "the pull Pod was deleted before it reported a result".to_owned(),
            ))
        } else if deadline <= now {
            Some((
                POD_MISSING,
                format!(
                    "the pull Pod did not appear within {}s (its creation may have been refused; see the image's Events)",
                    CREATION_GRACE.as_secs()
                ),
            ))
        } else {
            grace_ends = Some(grace_ends.map_or(deadline, |t| t.min(deadline)));
            continue;
        };
        if let Some((reason, message)) = failure {
            record_failure(st, &k, now, reason, &message);
            ended.push(Ended::Failed(reason.to_owned()));
        }
        st.in_flight.remove(&k);
    }
    let in_flight = &st.in_flight;
    st.seen_pulling
        .retain(|k, _| *k.image != *name || in_flight.contains_key(k));
    grace_ends
}

/// Nodes that no longer hold the image (see [`Pacer::node_images_changed`]) stop counting as cached,
/// so the image is pulled there again, paced like any missing node.
fn forget_gone(st: &mut State, image: &str) {
    let flying: BTreeSet<&str> = of_image(&st.in_flight, image)
        .map(|(k, _)| &*k.node)
        .collect();
    let Some(pairs) = st.pairs.0.get_mut(image) else {
        return;
    };
    for (node, m) in pairs.iter_mut() {
        if m.gone && !flying.contains(&**node) {
            tracing::info!(image, node = %node, "the node no longer lists the image: pulling it again");
            (m.cached, m.listed, m.gone) = (false, false, false);
            m.history.set_success(None);
        }
    }
}

/// `image`'s entries of a map keyed by (image, node), visiting no other image's.
fn of_image<'a, V>(
    map: &'a BTreeMap<PullKey, V>,
    image: &'a str,
) -> impl Iterator<Item = (&'a PullKey, &'a V)> {
    map.range(PullKey::new(image, "")..)
        .take_while(move |(k, _)| &*k.image == image)
}

fn record_failure(st: &mut State, k: &PullKey, now: Timestamp, reason: &str, message: &str) {
    let mem = st.pairs.entry(k);
    mem.history.consecutive_failures += 1;
    mem.history.set_failure(now);
    mem.last_failure = Some(Box::new((reason.to_owned(), message.to_owned())));
    st.images
        .entry(k.image.to_string())
        .or_default()
        .consecutive_failures += 1;
}

/// After an operator restart: cached nodes and failures come back from the image's status, provided
/// the status describes the current spec.
fn restore(st: &mut State, image: &CachedImage, reference: &str, now: Timestamp) {
    let name = image.name_any();
    let memory = st.images.entry(name.clone()).or_default();
    let Some(status) = image.status.as_ref() else {
        return;
    };
    if status.observed_generation != image.metadata.generation {
        return;
    }
    memory.reference = Some(reference.to_owned());
    memory.consecutive_failures = u32::try_from(status.consecutive_failures).unwrap_or(0);
    memory.digest = status.resolved_digest.clone();
    let pulled = status.last_pulled_at.as_ref().map_or(now, |t| t.0);
    for node in &status.cached_nodes {
        let k = st.names.key(&name, node);
        let mem = st.pairs.entry(&k);
        mem.history.set_success(Some(pulled));
        mem.cached = true;
    }
    restore_failures(st, &name, status, now);
}

fn restore_failures(st: &mut State, name: &str, status: &CachedImageStatus, now: Timestamp) {
    let failed_at = status.last_attempted_at.as_ref().map_or(now, |t| t.0);
    for f in &status.failed_nodes {
        let k = st.names.key(name, &f.node);
        let mem = st.pairs.entry(&k);
        mem.history.consecutive_failures =
            u32::try_from(status.consecutive_failures.max(1)).unwrap_or(1);
        mem.history.set_failure(failed_at);
        mem.last_failure = Some(Box::new((f.reason.clone(), f.message.clone())));
    }
}

fn observe(st: &State, name: &str, step: &Step<'_>) -> Observed {
    let mut nodes = BTreeMap::new();
    let mut last_pulled_at = None;
    let mut last_attempted_at = None;
    let pairs = st.pairs.0.get(name);
    let flying: BTreeSet<&str> = of_image(&st.in_flight, name)
        .map(|(k, _)| &*k.node)
        .collect();
    for node in step.targets {
        let mem = pairs.and_then(|p| p.get(node.as_str()));
        let h = mem.map_or_else(History::default, |m| m.history.history());
        last_pulled_at = last_pulled_at.max(h.last_success);
        last_attempted_at = last_attempted_at.max(h.last_start);
        let cached = mem.is_some_and(|m| m.cached);
        let flying = flying.contains(node.as_str());
        let state = if flying && step.pace.is_ok() {
            if cached {
                NodeState::Refreshing
            } else {
                NodeState::Pulling
            }
        } else if cached {
            NodeState::Cached
        } else if h.consecutive_failures > 0 {
            let (reason, message) = mem
                .and_then(|m| m.last_failure.as_deref().cloned())
                .unwrap_or_default();
            NodeState::Failed { reason, message }
        } else {
            NodeState::Waiting
        };
        nodes.insert(node.clone(), state);
    }
    let image = st.images.get(name);
    Observed {
        nodes,
        blocked: step.pace.as_ref().err().cloned(),
        consecutive_failures: image.map_or(0, |i| i.consecutive_failures),
        last_pulled_at,
        last_attempted_at,
        resolved_digest: image.and_then(|i| i.digest.clone()),
    }
}

#[cfg(test)]
mod tests;
