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
use crate::pacing::{self, History, InFlight, Pace, PolicyKey, PullKey, Registry, Target};
use crate::podbuilder::{PullOutcome, PullPodView};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Toleration};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use pairs::{ImagePairs, Names, Pair, TargetNodes};
use std::cell::{Cell, OnceCell};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

mod pairs;

/// How long a pull just started may stay unseen in the Pod cache before it counts as gone.
const CREATION_GRACE: Duration = Duration::from_secs(30);
/// How long a policy's starts wait for its images that have not registered their targets (see
/// [`Pacer::step`]): enough for a starting operator to reconcile every image once, short enough
/// that one image that cannot does not stop the others for long.
const REGISTRATION_HOLD: Duration = Duration::from_secs(30);
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
    /// Its target nodes, best sorted without duplicates (as [`targets::targets`] gives them;
    /// otherwise the pacer sorts a copy).
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
    /// Every Node in the cache: a node that leaves the image's targets is remembered as cached
    /// while its Node exists (read only when the targets change or such a node is remembered).
    pub nodes: &'a [Arc<Node>],
}

/// Whether a Node of a given name exists, from a list read into a set at the first question.
struct ExistingNodes<'a> {
    nodes: &'a [Arc<Node>],
    names: OnceCell<HashSet<&'a str>>,
}

impl<'a> ExistingNodes<'a> {
    fn new(nodes: &'a [Arc<Node>]) -> Self {
        Self {
            nodes,
            names: OnceCell::new(),
        }
    }

    fn exists(&self, name: &str) -> bool {
        self.names
            .get_or_init(|| {
                self.nodes
                    .iter()
                    .filter_map(|n| n.metadata.name.as_deref())
                    .collect()
            })
            .contains(name)
    }
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

/// What the pacer keeps of one image.
#[derive(Debug, Default)]
struct ImageMemory {
    reference: Option<String>,
    consecutive_failures: u32,
    seen: BTreeSet<String>,
    digest: Option<String>,
    /// Written by the image's own reconcile; `None` until its first.
    due: Option<DueSummary>,
    /// A pair on each of its targets at its last reconcile.
    pairs: ImagePairs,
    /// Set while its targets take part in decisions (its policy is known).
    registered: Option<Registration>,
    /// The latest start among its pairs that have settled (see [`Pair::settle`]): it still spaces
    /// its policy's next start.
    settled_start: Option<Timestamp>,
}

/// What an image's targets share: they are handed to the engine as [`Target`]s built from this
/// and the image's pairs, rather than kept as 64 bytes each.
#[derive(Debug)]
struct Registration {
    /// The image's name, shared through [`Names`].
    image: Arc<str>,
    priority: i32,
    policy: PolicyKey,
    registry: Registry,
}

impl Registration {
    fn target(&self, node: &Arc<str>) -> Target {
        Target {
            key: PullKey {
                image: Arc::clone(&self.image),
                node: Arc::clone(node),
            },
            priority: self.priority,
            policy: self.policy.clone(),
            registry: Arc::clone(&self.registry),
        }
    }
}

impl ImageMemory {
    /// Its policy, while its targets take part in decisions.
    fn policy(&self) -> Option<&PolicyKey> {
        self.registered.as_ref().map(|r| &r.policy)
    }

