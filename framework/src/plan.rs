//! The value a reconcile returns: what the world should look like, which the framework then makes so.

use crate::children::{Child, ChildKey};
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

    /// Reconcile again after `after`; several calls keep the earliest.
    pub fn requeue_after(mut self, after: Duration) -> Self {
        self.requeue = Some(self.requeue.map_or(after, |d| d.min(after)));
        self
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
