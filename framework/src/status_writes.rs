//! When a changed status is written: at once, or coalesced with the changes that follow it.
//!
//! During a busy stretch (a rollout, where every child's progress changes the primary's status) an
//! object's status can change many times a second. With an interval set
//! ([`Controller::coalesce_status`](crate::Controller::coalesce_status)), a change that leaves every
//! condition's type, status and reason as they were (progress: counts, lists, messages) is written
//! at most once per interval; the object is reconciled again when the interval ends, so the last
//! state is always written. A change of a condition's state is written at once, so `kubectl wait`,
//! kstatus and alerts never lag behind a transition.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Resource;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The status writes of one controller.
#[derive(Default)]
pub(crate) struct StatusWrites {
    interval: Option<Duration>,
    last: Mutex<HashMap<String, Instant>>,
}

impl StatusWrites {
    /// Progress writes at most once per `interval` (`None`: every change at once).
    pub(crate) fn new(interval: Option<Duration>) -> Self {
        Self {
            interval,
            last: Mutex::default(),
        }
    }

    fn last(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long to hold back a change of object `key`'s status from `stored` to `new` conditions
    /// (`None`: write it now). `stored` is `None` when the object has no status yet.
    pub(crate) fn hold(
        &self,
        key: &str,
        stored: Option<&[Condition]>,
        new: &[Condition],
        now: Instant,
    ) -> Option<Duration> {
        let interval = self.interval?;
        let stored = stored?;
        if states(stored) != states(new) {
            return None;
        }
        let since = now.saturating_duration_since(*self.last().get(key)?);
        interval.checked_sub(since).filter(|d| !d.is_zero())
    }

    /// Records that object `key`'s status was written at `now`.
    pub(crate) fn written(&self, key: &str, now: Instant) {
        if self.interval.is_some() {
            self.last().insert(key.to_owned(), now);
        }
    }

    /// Forgets a deleted object.
    pub(crate) fn forget(&self, key: &str) {
        self.last().remove(key);
    }
}

/// The objects whose status this controller wrote last, kept until the cache shows that write, so
/// a reconcile that starts before the watch delivered it reads the written object instead of an
/// older one (and computes its transitions, Events and status from what it wrote, not from before).
///
/// "Older" compares resourceVersions as numbers. Kubernetes documents them as opaque; the API
/// server takes them from etcd's revision, which only grows. Where one does not parse as a number
/// the cached object is used, as it would be without this.
pub(crate) struct Written<K>(Mutex<HashMap<String, Arc<K>>>);

impl<K> Default for Written<K> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

fn revision<K: Resource>(o: &K) -> Option<u64> {
    o.meta().resource_version.as_deref()?.parse().ok()
}

/// Whether the cache's copy is older than the written one (never, where a version is not a number).
fn behind<K: Resource>(cached: &K, written: &K) -> bool {
    matches!((revision(cached), revision(written)), (Some(seen), Some(wrote)) if seen < wrote)
}

impl<K: Resource> Written<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<K>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the object as the status write of object `key` returned it.
    pub(crate) fn wrote(&self, key: &str, obj: K) {
        self.lock().insert(key.to_owned(), Arc::new(obj));
    }

    /// The object to reconcile: `cached`, unless it is older than the last write.
    pub(crate) fn freshest(&self, key: &str, cached: Arc<K>) -> Arc<K> {
        let mut written = self.lock();
        let Some(ours) = written.get(key) else {
            return cached;
        };
        if behind(cached.as_ref(), ours) {
            return ours.clone();
        }
        written.remove(key);
        cached
    }

    /// The watch delivered `cached`: a write it shows is let go at once, not at the object's next
    /// reconcile, which may be long in coming (a settled object is reconciled only on resyncs), so
    /// that no copy of a settled object is held beside the cache's. Returns whether `cached` is
    /// exactly that write (the same `resourceVersion`): an event that tells the controller only
    /// what it wrote itself.
    pub(crate) fn seen(&self, key: &str, cached: &K) -> bool {
        let mut written = self.lock();
        let Some(ours) = written.get(key) else {
            return false;
        };
        let own = cached.meta().resource_version.is_some()
            && cached.meta().resource_version == ours.meta().resource_version;
        if !behind(cached, ours) {
            written.remove(key);
        }
        own
    }

