//! The value a reconcile returns: what the world should look like, which the framework then makes so.

use crate::children::{Child, ChildKey};
use jiff::Timestamp;
use kube::core::object::HasStatus;
use std::time::Duration;

/// Severity of a planned Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Something happened that is worth knowing.
    Normal,
    /// Something went wrong or needs attention.
    Warning,
}

/// An Event to publish about the primary object. Repeats of the same (kind, reason, action) are
/// aggregated by the shared recorder into one Event with a count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    /// Severity.
    pub kind: EventKind,
    /// PascalCase reason, e.g. `PullFailed`.
    pub reason: String,
    /// Sentence for humans.
    pub message: String,
    /// What was done, e.g. `Reconcile`.
    pub action: String,
}

/// The outcome of one reconcile: the status to record, the children that should exist, Events to
/// publish, and when to look again.
///
/// The framework executes a plan by server-side applying each child (with a controller owner reference
/// and the owner label), deleting owned children that are no longer planned, writing the status only if
/// it differs from the stored one, and publishing the Events.
///
/// ```
/// use kube_plan::{Plan, Status};
/// use std::time::Duration;
/// # use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
/// # #[derive(Clone, Default, Status)]
/// # struct WidgetStatus { #[status(conditions)] conditions: Vec<Condition> }
/// # struct Widget;
/// # impl kube::core::object::HasStatus for Widget {
/// #     type Status = WidgetStatus;
/// #     fn status(&self) -> Option<&WidgetStatus> { None }
/// #     fn status_mut(&mut self) -> &mut Option<WidgetStatus> { unimplemented!() }
/// # }
/// let plan: Plan<Widget> = Plan::new()
///     .status(WidgetStatus::default())
///     .requeue_after(Duration::from_secs(30));
/// assert_eq!(plan.requeue, Some(Duration::from_secs(30)));
/// assert!(plan.children.is_empty());
/// ```
pub struct Plan<K: HasStatus> {
    /// The status to record; `None` leaves the stored status alone.
    pub status: Option<K::Status>,
    /// Every child that should exist, applied as given. Owned children neither here nor in `kept` are
    /// deleted.
    pub children: Vec<Child>,
    /// Owned children that should go on existing as they are (not applied again, not deleted).
    pub kept: Vec<ChildKey>,
    /// Reconcile again after this long even without a change (`None`: wait for a change).
    pub requeue: Option<Duration>,
    /// Reconcile again at this moment even without a change; the wait is measured when the plan
    /// has been carried out. With `requeue` too, the earlier of the two wins.
    pub requeue_at: Option<Timestamp>,
    /// Events to publish.
    pub events: Vec<PlannedEvent>,
}

impl<K: HasStatus> Default for Plan<K> {
    fn default() -> Self {
        Self {
            status: None,
            children: Vec::new(),
            kept: Vec::new(),
            requeue: None,
            requeue_at: None,
            events: Vec::new(),
        }
    }
}

impl<K: HasStatus> Plan<K> {
    /// An empty plan: no status change, no children, wait for a change.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `status`.
    pub fn status(mut self, status: K::Status) -> Self {
        self.status = Some(status);
        self
    }

    /// Adds one child.
    pub fn child(mut self, child: Child) -> Self {
        self.children.push(child);
        self
    }

    /// Adds several children.
    pub fn children(mut self, children: impl IntoIterator<Item = Child>) -> Self {
        self.children.extend(children);
        self
    }

    /// Keeps an existing child as it is: it is neither applied again nor deleted. Use it for children
    /// that must not be touched while they work (a running Pod's spec cannot change anyway).
    pub fn keep<C>(mut self, obj: &C) -> Self
    where
        C: kube::Resource<DynamicType = ()>,
    {
        if let Some(name) = obj.meta().name.clone() {
            self.kept.push(ChildKey {
                api_version: C::api_version(&()).into_owned(),
                kind: C::kind(&()).into_owned(),
                namespace: obj.meta().namespace.clone(),
                name,
            });
        }
        self
    }