    /// Its targets, as the engine reads them.
    fn targets(&self) -> Vec<Target> {
        let Some(r) = &self.registered else {
            return Vec::new();
        };
        self.pairs.iter().map(|(node, _)| r.target(node)).collect()
    }
}

/// Where the engine reads each pair's history: in its image's pairs.
///
/// The engine asks for an image's targets mostly in the order of its pairs, with the very names
/// (shared `Arc<str>`s) the pairs hold. So the pair after the last one found is tried first, by
/// pointer, before a search by name: a thousand lookups per decision without comparing a string.
#[derive(Debug)]
struct PairHistories<'a> {
    images: &'a BTreeMap<String, ImageMemory>,
    /// The image and the position of the last pair found.
    last: Cell<Option<(&'a ImageMemory, usize)>>,
}

impl<'a> PairHistories<'a> {
    fn new(images: &'a BTreeMap<String, ImageMemory>) -> Self {
        Self {
            images,
            last: Cell::new(None),
        }
    }
}

impl pacing::Histories for PairHistories<'_> {
    fn history(&self, key: &PullKey) -> Option<History> {
        if let Some((memory, i)) = self.last.get()
            && memory
                .registered
                .as_ref()
                .is_some_and(|r| Arc::ptr_eq(&r.image, &key.image))
            && let Some((node, pair)) = memory.pairs.at(i + 1)
            && Arc::ptr_eq(node, &key.node)
        {
            self.last.set(Some((memory, i + 1)));
            return Some(pair.history());
        }
        let memory = self.images.get(&*key.image)?;
        let i = memory.pairs.position(&key.node)?;
        self.last.set(Some((memory, i)));
        memory.pairs.at(i).map(|(_, pair)| pair.history())
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
    in_flight: BTreeMap<PullKey, InFlight>,
    /// Pulls in flight whose Pod has been seen pulling: the start of that pull. A pull that was
    /// seen and is no longer shown has lost its Pod; one never seen may still be on its way.
    seen_pulling: BTreeMap<PullKey, Timestamp>,
    /// The names in the keys above and in the images' pairs.
    names: Names,
    images: BTreeMap<String, ImageMemory>,
    /// Images told (through [`Outcome::wake_others`]) to wake at a time, until they reconcile.
    appointed: BTreeMap<String, Timestamp>,
    /// Images whose due pulls their registry's budget held back at their last reconcile.
    registry_waiting: BTreeMap<String, Registry>,
    /// Policies whose starts are held for images that have not registered their targets: since
    /// when, without a break.
    held_since: BTreeMap<PolicyKey, Timestamp>,
}

impl State {
    /// The policy `image` names, as its last reconcile saw it: `Some(None)` for none, `None` when
    /// it names one the pacer has not seen (it cannot judge the image's targets).
    fn policy_of(&self, image: &CachedImage) -> Option<Option<&PullPolicySpec>> {
        match &image.spec.policy_ref {
            None => Some(None),
            Some(r) => self.policies.get(&r.name).map(Some),
        }
    }
}

/// The shared pacing state.
pub struct Pacer {
    state: Mutex<State>,
    wake: UnboundedSender<ObjectRef<CachedImage>>,
    pull_timeout: Duration,
    registry_budgets: BTreeMap<Registry, u32>,
}

/// A registry with a budget, as the metrics show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryLoad {
    /// The registry host.
    pub registry: Registry,
    /// Pulls from it in flight.
    pub in_flight: usize,
    /// Images with due pulls its budget holds back.
    pub waiting_images: usize,
}

