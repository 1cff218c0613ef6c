//! The one trait an operator author implements.

use crate::owned::OwnedView;
use crate::{ObjectStatus, Plan};
use jiff::Timestamp;
use kube::core::object::HasStatus;
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

/// A primary resource the framework can reconcile: a kube resource with a status the framework can
/// stamp and compare.
pub trait Primary:
    Resource<DynamicType = ()>
    + HasStatus
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
where
    Self::Status: ObjectStatus + Serialize + Clone + Default + Send + Sync,
{
}

impl<K> Primary for K
where
    K: Resource<DynamicType = ()>
        + HasStatus
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::Status: ObjectStatus + Serialize + Clone + Default + Send + Sync,
{
}

/// The caches of the related kinds a controller watches (its children are read through the
/// reconcile's [`OwnedView`]).
#[derive(Default)]
pub(crate) struct Caches {
    /// Per related kind: a `Store<O>` (as `Any`).
    pub(crate) related: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

/// What a reconcile may use besides the object itself.
#[derive(Clone)]
pub struct Context {
    client: Client,
    now: Timestamp,
    caches: Arc<Caches>,
    owner_uid: Option<String>,
    owned: OwnedView,
}

impl Context {
    /// A context without caches (for calling a reconciler directly); the framework makes one per
    /// reconcile with its caches.
    pub fn new(client: Client, now: Timestamp) -> Self {
        Self {
            client,
            now,
            caches: Arc::default(),
            owner_uid: None,
            owned: OwnedView::default(),
        }
    }

    pub(crate) fn with_caches(
        mut self,
        caches: Arc<Caches>,
        owner_uid: Option<String>,
        owned: OwnedView,
    ) -> Self {
        self.caches = caches;
        self.owner_uid = owner_uid;
        self.owned = owned;
        self
    }

    /// The children of kind `C` of the object being reconciled (those carrying its owner label and
    /// controlled by it), as the controller's watch cache held them when this reconcile began. Empty
    /// unless the controller declared `owns::<C>()`.
    ///
    /// The view does not change while the reconcile runs, and it is what the framework prunes from:
    /// an owned child is deleted only if it is in this view and the plan neither applies nor keeps
    /// it. A child applied moments ago that the cache has not caught up with is not here, and is
    /// not pruned; the next reconcile sees it.
    pub fn owned<C>(&self) -> Vec<Arc<C>>
    where
        C: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    {
        let Some(uid) = self.owner_uid.as_deref() else {
            return Vec::new();
        };
        self.owned
            .objects::<C>()
            .into_iter()
            .filter(|c| {
                crate::children::controller_uid(&c.meta().owner_references).as_deref() == Some(uid)
            })
            .collect()
    }

    /// Every cached object of kind `O`: a kind the controller declared with `watches::<O>()`, or the
    /// controller's own primary kind.
    pub fn cached<O>(&self) -> Vec<Arc<O>>
    where
        O: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    {
        self.caches
            .related
            .get(&TypeId::of::<O>())
            .and_then(|s| {
                s.clone()
                    .downcast::<kube::runtime::reflector::Store<O>>()
                    .ok()
            })
            .map(|s| s.state())
            .unwrap_or_default()
    }

    /// The API client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The time this reconcile started. Use it instead of reading the clock, so a reconcile is a
    /// function of its inputs.
    pub fn now(&self) -> Timestamp {
        self.now
    }
}

/// Observes one primary object and returns the [`Plan`] that would bring the world in line with it.
///
/// A reconciler does not write to the API itself: the framework applies the plan's children, prunes the
/// rest, writes the status if it changed and publishes the Events. It is level-triggered: it is not
/// told why it runs, and must give the same plan for the same world.
///
/// ```
/// use kube_plan::{Context, Plan, Reconciler, Status};
/// use kube_plan::conditions::{self, Cond};
/// use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
/// use kube::CustomResource;
/// use schemars::JsonSchema;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
/// #[kube(group = "example.com", version = "v1", kind = "Greeting", namespaced, status = "GreetingStatus")]
/// struct GreetingSpec { text: String }
///
/// #[derive(Status, Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
/// struct GreetingStatus {
///     #[status(conditions)]
///     conditions: Vec<Condition>,
/// }
///
/// struct Greeter;
///
/// impl Reconciler for Greeter {
///     type Resource = Greeting;
///     type Error = std::convert::Infallible;
///
///     async fn reconcile(&self, obj: &Greeting, ctx: &Context) -> Result<Plan<Greeting>, Self::Error> {
///         let mut status = obj.status.clone().unwrap_or_default();
///         let ok = !obj.spec.text.is_empty();
///         let cond = Cond::ready(ok, if ok { "Greeted" } else { "Empty" }, "says hello");
///         conditions::set(&mut status.conditions, cond, obj.metadata.generation, ctx.now());
///         Ok(Plan::new().status(status))
///     }
/// }
/// ```
pub trait Reconciler: Send + Sync + 'static
where
    <Self::Resource as HasStatus>::Status: ObjectStatus + Serialize + Clone + Default + Send + Sync,
{
    /// The primary kind.
    type Resource: Primary;
    /// What can go wrong; shown to users in a condition and an Event.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Computes the plan for `obj`.
    fn reconcile(
        &self,
        obj: &Self::Resource,
        ctx: &Context,
    ) -> impl Future<Output = Result<Plan<Self::Resource>, Self::Error>> + Send;

    /// Called when the object starts being deleted (its deletionTimestamp is set: it is not
    /// reconciled any more, even if someone else's finalizer keeps it for a long time) and again when
    /// the watch reports it gone, or a re-list after a broken watch shows it missing: forget
    /// in-memory state kept about it. Must be idempotent and quick;
    /// the second call runs on the watch's task and must not block.
    fn deleted(&self, obj: &Self::Resource) {
        let _ = obj;
    }

    /// Called after a reconcile whose planned children the API server refused (see
    /// [`Refusal`](crate::children::Refusal)); the other children were applied and the status
    /// written. Return `true` when the reconciler has taken the refusal into account (recorded it,
    /// arranged its own retry): the reconcile then counts as a success. The default, `false`, makes
    /// the reconcile fail with the refusals as its error, so it is retried with backoff. Either way
    /// each refusal is published as a `ChildRefused` Warning Event on the object.
    fn refused(&self, obj: &Self::Resource, refusals: &[crate::children::Refusal]) -> bool {
        let _ = (obj, refusals);
        false
    }

    /// Releases what the object holds outside the cluster before it is deleted. Called only when the
    /// controller was given a finalizer; children are garbage-collected without it.
    fn cleanup(
        &self,
        obj: &Self::Resource,
        ctx: &Context,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = (obj, ctx);
        async { Ok(()) }
    }
}
