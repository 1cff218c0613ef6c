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
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
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