impl Pacer {
    /// A pacer waking images through `wake`, failing pulls that take longer than `pull_timeout`.
    pub fn new(wake: UnboundedSender<ObjectRef<CachedImage>>, pull_timeout: Duration) -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake,
            pull_timeout,
            registry_budgets: BTreeMap::new(),
        }
    }

    /// Limits the pulls in flight per registry host, across every policy and image.
    #[must_use]
    pub fn with_registry_budgets(mut self, budgets: BTreeMap<Registry, u32>) -> Self {
        self.registry_budgets = budgets;
        self
    }

    /// Each registry with a budget: its pulls in flight and the images waiting on it.
    pub fn registry_loads(&self) -> Vec<RegistryLoad> {
        let st = self.lock();
        self.registry_budgets
            .keys()
            .map(|r| RegistryLoad {
                registry: Arc::clone(r),
                in_flight: st.in_flight.values().filter(|f| f.registry == *r).count(),
                waiting_images: st.registry_waiting.values().filter(|w| *w == r).count(),
            })
            .collect()
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
        also: &[Toleration],
    ) -> Vec<ObjectRef<CachedImage>> {
        let st = self.lock();
        let name = node.name_any();
        images
            .iter()
            .filter(|image| {
                let Some(known) = st
                    .images
                    .get(&image.name_any())
                    .filter(|m| m.registered.is_some())
                else {
                    return true;
                };
                let Some(policy) = st.policy_of(image) else {
                    return true;
                };
                let was = known.pairs.get(&name).is_some();
                was != targets::is_target(node, &image.spec, policy, also)
            })
            .map(|image| ObjectRef::from_obj(image.as_ref()))
            .collect()
    }

    /// The images that target `node` (counting `also`, the tolerations every pull Pod carries) and
    /// are not cached there, as far as the pacer knows. An image it cannot judge yet (not reconciled
    /// since the operator started, or naming a policy it has not seen) counts as missing; an image
    /// blocked (its policy does not exist) pulls nowhere and does not count.
    pub fn missing_on(
        &self,
        node: &Node,
        images: &[Arc<CachedImage>],
        also: &[Toleration],
    ) -> Vec<String> {
        let st = self.lock();
        let name = node.name_any();
        let mut missing = Vec::new();
        for image in images {
            if image.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let image_name = image.name_any();
            let memory = st.images.get(&image_name);
            if memory.is_some_and(|m| m.registered.is_none() && m.reference.is_some()) {
                continue;
            }
            let Some(policy) = st.policy_of(image) else {
                missing.push(image_name);
                continue;
            };
            if !targets::is_target(node, &image.spec, policy, also) {
                continue;
            }
            let cached = memory
                .filter(|m| m.reference.as_deref() == Some(image.spec.reference().as_str()))
                .and_then(|m| m.pairs.get(&name))
                .is_some_and(|p| p.cached());
            if !cached {
                missing.push(image_name);
            }
        }
        missing
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
        for (image, memory) in &mut st.images {
            let Some(reference) = memory.reference.as_deref() else {
                continue;
            };
            let Some(mem) = memory.pairs.get_mut(&name) else {
                continue;
            };
            if !mem.cached() || mem.gone() {
                continue;
            }
            let names = super::presence::names(reference, memory.digest.as_deref());
            match super::presence::listed(node, &names, max_images) {
                Listed::Yes => mem.set_listed(true),
                Listed::No if mem.listed() => {
                    mem.set_gone();
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
        let mut keys: BTreeSet<PullKey> = st
            .images
            .iter()
            .flat_map(|(image, m)| {
                m.pairs
                    .iter()
                    .filter(|(_, p)| **p != Pair::default())
                    .map(|(node, _)| node)
                    .chain(m.pairs.away())
                    .map(|node| PullKey::new(image, node))
            })
            .collect();
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
        let policy = st.images.get(image).and_then(ImageMemory::policy).cloned();
        forget(&mut st, image);
        let Some(policy) = policy else { return };
        let others: Vec<String> = st
            .images
            .iter()
            .filter(|(_, m)| !m.pairs.is_empty() && m.policy() == Some(&policy))
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
        let registry: Registry = crate::api::registry_of(&reference).into();
        let now = step.now;
        let mut st = self.lock();
        let st = &mut *st;
        st.appointed.remove(&name);

        // Images the cache no longer has (a deletion the watch missed while it re-listed, so no
        // `deleted` call came) leave with everything they held: their slots, their due pulls.
        if st.images.len() > step.known_images.len() {
            let known: BTreeSet<&str> = step.known_images.iter().map(|(n, _)| n.as_str()).collect();
            let gone: Vec<String> = st
                .images
                .keys()
                .filter(|n| **n != name && !known.contains(n.as_str()))
                .cloned()
                .collect();
            for image in gone {
                forget(st, &image);
            }
        }
        // First sight of this image (operator start): take back what its status recorded.
        let restored = if st.images.contains_key(&name) {
            None
        } else {
            restore(st, step.image, &reference)
        };
        // A new reference (a tag or digest edit): nothing of the old one counts as cached.
        let memory = st.images.entry(name.clone()).or_default();
        if memory.reference.as_deref() != Some(reference.as_str()) {
            memory.reference = Some(reference.clone());
            memory.consecutive_failures = 0;
            memory.digest = None;
            memory.settled_start = None;
            // Fitted again below: a fresh pair on each target.
            memory.pairs.clear();
        }

        // A pair on each target. Most reconciles see the targets of the last one: those stay.
        let mut spare = Vec::new();
        let targets = TargetNodes::of(step.targets, &mut spare);
        let nodes = ExistingNodes::new(step.nodes);
        let exists = |node: &str| nodes.exists(node);
        if !memory.pairs.fits(targets, &exists) {
            memory.pairs.fit(targets, &mut st.names, &exists);
            st.names.sweep();
        }
        if let Some(status) = restored {
            restore_pairs(memory, status, now, &mut st.names, &exists);
        }
        if let (Ok((Some(policy), _)), Some(spec)) = (&step.pace, step.policy)
            && st.policies.get(&**policy) != Some(spec)
        {
            st.policies.insert(policy.to_string(), spec.clone());
        }
        match &step.pace {
            Ok((policy, pace)) => {
                st.paces.insert(policy.clone(), pace.clone());
                let priority = step.image.spec.priority.unwrap_or(0);
                let current = memory.registered.as_ref().is_some_and(|r| {
                    r.priority == priority && r.policy == *policy && r.registry == registry
                });
                if !current {
                    memory.registered = Some(Registration {
                        image: st.names.get(&name),
                        priority,
                        policy: policy.clone(),
                        registry: Arc::clone(&registry),
                    });
                }
            }
            Err(_) => memory.registered = None,
        }

        // What the Pods say.
        let mut keep = Vec::new();
        let mut ended = Vec::new();
        let mut observed_uids = BTreeSet::new();
        let mut observed_keys = BTreeSet::new();
        for pod in step.pods {
            observed_uids.insert(pod.uid.clone());
            let k = st.names.key(&name, &pod.node);
            if let Some(mem) = pair_mut(st, &k) {
                mem.saw_attempt(pod.attempt);
            }
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
                            registry: Arc::clone(&registry),
                            started: pod.created,
                        },
                    );
                    keep.push(pod.name.clone());
                }
                PullOutcome::Pulled { digest } if current && first_sight => {
                    if let Some(mem) = pair_mut(st, &k) {
                        mem.pulled(now);
                    }
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
        let grace_ends = settle_unseen(st, &name, targets, &observed_keys, now, &mut ended);

        // Decide over this image (its wake-up needs its own targets) and the other images that may
        // start a pull now: not those whose policy has every slot taken, and of the others only
        // the targets they could start first ([`pacing::leaders`]: none for those with nothing
        // due, which only space the starts of their policy). Each image's own reconcile woke it for
        // its next due time. This keeps a reconcile's cost near its own targets' instead of the
        // whole fleet's.
        let in_flight: Vec<InFlight> = st.in_flight.values().cloned().collect();
        // No decision starts more pulls under a policy than it has free slots: of each image's
        // leaders, only that many can matter (none, under a policy with every slot taken).
        let slots = pacing::FreeSlots::new(&st.paces, &in_flight);
        let free = |policy: &PolicyKey| slots.of(policy);
        let own: Vec<Target> = st
            .images
            .get(&name)
            .map_or_else(Vec::new, ImageMemory::targets);
        // This image enters the decision as the others do, with the targets it could start first
        // (its whole due set would give the same starts at ten times the cost).
        let own_leaders = match &step.pace {
            Ok((_, pace)) => pacing::leaders(
                &own,
                &PairHistories::new(&st.images),
                |k| st.in_flight.contains_key(k),
                pace,
                now,
            ),
            Err(_) => pacing::Leaders::default(),
        };
        let mut candidates: Vec<Target> = Vec::new();
        let mut earlier_starts: BTreeMap<PolicyKey, Timestamp> = BTreeMap::new();
        let mut spaced_by = |policy: &PolicyKey, at: Option<Timestamp>| {
            if let Some(at) = at {
                let latest = earlier_starts.entry(policy.clone()).or_insert(at);
                *latest = (*latest).max(at);
            }
        };
        for (image, memory) in &st.images {
            let Some(r) = &memory.registered else {
                continue;
            };
            if *image != name && free(&r.policy) == 0 {
                continue;
            }
            // Pairs that settled keep only their image's latest start, which spaces its policy.
            spaced_by(&r.policy, memory.settled_start);
            match &memory.due {
                _ if *image == name => {
                    spaced_by(&r.policy, own_leaders.last_start);
                    let first = own_leaders.first.iter().take(free(&r.policy));
                    candidates.extend(first.filter_map(|&i| own.get(i)).cloned());
                }
                // Its due set is as its last reconcile left it: only the few it could start first
                // can start now (none if nothing is due; in a rollout, a handful instead of every
                // node), and its latest start still spaces its policy's next one.
                Some(due) if due.until.is_none_or(|t| t > now) => {
                    spaced_by(&r.policy, due.last_start);
                    let first = due.first.iter().take(free(&r.policy));
                    let first = first.filter_map(|&i| memory.pairs.at(i));
                    candidates.extend(first.map(|(node, _)| r.target(node)));
                }
                _ => candidates.extend(memory.targets()),
            }
        }
        let due_targets: Vec<&Target> = candidates.iter().collect();
        let decision = pacing::decide(&pacing::Input {
            now,
            paces: &st.paces,
            targets: &due_targets,
            earlier_starts: &earlier_starts,
            in_flight: &in_flight,
            history: &PairHistories::new(&st.images),
            pull_timeout: self.pull_timeout,
            registry_budgets: &self.registry_budgets,
        });
        let mut wake = BTreeSet::new();
        // Policies some of whose images have not registered their targets yet: hold their starts
        // (one of those may come first in the order) and wake those images. Not for ever: an
        // image that does not get to reconcile (a busy operator, a reconcile that keeps failing
        // before it registers) must not stop its policy's others.
        let mut held: BTreeSet<PolicyKey> = BTreeSet::new();
        for (image, policy) in step.known_images {
            let registered = st.images.get(image).is_some_and(|m| m.registered.is_some());
            if !registered && st.paces.contains_key(policy) && *image != name {
                held.insert(policy.clone());
                wake.insert(image.clone());
            }
        }
        st.held_since.retain(|p, _| held.contains(p));
        held.retain(|p| {
            let since = *st.held_since.entry(p.clone()).or_insert(now);
            now.duration_since(since).unsigned_abs() < REGISTRATION_HOLD
        });
        // This image's policy held: it tries again when the hold runs out at the latest.
        let hold_ends = st
            .images
            .get(&name)
            .and_then(ImageMemory::policy)
            .filter(|p| held.contains(*p))
            .and_then(|p| st.held_since.get(p))
            .map(|since| pacing::after(*since, REGISTRATION_HOLD));
        let mut decision = decision;
        decision.start.retain(|k| {
            let policy = st.images.get(&*k.image).and_then(ImageMemory::policy);
            policy.is_none_or(|p| !held.contains(p))
        });
        let registry_wait = decision
            .registry_held
            .iter()
            .find(|(k, _)| *k.image == *name)
            .map(|(_, r)| Arc::clone(r));
        match &registry_wait {
            Some(r) => st.registry_waiting.insert(name.clone(), Arc::clone(r)),
            None => st.registry_waiting.remove(&name),
        };
        // Another image that this decision finds held back by its registry for the first time is
        // woken once, so that its status says so (its own reconciles would not come before a slot
        // frees).
        for (k, r) in &decision.registry_held {
            if *k.image != *name && !st.registry_waiting.contains_key(&*k.image) {
                st.registry_waiting
                    .insert(k.image.to_string(), Arc::clone(r));
                wake.insert(k.image.to_string());
            }
        }
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
            let Some(mem) = pair_mut(st, k) else {
                continue;
            };
            let attempt = mem.next_attempt();
            mem.set_listed(false);
            mem.started(now);
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
                    registry: Arc::clone(&registry),
                    started: now,
                },
            );
            start.push((k.node.to_string(), attempt));
        }
        // Who wakes when the policy's delay ends: the image next in line, no other.
        let mut wake_at = grace_ends;
        if let Some(t) = hold_ends {
            wake_at = earliest(wake_at, t);
        }
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
        settle(st, &name);
        let due = match &step.pace {
            Ok((_, pace)) => Some(pacing::leaders(
                &own,
                &PairHistories::new(&st.images),
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

        let mut observed = observe(st, &name, step, targets);
        observed.registry_wait = registry_wait.map(|r| {
            let budget = self.registry_budgets.get(&r).copied().unwrap_or(0);
            (r.to_string(), budget)
        });
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
    st.images.remove(image);
    st.in_flight.retain(|k, _| &*k.image != image);
    st.seen_pulling.retain(|k, _| &*k.image != image);
    st.appointed.remove(image);
    st.registry_waiting.remove(image);
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
    targets: TargetNodes<'_>,
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
        let failure = if !targets.contains(&k.node) {
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

/// `image`'s memory, and the nodes it has a pull in flight on.
fn with_flying<'a>(
    st: &'a mut State,
    image: &'a str,
) -> Option<(&'a mut ImageMemory, BTreeSet<&'a str>)> {
    let State {
        in_flight, images, ..
    } = st;
    let flying = of_image(in_flight, image).map(|(k, _)| &*k.node).collect();
    Some((images.get_mut(image)?, flying))
}

/// Nodes that no longer hold the image (see [`Pacer::node_images_changed`]) stop counting as cached,
/// so the image is pulled there again, paced like any missing node.
fn forget_gone(st: &mut State, image: &str) {
    let Some((memory, flying)) = with_flying(st, image) else {
        return;
    };
    for (node, m) in memory.pairs.iter_mut() {
        if m.gone() && !flying.contains(&**node) {
            tracing::info!(image, node = %node, "the node no longer lists the image: pulling it again");
            m.lost();
        }
    }
}

/// Lets the image's pairs with nothing under way and no failures drop what they no longer need
/// (see [`Pair::settle`]); the latest start among them stays with the image.
fn settle(st: &mut State, image: &str) {
    let Some((memory, flying)) = with_flying(st, image) else {
        return;
    };
    let mut latest = memory.settled_start;
    for (node, pair) in memory.pairs.iter_mut() {
        if !flying.contains(&**node) {
            latest = latest.max(pair.settle());
        }
    }
    memory.settled_start = latest;
}

/// The pair of `k`, if its node is one of its image's targets.
fn pair_mut<'a>(st: &'a mut State, k: &PullKey) -> Option<&'a mut Pair> {
    st.images.get_mut(&*k.image)?.pairs.get_mut(&k.node)
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
    if let Some(pair) = pair_mut(st, k) {
        pair.failed(now, 0, reason, message);
    }
    st.images
        .entry(k.image.to_string())
        .or_default()
        .consecutive_failures += 1;
}

/// After an operator restart: what the image's status says of the image as a whole, provided the
/// status describes the current spec; then the status, for [`restore_pairs`] once the image has
/// its pairs.
fn restore<'a>(
    st: &mut State,
    image: &'a CachedImage,
    reference: &str,
) -> Option<&'a CachedImageStatus> {
    let memory = st.images.entry(image.name_any()).or_default();
    let status = image.status.as_ref()?;
    if status.observed_generation != image.metadata.generation {
        return None;
    }
    memory.reference = Some(reference.to_owned());
    memory.consecutive_failures = u32::try_from(status.consecutive_failures).unwrap_or(0);
    memory.digest = status.resolved_digest.clone();
    Some(status)
}

