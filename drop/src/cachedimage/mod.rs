//! The CachedImage controller: keeps one image cached on its target nodes.
//!
//! Each reconcile observes (target nodes from the Node cache, the image's pull Pods, its PullPolicy),
//! lets the shared [`pacer::Pacer`] record outcomes and decide which pulls start now, and returns a
//! plan: the new pull Pods, the Pods still pulling (kept), the status, and a transition Event. Finished
//! and stale Pods are not in the plan, so the framework deletes them.

pub mod pacer;
pub mod presence;
pub mod status;
pub mod targets;

use crate::api::{CachedImage, PullPolicy};
use crate::metrics::Metrics;
use crate::pacing::{Pace, PolicyKey};
use crate::podbuilder::{self, PullOutcome, PullPod, PullPodView};
use crate::warmup::Warden;
use k8s_openapi::api::core::v1::{Node, Pod, Toleration};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube_plan::{Child, Context, Plan, Reconciler};
use pacer::{Ended, Pacer, Step};
use status::Blocked;
use std::sync::Arc;

/// Errors of a CachedImage reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pull Pod could not be built.
    #[error("building the pull Pod: {0}")]
    Build(#[from] podbuilder::BuildError),
    /// A pull Pod could not become a child.
    #[error("planning the pull Pod: {0}")]
    Child(#[from] kube_plan::children::ChildError),
}

/// Reconciles CachedImages.
pub struct CachedImageReconciler {
    /// The operator's pacing state.
    pub pacer: Arc<Pacer>,
    /// Namespace of the pull Pods.
    pub namespace: String,
    /// Drop's metrics.
    pub metrics: Metrics,
    /// Tolerations every pull Pod carries besides its image's and policy's (the warm-up taint's);
    /// targeting counts them too.
    pub tolerations: Vec<Toleration>,
    /// Removes the warm-up taint from nodes whose images are cached (`None`: warm-up is off).
    pub warden: Option<Arc<Warden>>,
    /// The target nodes of each targeting, judged again only for nodes that changed.
    pub targets: targets::TargetMemo,
}

/// Whether a pull Pod's change, from the outcome it showed last (`None`: first sight; `Some(None)`:
/// not a pull Pod) to its outcome now (`None`: deleted), is news to its image's reconcile: the end
/// of the pull, or the Pod's loss before that end. A Pod appearing mid-pull is not (the reconcile
/// that created it counts it in flight, and one that never appears fails after a grace period),
/// nor the deletion of a Pod whose end was seen.
pub fn pull_pod_news(
    before: Option<&Option<PullOutcome>>,
    after: Option<&Option<PullOutcome>>,
) -> bool {
    let pulling = |o: Option<&Option<PullOutcome>>| matches!(o, Some(Some(PullOutcome::Pulling)));
    let ended = |o: Option<&Option<PullOutcome>>| matches!(o, Some(Some(outcome)) if *outcome != PullOutcome::Pulling);
    match (before, after) {
        (None, after) => !pulling(after),
        (before, None) => !ended(before),
        (before, after) => before != after,
    }
}

/// The CachedImages a PullPolicy change concerns.
pub fn images_using(
    policy: &PullPolicy,
    images: &[Arc<CachedImage>],
) -> Vec<ObjectRef<CachedImage>> {
    let name = policy.name_any();
    images
        .iter()
        .filter(|i| i.spec.policy_ref.as_ref().is_some_and(|r| r.name == name))
        .map(|i| ObjectRef::from_obj(i.as_ref()))
        .collect()
}

impl CachedImageReconciler {
    /// Counts again the images missing on the warming nodes among `targets`: this reconcile may
    /// have recorded the last of them as cached.
    fn check_warming(&self, targets: &[String], nodes: &[Arc<Node>], ctx: &Context) {
        let Some(warden) = &self.warden else { return };
        let warming = warden.warming_among(targets);
        if warming.is_empty() {
            return;
        }
        let images = ctx.cached::<CachedImage>();
        for name in warming {
            if let Some(node) = nodes
                .iter()
                .find(|n| n.metadata.name.as_ref() == Some(&name))
            {
                warden.checked(
                    &name,
                    self.pacer.missing_on(node, &images, warden.judging()),
                );
            }
        }
    }

    /// `drop_active_pulls`: the pulls in flight across every image; and per registry with a budget,
    /// its pulls in flight and the images waiting on it.
    fn publish_active_pulls(&self) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics
            .active_pulls
            .set(gauge(self.pacer.active_pulls()));
        for load in self.pacer.registry_loads() {
            let registry: &[&str] = &[&load.registry];
            self.metrics
                .registry_in_flight
                .with_label_values(registry)
                .set(gauge(load.in_flight));
            self.metrics
                .registry_waiting
                .with_label_values(registry)
                .set(gauge(load.waiting_images));
        }
    }
}

impl Reconciler for CachedImageReconciler {
    type Resource = CachedImage;
    type Error = Error;

