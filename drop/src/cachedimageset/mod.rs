//! The CachedImageSet controller: one child CachedImage per image of the set (static list merged with
//! the referenced DiscoveryPolicy's discovered images); children no longer wanted are pruned; the
//! status rolls the children up.

pub mod plan;

use crate::api::{CachedImage, CachedImageSet, DiscoveryPolicy};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube_plan::{Child, Context, Plan, Reconciler};
use plan::DiscoveryTrouble;
use std::sync::Arc;

/// Reconciles CachedImageSets.
pub struct CachedImageSetReconciler;

/// The sets that reference a DiscoveryPolicy (its discovered list changed, or it appeared).
pub fn sets_using(
    policy: &DiscoveryPolicy,
    sets: &[Arc<CachedImageSet>],
) -> Vec<ObjectRef<CachedImageSet>> {
    let name = policy.name_any();
    sets.iter()
        .filter(|s| {
            s.spec
                .discovery_policy_ref
                .as_ref()
                .is_some_and(|r| r.name == name)
        })
        .map(|s| ObjectRef::from_obj(s.as_ref()))
        .collect()
}

impl Reconciler for CachedImageSetReconciler {
    type Resource = CachedImageSet;
    type Error = kube_plan::children::ChildError;

    async fn reconcile(
        &self,
        set: &CachedImageSet,
        ctx: &Context,
    ) -> Result<Plan<CachedImageSet>, Self::Error> {
        let policies = ctx.cached::<DiscoveryPolicy>();
        let (policy, trouble) = match &set.spec.discovery_policy_ref {
            None => (None, None),
            Some(r) => match policies.iter().find(|p| p.name_any() == r.name) {
                None => (None, Some(DiscoveryTrouble::NotFound(r.name.clone()))),
                Some(p) => {
                    let failing = p
                        .status
                        .as_ref()
                        .and_then(|s| kube_plan::conditions::get(&s.conditions, "Ready"))
                        .filter(|c| c.status == "False")
                        .map(|c| DiscoveryTrouble::Failing {
                            name: r.name.clone(),
                            message: c.message.clone(),
                        });
                    (Some(p.as_ref()), failing)
                }
            },
        };
        let (wanted, invalid) = plan::wanted(set, policy);
        let children: Vec<CachedImage> = wanted.iter().map(|w| plan::child(set, w)).collect();
        let existing = ctx.owned::<CachedImage>();
        let current: Vec<&CachedImage> = children
            .iter()
            .filter_map(|c| {
                existing
                    .iter()
                    .find(|e| e.metadata.name == c.metadata.name)
                    .map(AsRef::as_ref)
            })
            .collect();
        // Children not created yet count as managed but not ready.
        let placeholders: Vec<CachedImage> = children
            .iter()
            .filter(|c| !current.iter().any(|e| e.metadata.name == c.metadata.name))
            .cloned()
            .collect();
        let all: Vec<&CachedImage> = current.into_iter().chain(placeholders.iter()).collect();
        let status = plan::status(
            set.status.as_ref(),
            &all,
            trouble.as_ref(),
            &invalid,
            ctx.now(),
        );
        let mut plan = Plan::new().status(status);
        for c in &children {
            plan = plan.child(Child::new(c)?);
        }
        Ok(plan)
    }
}
