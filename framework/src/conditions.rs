//! Helpers over `metav1.Condition`, the standard status condition.
//!
//! A condition list is keyed by `type`: [`set`] replaces the entry of the same type, keeps its
//! `lastTransitionTime` unless `status` flips, and stamps the generation the condition was computed from.
//! Writing the same observation twice therefore leaves the list unchanged, which is what lets the
//! framework skip status writes that would change nothing.
//!
//! ```
//! use kube_plan::conditions::{self, Cond};
//! use kube_plan::Timestamp;
//!
//! let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
//! let t1: Timestamp = "2026-01-01T00:05:00Z".parse().unwrap();
//! let mut list = Vec::new();
//!
//! conditions::set(&mut list, Cond::new("Ready", false, "Pulling", "1/3 nodes ready"), Some(4), t0);
//! // Same status, new message: the transition time stays at t0.
//! conditions::set(&mut list, Cond::new("Ready", false, "Pulling", "2/3 nodes ready"), Some(4), t1);
//! assert_eq!(list[0].last_transition_time.0, t0);
//! // The status flips: the transition time moves.
//! conditions::set(&mut list, Cond::new("Ready", true, "Cached", "3/3 nodes ready"), Some(5), t1);
//! assert_eq!(list[0].last_transition_time.0, t1);
//! assert_eq!(list[0].observed_generation, Some(5));
//! assert!(conditions::is_true(&list, "Ready"));
//! ```

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The condition type that `kubectl wait --for=condition=Ready` and kstatus-based tools read.
pub const READY: &str = "Ready";

/// One observation to record: a condition without the bookkeeping fields the framework fills in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    /// The condition type, in PascalCase (`Ready`, `PullProgress`).
    pub type_: String,
    /// Whether the condition holds. `None` records `Unknown`.
    pub status: Option<bool>,
    /// A PascalCase word a program can switch on.
    pub reason: String,
    /// A sentence for humans.
    pub message: String,
}

impl Cond {
    /// An observation whose status is known.
    pub fn new(type_: &str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_: type_.to_owned(),
            status: Some(status),
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    /// An observation whose status cannot be determined yet.
    pub fn unknown(type_: &str, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_: type_.to_owned(),
            status: None,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    /// A `Ready` condition.
    pub fn ready(status: bool, reason: &str, message: impl Into<String>) -> Self {
        Self::new(READY, status, reason, message)
    }

    fn status_str(&self) -> &'static str {
        match self.status {
            Some(true) => "True",
            Some(false) => "False",
            None => "Unknown",
        }
    }
}

/// Records `cond` in `list`, replacing any condition of the same type.
///
/// `lastTransitionTime` becomes `now` only when the condition is new or its status changed.
/// Returns whether the list changed.
pub fn set(list: &mut Vec<Condition>, cond: Cond, generation: Option<i64>, now: Timestamp) -> bool {
    let status = cond.status_str();
    match list.iter_mut().find(|c| c.type_ == cond.type_) {
        Some(existing) => {
            let transition = if existing.status == status {
                existing.last_transition_time.clone()
            } else {
                Time(now)
            };
            let updated = Condition {
                last_transition_time: transition,
                message: cond.message,
                observed_generation: generation,
                reason: cond.reason,
                status: status.to_owned(),
                type_: cond.type_,
            };
            let changed = *existing != updated;
            *existing = updated;
            changed
        }
        None => {
            list.push(Condition {
                last_transition_time: Time(now),
                message: cond.message,
                observed_generation: generation,
                reason: cond.reason,
                status: status.to_owned(),
                type_: cond.type_,
            });
            true
        }
    }
}

/// Removes the condition of type `type_`. Returns whether one was removed.
pub fn remove(list: &mut Vec<Condition>, type_: &str) -> bool {
    let before = list.len();
    list.retain(|c| c.type_ != type_);
    list.len() != before
}

/// The condition of type `type_`, if recorded.
pub fn get<'a>(list: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    list.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of type `type_` is recorded with status `True`.
pub fn is_true(list: &[Condition], type_: &str) -> bool {
    get(list, type_).is_some_and(|c| c.status == "True")
}

/// Sets `observedGeneration` on every condition of the list.
pub fn stamp_generation(list: &mut [Condition], generation: Option<i64>) {
    for c in list {
        c.observed_generation = generation;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn conditions_new_type_is_appended_with_now() {
        let mut list = vec![];
        assert!(set(
            &mut list,
            Cond::ready(true, "Cached", "ok"),
            Some(1),
            ts("2026-01-01T00:00:00Z")
        ));
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].status, "True");
        assert_eq!(list[0].last_transition_time.0, ts("2026-01-01T00:00:00Z"));
        assert_eq!(list[0].observed_generation, Some(1));
    }

    #[test]
    fn conditions_identical_observation_changes_nothing() {
        let mut list = vec![];
        set(
            &mut list,
            Cond::ready(true, "Cached", "ok"),
            Some(1),
            ts("2026-01-01T00:00:00Z"),
        );
        let before = list.clone();
        assert!(!set(
            &mut list,
            Cond::ready(true, "Cached", "ok"),
            Some(1),
            ts("2026-01-02T00:00:00Z")
        ));
        assert_eq!(list, before);
    }

    #[test]
    fn conditions_transition_time_moves_only_on_status_flip() {
        let mut list = vec![];
        set(
            &mut list,
            Cond::ready(false, "Pulling", "a"),
            Some(1),
            ts("2026-01-01T00:00:00Z"),
        );
        assert!(set(
            &mut list,
            Cond::ready(false, "Stalled", "b"),
            Some(1),
            ts("2026-01-01T01:00:00Z")
        ));
        assert_eq!(list[0].last_transition_time.0, ts("2026-01-01T00:00:00Z"));
        assert_eq!(list[0].reason, "Stalled");
        set(
            &mut list,
            Cond::ready(true, "Cached", "c"),
            Some(1),
            ts("2026-01-01T02:00:00Z"),
        );
        assert_eq!(list[0].last_transition_time.0, ts("2026-01-01T02:00:00Z"));
        set(
            &mut list,
            Cond::unknown(READY, "Unknown", "d"),
            Some(1),
            ts("2026-01-01T03:00:00Z"),
        );
        assert_eq!(list[0].status, "Unknown");
        assert_eq!(list[0].last_transition_time.0, ts("2026-01-01T03:00:00Z"));
    }

    #[test]
    fn conditions_types_are_independent_and_removable() {
        let mut list = vec![];
        let t = ts("2026-01-01T00:00:00Z");
        set(&mut list, Cond::ready(true, "Cached", ""), None, t);
        set(
            &mut list,
            Cond::new("PullProgress", false, "Complete", ""),
            None,
            t,
        );
        assert_eq!(list.len(), 2);
        assert!(is_true(&list, READY));
        assert!(!is_true(&list, "PullProgress"));
        assert!(!is_true(&list, "Missing"));
        assert!(remove(&mut list, READY));
        assert!(!remove(&mut list, READY));
        assert_eq!(
            get(&list, "PullProgress").map(|c| c.reason.as_str()),
            Some("Complete")
        );
    }

    #[test]
    fn conditions_generation_stamp_reaches_every_condition() {
        let mut list = vec![];
        let t = ts("2026-01-01T00:00:00Z");
        set(&mut list, Cond::ready(true, "A", ""), Some(1), t);
        set(&mut list, Cond::new("B", true, "B", ""), Some(1), t);
        stamp_generation(&mut list, Some(7));
        assert!(list.iter().all(|c| c.observed_generation == Some(7)));
    }
}