/// After an operator restart: cached nodes and failures come back from the image's status.
fn restore_pairs(
    memory: &mut ImageMemory,
    status: &CachedImageStatus,
    now: Timestamp,
    names: &mut Names,
    exists: &dyn Fn(&str) -> bool,
) {
    let pulled = status.last_pulled_at.as_ref().map_or(now, |t| t.0);
    let mut away = Vec::new();
    for node in status.cached_nodes.iter() {
        match memory.pairs.get_mut(node) {
            Some(pair) => pair.restore_cached(pulled),
            // Cached on a node that is not a target now (a NotReady spell at the restart): it
            // comes back cached.
            None if exists(node) => away.push((names.get(node), pulled)),
            None => {}
        }
    }
    memory.pairs.restore_away(away);
    let failed_at = status.last_attempted_at.as_ref().map_or(now, |t| t.0);
    let in_a_row = u32::try_from(status.consecutive_failures.max(1)).unwrap_or(1);
    for f in &status.failed_nodes {
        if let Some(pair) = memory.pairs.get_mut(&f.node) {
            pair.failed(failed_at, in_a_row, &f.reason, &f.message);
        }
    }
}

fn observe(st: &State, name: &str, step: &Step<'_>, targets: TargetNodes<'_>) -> Observed {
    let mut nodes = Vec::with_capacity(targets.len());
    let image = st.images.get(name);
    let mut last_pulled_at = None;
    let mut last_attempted_at = image.and_then(|i| i.settled_start);
    // The targets, the image's pairs and its pulls in flight are all sorted by node: walk them
    // side by side rather than look each node up.
    let mut pairs = image.into_iter().flat_map(|i| i.pairs.iter()).peekable();
    let mut flying = of_image(&st.in_flight, name)
        .map(|(k, _)| &*k.node)
        .peekable();
    for node in targets.iter() {
        while pairs.next_if(|(n, _)| &***n < node).is_some() {}
        let mem = pairs.next_if(|(n, _)| &***n == node).map(|(_, p)| p);
        while flying.next_if(|n| *n < node).is_some() {}
        let flying = flying.next_if(|n| *n == node).is_some();
        let h = mem.map_or_else(History::default, Pair::history);
        last_pulled_at = last_pulled_at.max(h.last_success);
        last_attempted_at = last_attempted_at.max(h.last_start);
        let cached = mem.is_some_and(|m| m.cached());
        let state = if flying && step.pace.is_ok() {
            if cached {
                NodeState::Refreshing
            } else {
                NodeState::Pulling
            }
        } else if cached {
            NodeState::Cached
        } else if h.consecutive_failures > 0 {
            let (reason, message) = mem.and_then(Pair::failure).cloned().unwrap_or_default();
            NodeState::Failed { reason, message }
        } else {
            NodeState::Waiting
        };
        nodes.push((node.to_owned(), state));
    }
    Observed {
        nodes,
        blocked: step.pace.as_ref().err().cloned(),
        consecutive_failures: image.map_or(0, |i| i.consecutive_failures),
        last_pulled_at,
        last_attempted_at,
        resolved_digest: image.and_then(|i| i.digest.clone()),
        registry_wait: None,
    }
}

#[cfg(test)]
mod tests;
