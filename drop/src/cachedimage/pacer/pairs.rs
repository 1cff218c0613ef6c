//! What the pacer remembers of each (image, node) pair, kept small: at a million pairs (200 images
//! on 5000 nodes) these are most of the operator's memory.
//!
//! A pair of a settled fleet is either cached or never pulled; all it needs then is the time of its
//! last success, its attempt count and a few flags (16 bytes). The start of its last pull and its
//! failures matter only while a pull is under way or failing, and are boxed in a [`Detail`] until
//! then. An image's pairs sit in one sorted vector with its target nodes' names, shared through
//! [`Names`].

use crate::pacing::History;
use jiff::Timestamp;
use std::collections::HashSet;
use std::sync::{Arc, Weak};

/// No time, in the packed form.
const NONE: i64 = i64::MIN;

/// A time as nanoseconds since the Unix epoch (exact from 1677 to 2262; times beyond are clamped).
fn pack(t: Option<Timestamp>) -> i64 {
    let Some(t) = t else { return NONE };
    let ns = t.as_nanosecond();
    i64::try_from(ns).unwrap_or(if ns < 0 { NONE + 1 } else { i64::MAX })
}

fn unpack(ns: i64) -> Option<Timestamp> {
    (ns != NONE).then(|| Timestamp::from_nanosecond(i128::from(ns)).ok())?
}

/// A success's time in whole seconds since the Unix epoch, `0` for none: what a status records
/// of it (`lastPulledAt`) and all a re-pull interval needs. Exact until 2106; later times clamp.
fn pack_seconds(t: Timestamp) -> u32 {
    u32::try_from(t.as_second()).unwrap_or(if t.as_second() < 1 { 1 } else { u32::MAX })
}

fn unpack_seconds(s: u32) -> Option<Timestamp> {
    (s != 0).then(|| Timestamp::from_second(i64::from(s)).ok())?
}

/// The flags of [`Pair::flags`].
const CACHED: u8 = 1;
const LISTED: u8 = 2;
const GONE: u8 = 4;

/// What one image on one node has been through.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Pair {
    /// The last pull's start and the failures since the last success, while they matter.
    detail: Option<Box<Detail>>,
    /// The last success ([`pack_seconds`]).
    success: u32,
    /// Pull Pods made for it so far, counting round (each attempt's Pod has its own name, and
    /// 65,536 attempts apart no Pod of the older is left).
    attempts: u16,
    /// [`CACHED`], [`LISTED`], [`GONE`].
    flags: u8,
}

/// The part of a pair's history that a settled pair does without.
#[derive(Debug, PartialEq)]
struct Detail {
    last_start: i64,
    last_failure: i64,
    consecutive_failures: u32,
    /// The last failure's reason and message.
    failure: Option<(String, String)>,
}

impl Default for Detail {
    fn default() -> Self {
        Self {
            last_start: NONE,
            last_failure: NONE,
            consecutive_failures: 0,
            failure: None,
        }
    }
}

impl Pair {
    fn detail(&mut self) -> &mut Detail {
        self.detail.get_or_insert_default()
    }

