//! The caches of child kinds, and the view of one primary's children that one reconcile works from.
//!
//! A reconcile takes one [`OwnedView`] before the reconciler runs. The reconciler reads it through
//! [`crate::Context::owned`], and the executor prunes from the same view: a child is deleted only if
//! the reconciler was shown it and did not plan it. A child applied by an earlier reconcile that the
//! watch has not delivered yet is therefore never pruned by a reconcile that could not see it (the
//! cache may catch up while the reconciler runs; what it catches up with waits for the next reconcile).

use crate::children::{ChildKey, Existing};
use futures::FutureExt;
use futures::future::BoxFuture;
use kube::Resource;
use kube::core::ApiResource;
use kube::runtime::reflector::{ObjectRef, Store};
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

/// The cache of one child kind, typed away so a controller can own several kinds.
pub(crate) trait ChildStore: Send + Sync {
    /// The objects of this kind labelled as children of `owner_uid`, as they are now.
    fn snapshot(&self, label_key: &str, owner_uid: &str) -> KindView;
    /// What the cache holds at `key` now (it may have caught up since the view was taken).
    fn lookup(&self, key: &ChildKey) -> Option<Existing>;
    /// Resolves once the cache has synced.
    fn ready(&self) -> BoxFuture<'static, ()>;
    /// The kind's endpoint, for deleting a child this store reported.
    fn resource(&self) -> &ApiResource;
    /// The Rust type of the kind, to hand the typed view to [`crate::Context::owned`].
    fn child_type(&self) -> TypeId;
}

/// A store of child objects of kind `C`.
pub(crate) struct TypedStore<C: Resource<DynamicType = ()> + Clone + 'static> {
    pub(crate) store: Store<C>,
    pub(crate) resource: ApiResource,
}

impl<C> TypedStore<C>
where
    C: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    fn existing(&self, c: &C) -> Option<Existing> {
        Existing::from_meta(c.meta(), &self.resource.api_version, &self.resource.kind)
    }
}

impl<C> ChildStore for TypedStore<C>
where
    C: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    fn snapshot(&self, label_key: &str, owner_uid: &str) -> KindView {
        let objects: Vec<Arc<C>> = self
            .store
            .state()
            .into_iter()
            .filter(|c| {
                c.meta()
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(label_key))
                    .map(String::as_str)
                    == Some(owner_uid)
            })
            .collect();
        KindView {
            existing: objects.iter().filter_map(|c| self.existing(c)).collect(),
            typed: Arc::new(objects),
        }
    }

    fn lookup(&self, key: &ChildKey) -> Option<Existing> {
        let mut r = ObjectRef::<C>::new(&key.name);
        if let Some(ns) = &key.namespace {
            r = r.within(ns);
        }
        self.store.get(&r).and_then(|c| self.existing(&c))
    }

    fn ready(&self) -> BoxFuture<'static, ()> {
        let store = self.store.clone();
        let kind = self.resource.kind.clone();
        async move {
            let _ = store.wait_until_ready().await;
            tracing::debug!(%kind, "child cache synced");
        }
        .boxed()
    }

    fn resource(&self) -> &ApiResource {
        &self.resource
    }

    fn child_type(&self) -> TypeId {
        TypeId::of::<C>()
    }
}

/// One kind's share of an [`OwnedView`].
pub(crate) struct KindView {
    existing: Vec<Existing>,
    /// A `Vec<Arc<C>>`.
    typed: Arc<dyn Any + Send + Sync>,
}

/// The children of one primary, of every owned kind, as one reconcile sees them.
#[derive(Default, Clone)]
pub(crate) struct OwnedView {
    existing: Arc<Vec<Existing>>,
    typed: Arc<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl OwnedView {
    /// Takes the view of `owner_uid`'s children from every store.
    pub(crate) fn take(stores: &[Arc<dyn ChildStore>], label_key: &str, owner_uid: &str) -> Self {
        let mut existing = Vec::new();
        let mut typed = HashMap::new();
        for store in stores {
            let view = store.snapshot(label_key, owner_uid);
            existing.extend(view.existing);
            typed.insert(store.child_type(), view.typed);
        }
        Self {
            existing: Arc::new(existing),
            typed: Arc::new(typed),
        }
    }

    /// What is known of every labelled child in the view.
    pub(crate) fn existing(&self) -> &[Existing] {
        &self.existing
    }

    /// The labelled children of kind `C` in the view.
    pub(crate) fn objects<C: Send + Sync + 'static>(&self) -> Vec<Arc<C>> {
        self.typed
            .get(&TypeId::of::<C>())
            .and_then(|v| v.clone().downcast::<Vec<Arc<C>>>().ok())
            .map(|v| v.as_ref().clone())
            .unwrap_or_default()
    }
}