    /// How many writes are held (for tests).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().len()
    }

    /// Forgets a deleted object.
    pub(crate) fn forget(&self, key: &str) {
        self.lock().remove(key);
    }
}

/// What a transition is made of: each condition's type, status and reason.
fn states(conditions: &[Condition]) -> BTreeSet<(&str, &str, &str)> {
    conditions
        .iter()
        .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(status: &str, reason: &str, message: &str) -> Condition {
        Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: None,
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::UNIX_EPOCH,
            ),
        }
    }

    fn config_map(rv: &str) -> Arc<k8s_openapi::api::core::v1::ConfigMap> {
        let mut c = k8s_openapi::api::core::v1::ConfigMap::default();
        c.metadata.resource_version = Some(rv.into());
        Arc::new(c)
    }

    #[test]
    fn status_writes_a_reconcile_reads_at_least_its_own_last_write() {
        let w = Written::default();
        let ours = config_map("12");
        w.wrote("a", ours.as_ref().clone());
        // The cache is behind the write: the written object is reconciled.
        let got = w.freshest("a", config_map("10"));
        assert_eq!(got.metadata.resource_version.as_deref(), Some("12"));
        // The cache caught up (or moved past it): the cache, and the write is forgotten.
        let got = w.freshest("a", config_map("13"));
        assert_eq!(got.metadata.resource_version.as_deref(), Some("13"));
        let got = w.freshest("a", config_map("11"));
        assert_eq!(got.metadata.resource_version.as_deref(), Some("11"));
        // Versions that are not numbers: the cache, as without this.
        w.wrote("b", config_map("x").as_ref().clone());
        let got = w.freshest("b", config_map("w"));
        assert_eq!(got.metadata.resource_version.as_deref(), Some("w"));
    }

    #[test]
    fn status_writes_a_write_the_watch_shows_is_let_go() {
        let w = Written::default();
        w.wrote("a", config_map("12").as_ref().clone());
        assert!(
            !w.seen("a", &config_map("11")),
            "an older event is not our write"
        );
        assert_eq!(w.held(), 1, "the watch is still behind the write");
        assert!(w.seen("a", &config_map("12")), "the event of our own write");
        assert_eq!(w.held(), 0, "the watch delivered the write");
        assert!(!w.seen("a", &config_map("12")), "told once");
        let got = w.freshest("a", config_map("12"));
        assert_eq!(got.metadata.resource_version.as_deref(), Some("12"));
    }

    #[test]
    fn status_writes_a_later_change_is_not_taken_for_our_write() {
        let w = Written::default();
        w.wrote("a", config_map("12").as_ref().clone());
        // Someone changed the object after our write before the watch caught up: news.
        assert!(!w.seen("a", &config_map("13")));
        assert_eq!(w.held(), 0);
    }

    #[test]
    fn status_writes_without_an_interval_nothing_is_held() {
        let w = StatusWrites::new(None);
        let t = Instant::now();
        w.written("a", t);
        let same = [cond("False", "Pulling", "1/3")];
        assert_eq!(w.hold("a", Some(&same), &same, t), None);
    }

    #[test]
    fn status_writes_progress_is_held_until_the_interval_ends() {
        let w = StatusWrites::new(Some(Duration::from_secs(2)));
        let t = Instant::now();
        let before = [cond("False", "Pulling", "1/3")];
        let after = [cond("False", "Pulling", "2/3")];
        // Nothing written yet by this process: write.
        assert_eq!(w.hold("a", Some(&before), &after, t), None);
        w.written("a", t);
        let half = t + Duration::from_millis(500);
        assert_eq!(
            w.hold("a", Some(&before), &after, half),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            w.hold("a", Some(&before), &after, t + Duration::from_secs(2)),
            None
        );
        // Another object has its own interval.
        assert_eq!(w.hold("b", Some(&before), &after, half), None);
    }

    #[test]
    fn status_writes_transitions_and_first_statuses_are_written_at_once() {
        let w = StatusWrites::new(Some(Duration::from_secs(2)));
        let t = Instant::now();
        w.written("a", t);
        let pulling = [cond("False", "Pulling", "2/3")];
        let cached = [cond("True", "Cached", "3/3")];
        assert_eq!(w.hold("a", Some(&pulling), &cached, t), None);
        assert_eq!(w.hold("a", None, &pulling, t), None);
        w.forget("a");
        assert_eq!(w.hold("a", Some(&pulling), &pulling, t), None);
    }
}