    fn flag(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    fn set_flag(&mut self, flag: u8, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    /// Cached with the image's current reference (a new reference drops the image's memory of
    /// every node, so no other reference can be cached here).
    pub fn cached(&self) -> bool {
        self.flag(CACHED)
    }

    /// The node has listed the image since it was last pulled there.
    pub fn listed(&self) -> bool {
        self.flag(LISTED)
    }

    /// Marks that the node lists the image, or (`false`) that a new pull is starting there.
    pub fn set_listed(&mut self, listed: bool) {
        self.set_flag(LISTED, listed);
    }

    /// The node has since stopped listing the image (with room in its list): it is gone.
    pub fn gone(&self) -> bool {
        self.flag(GONE)
    }

    /// Marks the image gone from the node.
    pub fn set_gone(&mut self) {
        self.set_flag(GONE, true);
    }

    /// The attempt of the next pull Pod, counted.
    pub fn next_attempt(&mut self) -> u32 {
        self.attempts = self.attempts.wrapping_add(1);
        u32::from(self.attempts)
    }

    /// A pull Pod of attempt `attempt` exists: the next is numbered after it.
    pub fn saw_attempt(&mut self, attempt: u32) {
        // Only the low bits name a Pod apart from its recent predecessors.
        let attempt = (attempt & u32::from(u16::MAX)) as u16;
        self.attempts = self.attempts.max(attempt);
    }

    /// Its history, as the pacing engine reads it.
    pub fn history(&self) -> History {
        let d = self.detail.as_deref();
        History {
            last_start: d.and_then(|d| unpack(d.last_start)),
            last_success: unpack_seconds(self.success),
            last_failure: d.and_then(|d| unpack(d.last_failure)),
            consecutive_failures: d.map_or(0, |d| d.consecutive_failures),
        }
    }

    /// A pull started at `t`.
    pub fn started(&mut self, t: Timestamp) {
        self.detail().last_start = pack(Some(t));
    }

    /// A pull succeeded at `t`: cached, no failures.
    pub fn pulled(&mut self, t: Timestamp) {
        self.success = pack_seconds(t);
        self.set_flag(CACHED, true);
        if let Some(d) = self.detail.as_deref_mut() {
            d.consecutive_failures = 0;
            d.failure = None;
        }
    }

    /// Cached since `t`, as a status written before a restart says.
    pub fn restore_cached(&mut self, t: Timestamp) {
        self.success = pack_seconds(t);
        self.set_flag(CACHED, true);
    }

    /// A pull failed at `t`, one more in a row (or `in_a_row` at least, for one restored from a
    /// status).
    pub fn failed(&mut self, t: Timestamp, in_a_row: u32, reason: &str, message: &str) {
        let d = self.detail();
        d.consecutive_failures = (d.consecutive_failures + 1).max(in_a_row);
        d.last_failure = pack(Some(t));
        d.failure = Some((reason.to_owned(), message.to_owned()));
    }

    /// Not cached any more, as if never pulled (the node lost the image).
    pub fn lost(&mut self) {
        self.flags = 0;
        self.success = 0;
    }

    /// The last failure's reason and message, if it failed since its last success.
    pub fn failure(&self) -> Option<&(String, String)> {
        self.detail.as_deref()?.failure.as_ref()
    }

    /// Drops the detail of a pair with no failures in a row (not in flight: the caller checks),
    /// returning the start it held: the caller keeps the latest such start per image, which is all
    /// the spacing of later pulls needs of it.
    pub fn settle(&mut self) -> Option<Timestamp> {
        if self
            .detail
            .as_deref()
            .is_some_and(|d| d.consecutive_failures == 0)
        {
            return self.detail.take().and_then(|d| unpack(d.last_start));
        }
        None
    }
}

/// One image's pairs: one per target node, sorted by node.
///
/// The node names sit in a list of their own, shared through [`Names`] with every image whose
/// targets are the same nodes: in most fleets all images target the same pool, so a million pairs
/// hold one list of names and a 16-byte [`Pair`] each.
#[derive(Debug, Default)]
pub(super) struct ImagePairs {
    nodes: NodeList,
    pairs: Vec<Pair>,
    /// Nodes that left the targets while the image was cached there, and whose Node still exists:
    /// their last success ([`pack_seconds`]), sorted by node. A node back from a spell out of the targets (a
    /// `not-ready` taint while its heartbeats were late, a cordon) comes back cached rather than
    /// being pulled again; a deleted Node's entry goes at the next fit.
    away: Vec<(Arc<str>, u32)>,
}

/// A sorted list of node names, shared by the images that target exactly those nodes.
type NodeList = Arc<[Arc<str>]>;

impl ImagePairs {
    fn find(&self, node: &str) -> Result<usize, usize> {
        self.nodes.binary_search_by(|n| (**n).cmp(node))
    }

    /// Where `node`'s pair is in node order.
    pub fn position(&self, node: &str) -> Option<usize> {
        self.find(node).ok()
    }

    pub fn get(&self, node: &str) -> Option<&Pair> {
        self.find(node).ok().map(|i| &self.pairs[i])
    }

    pub fn get_mut(&mut self, node: &str) -> Option<&mut Pair> {
        let i = self.find(node).ok()?;
        Some(&mut self.pairs[i])
    }

    /// The `i`-th pair in node order, with its node.
    pub fn at(&self, i: usize) -> Option<(&Arc<str>, &Pair)> {
        Some((self.nodes.get(i)?, self.pairs.get(i)?))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Pair)> {
        self.nodes.iter().zip(&self.pairs)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&Arc<str>, &mut Pair)> {
        self.nodes.iter().zip(&mut self.pairs)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The nodes away from the targets with the image cached there (see [`ImagePairs::away`]).
    pub fn away(&self) -> impl Iterator<Item = &Arc<str>> {
        self.away.iter().map(|(node, _)| node)
    }

    /// Remembers `nodes` as away from the targets, cached since the time given (a status written
    /// before a restart lists them); nodes that are targets are left out.
    pub fn restore_away(&mut self, nodes: impl IntoIterator<Item = (Arc<str>, Timestamp)>) {
        for (node, t) in nodes {
            if self.find(&node).is_err() {
                self.away.push((node, pack_seconds(t)));
            }
        }
        self.away.sort_by(|a, b| a.0.cmp(&b.0));
        self.away.dedup_by(|a, b| a.0 == b.0);
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Whether its nodes are exactly `targets`, and every node it keeps away still `exists`.
    pub fn fits(&self, targets: TargetNodes<'_>, exists: &dyn Fn(&str) -> bool) -> bool {
        same_nodes(&self.nodes, targets) && self.away.iter().all(|(node, _)| exists(node))
    }

    /// Gives the image a pair on each of its `targets` and none elsewhere, keeping what it knew of
    /// the nodes that stay. A node that leaves with the image cached is kept away while its Node
    /// `exists`, and comes back cached. The pairs are made to size, with no room to spare; the
    /// list of names is the one other images with these targets already share, if any.
    pub fn fit(
        &mut self,
        targets: TargetNodes<'_>,
        names: &mut Names,
        exists: &dyn Fn(&str) -> bool,
    ) {
        let old_nodes = std::mem::take(&mut self.nodes);
        let mut old = old_nodes
            .iter()
            .zip(std::mem::take(&mut self.pairs))
            .peekable();
        let was_away = std::mem::take(&mut self.away);
        let back = |node: &str| {
            let i = was_away.binary_search_by(|(n, _)| (**n).cmp(node)).ok()?;
            let mut pair = Pair::default();
            pair.restore_cached(unpack_seconds(was_away[i].1)?);
            Some(pair)
        };
        let mut leaving = Vec::new();
        let mut leave = |node: &Arc<str>, pair: Pair| {
            if pair.cached() && exists(node) {
                leaving.push((Arc::clone(node), pair.success));
            }
        };
        let mut pairs = Vec::with_capacity(targets.len());
        for t in targets.iter() {
            while let Some((node, pair)) = old.next_if(|(node, _)| &***node < t) {
                leave(node, pair);
            }
            let kept = old.next_if(|(node, _)| &***node == t).map(|(_, p)| p);
            pairs.push(kept.or_else(|| back(t)).unwrap_or_default());
        }
        for (node, pair) in old {
            leave(node, pair);
        }
        let mut away: Vec<(Arc<str>, u32)> = was_away
            .iter()
            .filter(|(node, _)| exists(node) && !targets.contains(node))
            .cloned()
            .chain(leaving)
            .collect();
        away.sort_by(|a, b| a.0.cmp(&b.0));
        self.away = away;
        self.pairs = pairs;
        self.nodes = names.list(targets);
    }
}

/// Whether `list` names exactly `targets`.
fn same_nodes(list: &[Arc<str>], targets: TargetNodes<'_>) -> bool {
    list.len() == targets.len() && list.iter().zip(targets.iter()).all(|(n, t)| &**n == t)
}

/// An image's target nodes, sorted and without duplicates: a set read by binary search, made
/// without building one (a reconcile at 1000 nodes would otherwise build a tree of 1000 names).
#[derive(Clone, Copy, Debug)]
pub(super) struct TargetNodes<'a>(&'a [String]);

impl<'a> TargetNodes<'a> {
    /// `nodes` themselves when they are sorted without duplicates (as
    /// [`targets`](crate::cachedimage::targets::targets) gives them); otherwise a sorted copy
    /// made in `spare`.
    pub fn of(nodes: &'a [String], spare: &'a mut Vec<String>) -> Self {
        if nodes.windows(2).all(|w| w[0] < w[1]) {
            return Self(nodes);
        }
        spare.extend_from_slice(nodes);
        spare.sort();
        spare.dedup();
        Self(spare)
    }

    pub fn contains(&self, node: &str) -> bool {
        self.0.binary_search_by(|t| t.as_str().cmp(node)).is_ok()
    }

    pub fn iter(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        self.0.iter().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// One shared copy of each image and node name the pacer's keys use, so a million (image, node)
/// pairs hold references to a few thousand names rather than a string each; and one shared copy of
/// each list of target nodes the images' pairs use.
#[derive(Default)]
pub(super) struct Names {
    pub(super) names: HashSet<Arc<str>>,
    lists: HashSet<NodeList>,
    /// The list handed out last: when a change of nodes refits every image, most images get the
    /// same list, found by comparing names rather than by hashing them all.
    last_list: Option<Weak<[Arc<str>]>>,
}

impl Names {
    /// The shared copy of `name`, made if there is none.
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = name.into();
        self.names.insert(Arc::clone(&shared));
        shared
    }

    /// The key of `image` on `node`, with shared names.
    pub fn key(&mut self, image: &str, node: &str) -> crate::pacing::PullKey {
        crate::pacing::PullKey {
            image: self.get(image),
            node: self.get(node),
        }
    }

    /// The shared list of `targets`' names, made if there is none.
    fn list(&mut self, targets: TargetNodes<'_>) -> NodeList {
        if let Some(last) = self.last_list.as_ref().and_then(Weak::upgrade)
            && same_nodes(&last, targets)
        {
            return last;
        }
        let list: NodeList = targets.iter().map(|t| self.get(t)).collect();
        let shared = match self.lists.get(&list) {
            Some(shared) => Arc::clone(shared),
            None => {
                self.lists.insert(Arc::clone(&list));
                list
            }
        };
        self.last_list = Some(Arc::downgrade(&shared));
        shared
    }

    /// Lets go of the lists and names nothing else uses any more.
    pub fn sweep(&mut self) {
        self.lists.retain(|list| Arc::strong_count(list) > 1);
        self.names.retain(|name| Arc::strong_count(name) > 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().expect("a timestamp")
    }

    #[test]
    fn pacing_a_pair_reads_back_its_history() {
        let mut p = Pair::default();
        assert_eq!(p.history(), History::default());
        let start = at("2026-12-01T04:40:00.123456789Z");
        p.started(start);
        p.failed(
            at("1970-01-01T00:00:00Z"),
            3,
            "ErrImagePull",
            "no such host",
        );
        let h = p.history();
        assert_eq!(h.last_start, Some(start));
        assert_eq!(h.last_failure, Some(Timestamp::UNIX_EPOCH));
        assert_eq!(h.consecutive_failures, 3);
        assert_eq!(
            p.failure().map(|f| f.0.as_str()),
            Some("ErrImagePull"),
            "the reason is kept"
        );
        assert_eq!(p.settle(), None, "failing: its detail stays");
        p.pulled(at("2026-12-01T04:40:02Z"));
        assert_eq!(p.history().consecutive_failures, 0);
        assert_eq!(p.failure(), None);
        // Settled: the start goes back to the caller, the success stays.
        assert_eq!(p.settle(), Some(start));
        assert_eq!(
            p.history(),
            History {
                last_success: Some(at("2026-12-01T04:40:02Z")),
                ..History::default()
            }
        );
        assert!(p.cached());
        p.lost();
        assert_eq!(p.history().last_success, None);
        assert!(!p.cached());
        // Beyond what 64 bits of nanoseconds hold: clamped, still a time.
        p.started(Timestamp::MAX);
        assert!(p.history().last_start > Some(at("2262-01-01T00:00:00Z")));
        p.started(Timestamp::MIN);
        assert!(p.history().last_start < Some(at("1678-01-01T00:00:00Z")));
        // A success is kept to the second, as a status records it; beyond 2106 it clamps.
        p.pulled(at("2026-12-01T04:40:02.75Z"));
        assert_eq!(p.history().last_success, Some(at("2026-12-01T04:40:02Z")));
        p.pulled(Timestamp::MAX);
        assert!(p.history().last_success > Some(at("2106-01-01T00:00:00Z")));
        assert_eq!(std::mem::size_of::<Pair>(), 16);
    }

    #[test]
    fn pacing_a_pairs_attempts_count_on_from_the_pods_seen_and_round() {
        let mut p = Pair::default();
        assert_eq!(p.next_attempt(), 1);
        p.saw_attempt(7);
        assert_eq!(p.next_attempt(), 8, "after the highest attempt seen");
        p.saw_attempt(3);
        assert_eq!(p.next_attempt(), 9, "an older Pod changes nothing");
        p.saw_attempt(u32::from(u16::MAX));
        assert_eq!(p.next_attempt(), 0, "counted round");
        assert_eq!(p.next_attempt(), 1);
    }

    #[test]
    fn pacing_image_pairs_fit_their_targets_and_keep_what_stays() {
        let mut names = Names::default();
        let mut pairs = ImagePairs::default();
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
        let (unsorted, sorted) = (owned(&["b", "d", "a", "b"]), owned(&["a", "b", "d"]));
        let mut spare = Vec::new();
        pairs.fit(TargetNodes::of(&unsorted, &mut spare), &mut names, &|_| {
            true
        });
        assert!(pairs.fits(TargetNodes::of(&sorted, &mut Vec::new()), &|_| true));
        assert!(TargetNodes::of(&unsorted, &mut Vec::new()).contains("d"));
        assert!(!TargetNodes::of(&sorted, &mut Vec::new()).contains("c"));
        pairs
            .get_mut("b")
            .expect("b is a target")
            .restore_cached(at("2026-12-01T00:00:00Z"));
        pairs.fit(
            TargetNodes::of(&owned(&["c", "b", "e"]), &mut Vec::new()),
            &mut names,
            &|_| true,
        );
        let nodes: Vec<&str> = pairs.iter().map(|(n, _)| &**n).collect();
        assert_eq!(nodes, ["b", "c", "e"]);
        assert!(
            pairs.get("b").is_some_and(|p| p.cached()),
            "b stayed, and so did its state"
        );
        assert!(pairs.get("a").is_none());
        names.sweep();
        assert_eq!(names.names.len(), 3, "a and d went with their pairs");
    }

    #[test]
    fn pacing_a_cached_node_away_from_the_targets_comes_back_cached_while_its_node_exists() {
        let mut names = Names::default();
        let mut pairs = ImagePairs::default();
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
        let all = owned(&["a", "b", "c"]);
        let fit = |pairs: &mut ImagePairs, names: &mut Names, t: &[String], exists: &[&str]| {
            let exists = |n: &str| exists.contains(&n);
            pairs.fit(TargetNodes::of(t, &mut Vec::new()), names, &exists);
        };
        fit(&mut pairs, &mut names, &all, &["a", "b", "c"]);
        let t = at("2026-12-01T00:00:00Z");
        for node in ["a", "b"] {
            pairs.get_mut(node).expect("a target").pulled(t);
        }
        // a and b leave the targets (tainted not-ready), c too; only a and b were cached.
        fit(&mut pairs, &mut names, &[], &["a", "b", "c"]);
        let away: Vec<&str> = pairs.away().map(|n| &**n).collect();
        assert_eq!(away, ["a", "b"]);
        // b's Node is deleted: its memory goes at the next check, targets unchanged or not.
        let none: &[String] = &[];
        assert!(!pairs.fits(TargetNodes::of(none, &mut Vec::new()), &|n| n != "b"));
        fit(&mut pairs, &mut names, &[], &["a", "c"]);
        let away: Vec<&str> = pairs.away().map(|n| &**n).collect();
        assert_eq!(away, ["a"]);
        // All three are targets again: a comes back cached since its pull, c as new.
        fit(
            &mut pairs,
            &mut names,
            &owned(&["a", "b", "c"]),
            &["a", "b", "c"],
        );
        let a = pairs.get("a").expect("a target");
        assert!(a.cached());
        assert_eq!(a.history().last_success, Some(t));
        assert!(!pairs.get("b").expect("a target").cached(), "b's Node went");
        assert!(!pairs.get("c").expect("a target").cached());
        assert_eq!(pairs.away().count(), 0);
        names.sweep();
        assert_eq!(names.names.len(), 3);
    }

    #[test]
    fn pacing_images_with_the_same_targets_share_one_list_of_names() {
        let mut names = Names::default();
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
        let pool = owned(&["n1", "n2", "n3"]);
        let (mut a, mut b, mut c) = (
            ImagePairs::default(),
            ImagePairs::default(),
            ImagePairs::default(),
        );
        a.fit(TargetNodes::of(&pool, &mut Vec::new()), &mut names, &|_| {
            true
        });
        b.fit(TargetNodes::of(&pool, &mut Vec::new()), &mut names, &|_| {
            true
        });
        c.fit(
            TargetNodes::of(&owned(&["n1", "n2"]), &mut Vec::new()),
            &mut names,
            &|_| true,
        );
        assert!(Arc::ptr_eq(&a.nodes, &b.nodes), "one list for the pool");
        assert!(!Arc::ptr_eq(&a.nodes, &c.nodes));
        assert_eq!(names.lists.len(), 2);
        // c widens to the pool: it joins the pool's list, and its own goes once swept.
        c.get_mut("n2")
            .expect("n2")
            .restore_cached(at("2026-12-01T00:00:00Z"));
        c.fit(TargetNodes::of(&pool, &mut Vec::new()), &mut names, &|_| {
            true
        });
        assert!(Arc::ptr_eq(&a.nodes, &c.nodes));
        assert!(c.get("n2").is_some_and(|p| p.cached()), "what c knew stays");
        names.sweep();
        assert_eq!(names.lists.len(), 1);
        drop((a, b, c));
        names.sweep();
        assert!(names.lists.is_empty() && names.names.is_empty());
    }
}
