//! One reconcile, start to end: the reconciler's plan carried out (children, status, Events),
//! errors reported on the object with per-object backoff, and the metrics of each run.

use super::triggers::{Owed, Triggers};
use super::{CHILD_CONFLICT, ExecError, RECONCILED};
use crate::ObjectStatus;
use crate::backoff::BackoffTracker;
use crate::conditions::{self, Cond};
use crate::executor::{Executor, dynamic_api};
use crate::metrics::Metrics;
use crate::owned::OwnedView;
use crate::plan::{EventKind, PlannedEvent};
use crate::reconciler::{Caches, Context, Reconciler};
use crate::status_writes::{StatusWrites, Written};
use futures::future::BoxFuture;
use jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::core::object::HasStatus;
use kube::core::{ApiResource, DynamicObject};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// What each reconcile of one controller shares: its reconciler, client, caches and bookkeeping.
pub(super) struct Runtime<R: Reconciler>
where
    <R::Resource as HasStatus>::Status: ObjectStatus + Serialize + Clone + Default + Send + Sync,
{
    pub(super) name: String,
    pub(super) reconciler: R,
    pub(super) client: Client,
    pub(super) recorder: Recorder,
    pub(super) metrics: Metrics,
    pub(super) finalizer: Option<String>,
    pub(super) executor: Executor,
    pub(super) caches: Arc<Caches>,
    pub(super) backoff: Mutex<BackoffTracker>,
    pub(super) status_writes: StatusWrites,
    pub(super) written: Arc<Written<R::Resource>>,
    pub(super) synced: futures::future::Shared<BoxFuture<'static, ()>>,
    /// A permit per worker: objects due a reconcile take one in the order they became due.
    pub(super) worker_permits: Arc<Semaphore>,
    /// The primaries' cache, read again once a worker is free (the object may have changed, or
    /// gone, while it waited).
    pub(super) primaries: Store<R::Resource>,
    /// Whether a run still owes its object anything (see `triggers.rs`).
    pub(super) triggers: Arc<Triggers<R::Resource>>,
}

/// What kube-runtime is told after a run: to run the object again after `requeue`, if any.
fn action(requeue: Option<Duration>) -> Action {
    requeue.map_or_else(Action::await_change, Action::requeue)
}

/// Never fails: every error is reported on the object and retried with backoff.
#[derive(Debug, thiserror::Error)]
#[error("unreachable")]
pub(crate) struct Never;