    /// Keeps the `n` newest of `children`, newest by `age` (a larger key is newer); the rest are
    /// left out and so, unless applied or kept otherwise, pruned. A retention policy in one call:
    /// "keep the last three finished runs".
    ///
    /// ```
    /// use k8s_openapi::api::core::v1::ConfigMap;
    /// use kube_plan::Plan;
    /// # #[derive(Clone, Default)] struct S;
    /// # struct W;
    /// # impl kube::core::object::HasStatus for W {
    /// #     type Status = S;
    /// #     fn status(&self) -> Option<&S> { None }
    /// #     fn status_mut(&mut self) -> &mut Option<S> { unimplemented!() }
    /// # }
    /// // As `Context::owned` gives them.
    /// let runs: Vec<std::sync::Arc<ConfigMap>> = (1..=5)
    ///     .map(|i| {
    ///         let mut cm = ConfigMap::default();
    ///         cm.metadata.name = Some(format!("run-{i}"));
    ///         cm.into()
    ///     })
    ///     .collect();
    /// let plan: Plan<W> = Plan::new().keep_newest(&runs, 2, |cm| cm.metadata.name.clone());
    /// let kept: Vec<&str> = plan.kept.iter().map(|k| k.name.as_str()).collect();
    /// assert_eq!(kept, ["run-5", "run-4"]);
    /// ```
    pub fn keep_newest<C, A, T>(
        self,
        children: impl IntoIterator<Item = A>,
        n: usize,
        age: impl Fn(&C) -> T,
    ) -> Self
    where
        C: kube::Resource<DynamicType = ()>,
        A: AsRef<C>,
        T: Ord,
    {
        let mut children: Vec<A> = children.into_iter().collect();
        children.sort_by_cached_key(|c| std::cmp::Reverse(age(c.as_ref())));
        children
            .iter()
            .take(n)
            .fold(self, |plan, c| plan.keep(c.as_ref()))
    }

    /// Reconcile again after `after`; several calls keep the earliest.
    pub fn requeue_after(mut self, after: Duration) -> Self {
        self.requeue = Some(self.requeue.map_or(after, |d| d.min(after)));
        self
    }

    /// Reconcile again at `at` (a schedule's next run, a deadline); several calls keep the earliest.
    /// A moment already past reconciles again at once.
    pub fn requeue_at(mut self, at: Timestamp) -> Self {
        self.requeue_at = Some(self.requeue_at.map_or(at, |t| t.min(at)));
        self
    }

    /// The wait before the next reconcile, as of `now`: the earlier of `requeue` and `requeue_at`.
    pub fn requeue_as_of(&self, now: Timestamp) -> Option<Duration> {
        let at = self
            .requeue_at
            .map(|at| Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO));
        match (self.requeue, at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Publishes a Normal Event.
    pub fn event(self, reason: &str, message: impl Into<String>) -> Self {
        self.emit(EventKind::Normal, reason, message)
    }

    /// Publishes a Warning Event.
    pub fn warning(self, reason: &str, message: impl Into<String>) -> Self {
        self.emit(EventKind::Warning, reason, message)
    }

    /// Publishes an Event of `kind` (for a reconciler that decides the severity elsewhere).
    pub fn emit(mut self, kind: EventKind, reason: &str, message: impl Into<String>) -> Self {
        self.events.push(PlannedEvent {
            kind,
            reason: reason.to_owned(),
            message: message.into(),
            action: "Reconcile".to_owned(),
        });
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct S;
    struct W;
    impl HasStatus for W {
        type Status = S;
        fn status(&self) -> Option<&S> {
            None
        }
        fn status_mut(&mut self) -> &mut Option<S> {
            unimplemented!()
        }
    }

    #[test]
    fn plan_requeue_at_is_measured_from_the_given_moment_and_the_earliest_wins() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let in_10s = now + jiff::SignedDuration::from_secs(10);
        let plan: Plan<W> = Plan::new().requeue_at(in_10s);
        assert_eq!(plan.requeue_as_of(now), Some(Duration::from_secs(10)));
        let plan = plan.requeue_at(now + jiff::SignedDuration::from_secs(4));
        assert_eq!(plan.requeue_as_of(now), Some(Duration::from_secs(4)));
        let plan = plan.requeue_after(Duration::from_secs(2));
        assert_eq!(plan.requeue_as_of(now), Some(Duration::from_secs(2)));
        let passed: Plan<W> = Plan::new().requeue_at(now);
        let later = now + jiff::SignedDuration::from_secs(1);
        assert_eq!(
            passed.requeue_as_of(later),
            Some(Duration::ZERO),
            "past: at once"
        );
        assert_eq!(Plan::<W>::new().requeue_as_of(now), None);
    }
}