    async fn reconcile(
        &self,
        image: &CachedImage,
        ctx: &Context,
    ) -> Result<Plan<CachedImage>, Error> {
        let name = image.name_any();
        let policies = ctx.cached::<PullPolicy>();
        let policy = image.spec.policy_ref.as_ref().map(|r| {
            policies
                .iter()
                .find(|p| p.name_any() == r.name)
                .ok_or(&r.name)
        });
        let (pace, policy_spec) = match policy {
            None => (Ok((None, Pace::builtin())), None),
            Some(Ok(p)) => (
                Ok((Some(Arc::from(p.name_any())), Pace::from_spec(&p.spec))),
                Some(&p.spec),
            ),
            Some(Err(missing)) => (Err(Blocked::PolicyNotFound(missing.clone())), None),
        };
        let nodes = ctx.cached::<Node>();
        let target_nodes =
            self.targets
                .targets(&nodes, &image.spec, policy_spec, &self.tolerations);
        let pods = ctx.owned::<Pod>();
        let views: Vec<PullPodView> = pods.iter().filter_map(|p| PullPodView::of(p)).collect();
        // Images being deleted are not reconciled again and never register their targets: they
        // must not hold back their policy (an image stuck under someone else's finalizer would,
        // for ever).
        let known: Vec<(String, PolicyKey)> = ctx
            .cached::<CachedImage>()
            .iter()
            .filter(|i| i.metadata.deletion_timestamp.is_none())
            .map(|i| {
                (
                    i.name_any(),
                    i.spec
                        .policy_ref
                        .as_ref()
                        .map(|r| Arc::from(r.name.as_str())),
                )
            })
            .collect();
        let out = self.pacer.step(&Step {
            now: ctx.now(),
            image,
            targets: &target_nodes,
            pace,
            policy: policy_spec,
            pods: &views,
            known_images: &known,
            nodes: &nodes,
        });

        tracing::debug!(image = %name, keep = ?out.keep, start = ?out.start, wake_at = ?out.wake_at, "paced");
        for e in &out.ended {
            match e {
                Ended::Pulled(took) => {
                    self.metrics.images_cached.with_label_values(&[&name]).inc();
                    self.metrics.pull_duration.observe(took.as_secs_f64());
                }
                Ended::Failed(reason) => self.metrics.count_pull_error(&name, reason),
            }
        }

        let mut plan = Plan::new();
        for pod in pods
            .iter()
            .filter(|p| out.keep.iter().any(|k| Some(k) == p.metadata.name.as_ref()))
        {
            plan = plan.keep(pod.as_ref());
        }
        for (node, attempt) in &out.start {
            let pod = podbuilder::build(&PullPod {
                image,
                node,
                namespace: &self.namespace,
                policy: policy_spec,
                attempt: *attempt,
                tolerations: &self.tolerations,
            })?;
            plan = plan.child(Child::new(&pod)?.create_only());
        }

        self.check_warming(&target_nodes, &nodes, ctx);

        let new_status = status::compute(image.status.as_ref(), &out.observed, ctx.now());
        self.metrics.record_image(&name, &new_status);
        self.publish_active_pulls();

        let before = image.status.as_ref().and_then(|s| s.phase);
        if let Some((kind, reason, message)) =
            status::transition_event(before, &new_status, &image.spec.reference())
        {
            plan = plan.emit(kind, reason, message);
        }
        for (other, at) in out.wake_others {
            let wait = at.duration_since(ctx.now()).unsigned_abs();
            let pacer = Arc::clone(&self.pacer);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                pacer.wake(&other);
            });
        }
        if let Some(at) = out.wake_at {
            let wait = at.duration_since(ctx.now()).unsigned_abs();
            plan = plan.requeue_after(wait.max(std::time::Duration::from_millis(100)));
        }
        Ok(plan.status(new_status))
    }

    fn refused(&self, image: &CachedImage, refusals: &[kube_plan::children::Refusal]) -> bool {
        let name = image.name_any();
        let now = jiff::Timestamp::now();
        for r in refusals {
            let Some(node) = r.object.pointer("/spec/nodeName").and_then(|n| n.as_str()) else {
                continue;
            };
            tracing::warn!(image = %name, %node, message = %r.message, "pull Pod refused");
            self.pacer.refused(&name, node, &r.message, now);
            self.metrics.count_pull_error(&name, pacer::POD_REFUSED);
        }
        self.publish_active_pulls();
        true
    }

    fn deleted(&self, image: &CachedImage) {
        let name = image.name_any();
        self.pacer.forget(&name);
        self.metrics.forget_image(&name);
        self.publish_active_pulls();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cachedimage_pull_pods_wake_their_image_only_when_a_pull_ends_or_is_lost() {
        let pulling = Some(PullOutcome::Pulling);
        let pulled = Some(PullOutcome::Pulled { digest: None });
        let failed = Some(PullOutcome::Failed {
            reason: "ErrImagePull".into(),
            message: "not found".into(),
        });
        // Created by the reconcile that counts it in flight: nothing new.
        assert!(!pull_pod_news(None, Some(&pulling)));
        // Its pull ends.
        assert!(pull_pod_news(Some(&pulling), Some(&pulled)));
        assert!(pull_pod_news(Some(&pulling), Some(&failed)));
        // Status updates mid-pull, and the deletion of a finished Pod (marked, then gone).
        assert!(!pull_pod_news(Some(&pulling), Some(&pulling)));
        assert!(!pull_pod_news(Some(&pulled), Some(&pulled)));
        assert!(!pull_pod_news(Some(&pulled), None));
        assert!(!pull_pod_news(Some(&failed), None));
        // Deleted before its pull ended: the pull is lost.
        assert!(pull_pod_news(Some(&pulling), None));
        // First seen already ended (a watch that re-listed): its end is news.
        assert!(pull_pod_news(None, Some(&pulled)));
        // Not a pull Pod, or never seen: wakes as any creation or deletion would.
        assert!(pull_pod_news(None, Some(&None)));
        assert!(pull_pod_news(None, None));
    }
}