impl<R: Reconciler> Runtime<R>
where
    <R::Resource as HasStatus>::Status: ObjectStatus + Serialize + Clone + Default + Send + Sync,
{
    pub(super) async fn reconcile(self: Arc<Self>, obj: Arc<R::Resource>) -> Result<Action, Never> {
        // Only the key waits: holding the object would keep this version alive beside the
        // cache's newer ones for as long as the wait lasts (at 5000 nodes, a CachedImage's status
        // alone is hundreds of kilobytes).
        let key = ObjectRef::from_obj(obj.as_ref());
        drop(obj);
        self.synced.clone().await;
        // kube-runtime starts one more run of an object that had triggers while its last run was
        // in progress; if that run read the object after them, they are answered.
        if let Owed::Nothing { requeue } = self.triggers.owed(&key, Instant::now()) {
            tracing::trace!(controller = %self.name, object = %key, "nothing new since the last read");
            return Ok(action(requeue));
        }
        // kube-runtime runs every due object at once (the controller's concurrency is ours to
        // keep): at its own limit it would pick among the waiting objects in hash order, so that
        // objects which keep coming back could pass over others for good. The semaphore hands
        // out its permits first come, first served.
        let waiting = self.metrics.waiting.with_label_values(&[&self.name]);
        let since = Instant::now();
        waiting.inc();
        let worker = self.worker_permits.acquire().await;
        waiting.dec();
        self.metrics
            .wait_time
            .with_label_values(&[&self.name])
            .observe(since.elapsed().as_secs_f64());
        let Ok(_worker) = worker else {
            return Ok(Action::await_change());
        };
        // Numbered before the cache is read: a trigger numbered earlier had its change in the
        // cache by then (a watch stores a change before it passes the event on).
        self.triggers.read(&key);
        let Some(obj) = self.primaries.get(&key) else {
            // Deleted while it waited: the deletion is handed to the reconciler on its own.
            self.triggers.forget(&key);
            return Ok(Action::await_change());
        };
        // The run itself lives on the heap: an object waiting for a worker holds only the above.
        let requeue = Box::pin(self.run(obj)).await;
        self.triggers.requeued(&key, requeue, Instant::now());
        Ok(action(requeue))
    }

    /// Reconciles `obj`; returns when to run it again, if the run asks for it (or failed).
    async fn run(&self, obj: Arc<R::Resource>) -> Option<Duration> {
        let started = Instant::now();
        let workers = self.metrics.active_workers.with_label_values(&[&self.name]);
        workers.inc();
        let key = obj.uid().unwrap_or_else(|| obj.name_any());
        let obj = self.written.freshest(&key, obj);
        let outcome = self.reconcile_inner(&obj).await;
        workers.dec();
        self.metrics
            .reconcile_time
            .with_label_values(&[&self.name])
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(requeue) => {
                self.backoff_lock().success(&key);
                let result = if requeue.is_some() {
                    "requeue_after"
                } else {
                    "success"
                };
                self.metrics.count_reconcile(&self.name, result);
                requeue
            }
            Err(message) => {
                let delay = self.backoff_lock().failure(&key);
                self.metrics.count_reconcile(&self.name, "error");
                self.metrics
                    .reconcile_errors
                    .with_label_values(&[&self.name])
                    .inc();
                tracing::warn!(controller = %self.name, object = %obj.name_any(), error = %message,
                    retry_in = ?delay, "reconcile failed");
                self.report_error(&obj, &message).await;
                Some(delay)
            }
        }
    }

    fn backoff_lock(&self) -> std::sync::MutexGuard<'_, BackoffTracker> {
        self.backoff.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one reconcile; the error is a message for users (the error and its causes).
    async fn reconcile_inner(&self, obj: &Arc<R::Resource>) -> Result<Option<Duration>, String> {
        // The children this reconcile sees: the reconciler reads them, and only they can be pruned.
        let owned = match obj.uid() {
            Some(uid) => OwnedView::take(&self.executor.stores, &self.executor.label_key, &uid),
            None => OwnedView::default(),
        };
        let ctx = Context::new(self.client.clone(), Timestamp::now()).with_caches(
            self.caches.clone(),
            obj.uid(),
            owned.clone(),
        );
        if obj.meta().deletion_timestamp.is_some() {
            // Going away: children are garbage-collected; only our own finalizer needs work. The
            // reconciler lets go of what it keeps about the object now, not when (if ever) it is gone.
            self.reconciler.deleted(obj);
            if let Some(fin) = &self.finalizer
                && obj.finalizers().iter().any(|f| f == fin)
            {
                self.reconciler
                    .cleanup(obj, &ctx)
                    .await
                    .map_err(|e| chain(&e))?;
                self.set_finalizer(obj, false)
                    .await
                    .map_err(|e| chain(&e))?;
            }
            return Ok(None);
        }
        if let Some(fin) = &self.finalizer
            && !obj.finalizers().iter().any(|f| f == fin)
        {
            self.set_finalizer(obj, true).await.map_err(|e| chain(&e))?;
        }
        let plan = self
            .reconciler
            .reconcile(obj, &ctx)
            .await
            .map_err(|e| chain(&e))?;
        let owner = obj
            .controller_owner_ref(&())
            .ok_or_else(|| chain(&ExecError::NoUid(obj.name_any())))?;
        let unapplied = self
            .executor
            .run(&owner, owned.existing(), &plan.children, &plan.kept)
            .await
            .map_err(|e| chain(&e))?;
        let conflicts = unapplied.conflicts;
        let refused = unapplied.refused;

        // The children are in place: a requeue at a given moment is measured from here.
        let mut requeue = plan.requeue_as_of(Timestamp::now());
        let mut status = plan.status.or_else(|| obj.status().cloned());
        if let Some(status) = status.as_mut()
            && let Some(list) = status.conditions_mut()
        {
            conditions::remove(list, RECONCILED);
            if conflicts.is_empty() {
                conditions::remove(list, CHILD_CONFLICT);
            } else {
                let message = conflicts
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                conditions::set(
                    list,
                    Cond::new(CHILD_CONFLICT, true, "ControlledElsewhere", message),
                    None,
                    ctx.now(),
                );
            }
        }
        if let Some(status) = status
            && let Some(wait) = self
                .write_status(obj, status, true)
                .await
                .map_err(|e| chain(&e))?
        {
            requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
        }
        let mut events = plan.events;
        for c in &conflicts {
            events.push(PlannedEvent {
                kind: EventKind::Warning,
                reason: "ChildConflict".into(),
                message: format!("left alone: {c}"),
                action: "ApplyChild".into(),
            });
        }
        for r in &refused {
            events.push(PlannedEvent {
                kind: EventKind::Warning,
                reason: "ChildRefused".into(),
                message: r.to_string(),
                action: "ApplyChild".into(),
            });
        }
        self.publish(obj, &events).await;
        if !refused.is_empty() && !self.reconciler.refused(obj, &refused) {
            return Err(refused
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "));
        }
        Ok(requeue)
    }

    async fn set_finalizer(&self, obj: &R::Resource, present: bool) -> Result<(), ExecError> {
        let Some(fin) = &self.finalizer else {
            return Ok(());
        };
        let mut list: Vec<String> = obj.finalizers().to_vec();
        list.retain(|f| f != fin);
        if present {
            list.push(fin.clone());
        }
        // A JSON patch guarded by the resourceVersion, so a concurrent finalizer change is not lost.
        let patch = serde_json::json!({
            "metadata": {"finalizers": list, "resourceVersion": obj.resource_version()}
        });
        self.api_for(obj)
            .patch(
                &obj.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map(|_| ())
            .map_err(|source| ExecError::Api {
                action: "updating finalizers of",
                target: obj.name_any(),
                source,
            })
    }

    /// The primary's own endpoint, whatever its scope.
    fn api_for(&self, obj: &R::Resource) -> Api<DynamicObject> {
        let ar = ApiResource::erase::<R::Resource>(&());
        dynamic_api(&self.client, &ar, obj.namespace().as_deref())
    }

    /// Writes `status` (with observedGeneration stamped) by server-side apply, unless it equals the
    /// stored one.
    async fn write_status(
        &self,
        obj: &R::Resource,
        mut status: <R::Resource as HasStatus>::Status,
        coalesce: bool,
    ) -> Result<Option<Duration>, ExecError> {
        let generation = obj.meta().generation;
        status.set_observed_generation(generation);
        if let Some(list) = status.conditions_mut() {
            conditions::stamp_generation(list, generation);
        }
        // Compared as serialised bytes: an object with a long list in its status is reconciled
        // often, and building two JSON trees of it each time would cost more than the reconcile.
        let to_vec = |s: &<R::Resource as HasStatus>::Status| {
            serde_json::to_vec(s).map_err(|source| ExecError::Status {
                name: obj.name_any(),
                source,
            })
        };
        let new = to_vec(&status)?;
        if let Some(current) = obj.status()
            && to_vec(current)? == new
        {
            return Ok(None);
        }
        let key = obj.uid().unwrap_or_else(|| obj.name_any());
        let stored = obj.status().map(ObjectStatus::conditions);
        if coalesce
            && let Some(wait) =
                self.status_writes
                    .hold(&key, stored, status.conditions(), Instant::now())
        {
            return Ok(Some(wait));
        }
        let body = serde_json::json!({
            "apiVersion": R::Resource::api_version(&()),
            "kind": R::Resource::kind(&()),
            "status": status,
        });
        let answer = self
            .api_for(obj)
            .patch_status(
                &obj.name_any(),
                &PatchParams::apply(&self.name).force(),
                &Patch::Apply(&body),
            )
            .await;
        let answer = match answer {
            Ok(a) => a,
            // Deleted since the reconcile began: there is nothing left to describe, and a deletion
            // is not an error.
            Err(kube::Error::Api(s)) if s.code == 404 => {
                tracing::debug!(controller = %self.name, object = %obj.name_any(), "object gone before its status was written");
                return Ok(None);
            }
            Err(source) => {
                return Err(ExecError::Api {
                    action: "writing status of",
                    target: obj.name_any(),
                    source,
                });
            }
        };
        self.status_writes.written(&key, Instant::now());
        if let Ok(mut written) = answer.try_parse::<R::Resource>() {
            written.meta_mut().managed_fields = None;
            self.written.wrote(&key, written);
        }
        Ok(None)
    }

    async fn report_error(&self, obj: &R::Resource, message: &str) {
        if obj.meta().deletion_timestamp.is_none() {
            let mut status = obj.status().cloned().unwrap_or_default();
            if let Some(list) = status.conditions_mut() {
                conditions::set(
                    list,
                    Cond::new(RECONCILED, false, "ReconcileError", message),
                    None,
                    Timestamp::now(),
                );
                if let Err(e) = self.write_status(obj, status, false).await {
                    tracing::warn!(controller = %self.name, error = %e, "recording reconcile error");
                }
            }
        }
        let event = PlannedEvent {
            kind: EventKind::Warning,
            reason: "ReconcileError".into(),
            message: message.to_owned(),
            action: "Reconcile".into(),
        };
        self.publish(obj, std::slice::from_ref(&event)).await;
    }

    async fn publish(&self, obj: &R::Resource, events: &[PlannedEvent]) {
        let reference = obj.object_ref(&());
        for e in events {
            let ev = Event {
                type_: match e.kind {
                    EventKind::Normal => EventType::Normal,
                    EventKind::Warning => EventType::Warning,
                },
                reason: e.reason.clone(),
                note: Some(truncate(&e.message, 1000)),
                action: e.action.clone(),
                secondary: None,
            };
            if let Err(err) = self.recorder.publish(&ev, &reference).await {
                tracing::warn!(controller = %self.name, reason = %e.reason, error = %err, "publishing event");
            }
        }
    }
}

/// An error and its causes as one line for users: each cause once, API errors by their message (not
/// kube's debug rendering of the whole Status object).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let text = |e: &(dyn std::error::Error + 'static)| match e.downcast_ref::<kube::Error>() {
        Some(k) => crate::describe(k),
        None => e.to_string(),
    };
    let mut out = text(e);
    let mut source = e.source();
    while let Some(s) = source {
        let text = text(s);
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn controller_error_chain_names_every_cause() {
        let e = Outer(std::io::Error::other("inner cause"));
        assert_eq!(chain(&e), "outer: inner cause");
    }

    #[test]
    fn controller_truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
