//! Binds a [`Reconciler`] to watches and carries out the plans it returns: this file declares a
//! controller and starts its watches; `controller/runtime.rs` runs each reconcile.

mod relist;
mod runtime;
mod triggers;

use relist::with_hidden_deletions;
use runtime::Runtime;
use triggers::Triggers;

use crate::ObjectStatus;
use crate::applied::Applied;
use crate::backoff::{Backoff, BackoffTracker};
use crate::changes::{WakeFn, changed, mark_deleted, wake_fn, waking};
use crate::executor::Executor;
use crate::initial_list::{self, InitialList};
use crate::metrics::Metrics;
use crate::owned::{ChildStore, TypedStore};
use crate::per_kind::PerKind;
use crate::reconciler::{Caches, Reconciler};
use crate::status_writes::{StatusWrites, Written};
use crate::trim::{TrimFn, trimmed};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use kube::api::Api;
use kube::core::ApiResource;
use kube::core::object::HasStatus;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller as KubeController};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::any::{Any, TypeId};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Condition type the framework records while reconciles fail (removed on the next success).
pub const RECONCILED: &str = "Reconciled";
/// Condition type the framework records while a planned child is controlled by someone else.
pub const CHILD_CONFLICT: &str = "ChildConflict";

/// Errors of the plan execution (the reconciler's own errors are reported, not returned).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// An API call failed.
    #[error("{action} {target}: {}", crate::describe(source))]
    Api {
        /// What was attempted.
        action: &'static str,
        /// On what.
        target: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The primary has no UID yet (it was not read from the API server).
    #[error("object {0} has no uid")]
    NoUid(String),
    /// The status could not be serialized.
    #[error("serializing status of {name}: {source}")]
    Status {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// A declared child kind, once its watch is built: the controller, and the store that reconciles
/// take their view of children from.
type Owned<K> = (KubeController<K>, Arc<dyn ChildStore>);
type OwnFn<K> = Box<
    dyn FnOnce(Client, KubeController<K>, Primaries<K>, &str, &PerKind, InitialList) -> Owned<K>
        + Send,
>;
/// A declared related kind, once its watch is built: the controller, its cache for `Context::cached`,
/// and a future resolving when that cache has synced.
type Related<K> = (
    KubeController<K>,
    TypeId,
    Arc<dyn Any + Send + Sync>,
    BoxFuture<'static, ()>,
);
type WatchFn<K> = Box<
    dyn FnOnce(Client, KubeController<K>, Primaries<K>, &PerKind, InitialList) -> Related<K> + Send,
>;

/// The primaries' cache, and the record of the triggers that the other watches send them.
struct Primaries<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    triggers: Arc<Triggers<K>>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Clone for Primaries<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            triggers: Arc::clone(&self.triggers),
        }
    }
}

impl<K: Resource<DynamicType = ()> + 'static> Primaries<K> {
    /// Notes `keys` as triggered and passes them on.
    fn trigger(&self, keys: Vec<ObjectRef<K>>) -> Vec<ObjectRef<K>> {
        for key in &keys {
            self.triggers.triggered(key);
        }
        keys
    }
}

/// A controller: one reconciler, the kinds it owns, and the kinds whose changes concern it.
///
/// ```no_run
/// # use kube_plan::{Context, Controller, Plan, Reconciler};
/// # use k8s_openapi::api::apps::v1::Deployment;
/// # use k8s_openapi::api::core::v1::Node;
/// # use kube::runtime::reflector::ObjectRef;
/// # struct MyReconciler;
/// # #[derive(kube::CustomResource, serde::Serialize, serde::Deserialize, Clone, Debug, schemars::JsonSchema)]
/// # #[kube(group = "example.com", version = "v1", kind = "App", namespaced, status = "AppStatus")]
/// # struct AppSpec {}
/// # #[derive(kube_plan::Status, serde::Serialize, serde::Deserialize, Clone, Debug, Default, schemars::JsonSchema)]
/// # struct AppStatus {}
/// # impl Reconciler for MyReconciler {
/// #     type Resource = App;
/// #     type Error = std::convert::Infallible;
/// #     async fn reconcile(&self, _: &App, _: &Context) -> Result<Plan<App>, Self::Error> { Ok(Plan::new()) }
/// # }
/// let controller = Controller::new("app", MyReconciler)
///     .owns::<Deployment>()
///     .watches::<Node, _>(|_node, apps| apps.iter().map(|a| ObjectRef::from_obj(a.as_ref())).collect());
/// ```
pub struct Controller<R: Reconciler>
where
    <R::Resource as HasStatus>::Status: ObjectStatus + Serialize + Clone + Default + Send + Sync,
{
    name: String,
    reconciler: R,
    owned: Vec<OwnFn<R::Resource>>,
    watches: Vec<WatchFn<R::Resource>>,
    finalizer: Option<String>,
    owner_label: Option<String>,
    concurrency: u16,
    backoff: Backoff,
    primary_watch: watcher::Config,
    initial_list: InitialList,
    triggers: Vec<futures::stream::BoxStream<'static, ObjectRef<R::Resource>>>,
    status_interval: Option<Duration>,
    kinds: PerKind,
}

impl<R: Reconciler> Controller<R>
where
    <R::Resource as HasStatus>::Status: ObjectStatus + Serialize + Clone + Default + Send + Sync,
{
    /// A controller named `name` (used in metrics, logs, as the field manager and Event reporter).
    pub fn new(name: &str, reconciler: R) -> Self {
        Self {
            name: name.to_owned(),
            reconciler,
            owned: Vec::new(),
            watches: Vec::new(),
            finalizer: None,
            owner_label: None,
            concurrency: 4,
            backoff: Backoff::default(),
            primary_watch: watcher::Config::default(),
            initial_list: InitialList::default(),
            triggers: Vec::new(),
            status_interval: None,
            kinds: PerKind::default(),
        }
    }

    /// Reconciles every object the stream names, as it names them (for example from a channel fed by
    /// shared state that decides another object should act now).
    pub fn trigger(
        mut self,
        refs: impl futures::Stream<Item = ObjectRef<R::Resource>> + Send + 'static,
    ) -> Self {
        self.triggers.push(refs.boxed());
        self
    }

    /// Declares children of kind `C` in every namespace (or cluster-scoped ones).
    pub fn owns<C>(self) -> Self
    where
        C: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    {
        self.owns_with::<C>(Api::all)
    }

    /// Declares children of kind `C` that live in `namespace` only (the watch, and so the RBAC it
    /// needs, stays in that namespace).
    pub fn owns_in<C>(self, namespace: &str) -> Self
    where
        C: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + Debug
            + DeserializeOwned
            + Send
            + Sync
            + 'static,
    {
        let namespace = namespace.to_owned();
        self.owns_with::<C>(move |client| Api::namespaced(client, &namespace))
    }

    fn owns_with<C>(mut self, make_api: impl FnOnce(Client) -> Api<C> + Send + 'static) -> Self
    where
        C: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    {
        self.owned.push(Box::new(
            move |client, ctrl, primaries, label_key, kinds, initial| {
                let api = make_api(client);
                let (reader, writer) = reflector::store::<C>();
                let events = trimmed(
                    initial_list::watch(api, watcher::Config::default().labels(label_key), initial),
                    kinds.get::<TrimFn<C>>(),
                );
                let stream =
                    with_hidden_deletions(reflector::reflector(writer, events), reader.clone())
                        .default_backoff()
                        .try_filter(waking(kinds.get::<WakeFn<C>>()))
                        .touched_objects();
                let store: Arc<dyn ChildStore> = Arc::new(TypedStore {
                    store: reader,
                    resource: ApiResource::erase::<C>(&()),
                });
                // Map a child to its owner's key as the primary watch has it: kube-runtime's own
                // owner mapping puts the child's namespace on the key even for a cluster-scoped
                // owner, and a key that differs from the watch's lets one object reconcile twice
                // at once (once per key).
                let owners = move |child: C| {
                    primaries.trigger(owner_keys::<R::Resource>(&child, &primaries.store))
                };
                (ctrl.watches_stream(stream, owners), store)
            },
        ));
        self
    }

    /// Reconciles the primaries that `mapper` names whenever an object of kind `O` changes. The mapper
    /// gets the changed object and the current primaries (from the controller's cache); an object
    /// the watch reports deleted reaches it with `metadata.deletionTimestamp` set. The objects of
    /// kind `O` are cached too: a reconcile reads them with [`Context::cached`](crate::Context::cached).
    pub fn watches<O, F>(mut self, mapper: F) -> Self
    where
        O: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
        F: Fn(&O, &[Arc<R::Resource>]) -> Vec<ObjectRef<R::Resource>> + Send + Sync + 'static,
    {
        self.watches
            .push(Box::new(move |client, ctrl, primaries, kinds, initial| {
                let api: Api<O> = Api::all(client);
                let (reader, writer) = reflector::store::<O>();
                let events = trimmed(
                    initial_list::watch(api, watcher::Config::default(), initial),
                    kinds.get::<TrimFn<O>>(),
                );
                let stream =
                    with_hidden_deletions(reflector::reflector(writer, events), reader.clone())
                        .default_backoff()
                        .try_filter(waking(kinds.get::<WakeFn<O>>()))
                        .map_ok(mark_deleted)
                        .touched_objects();
                let ready_store = reader.clone();
                let ready = async move {
                    let _ = ready_store.wait_until_ready().await;
                    tracing::debug!(kind = %O::kind(&()), "related cache synced");
                }
                .boxed();
                (
                    ctrl.watches_stream(stream, move |o: O| {
                        primaries.trigger(mapper(&o, &primaries.store.state()))
                    }),
                    TypeId::of::<O>(),
                    Arc::new(reader) as Arc<dyn Any + Send + Sync>,
                    ready,
                )
            }));
        self
    }

    /// Like [`Controller::watches`], with [`Controller::reconcile_on_change`] for `O`: an update of
    /// an `O` only counts when `key` changes (for example the labels and taints of a Node, not its
    /// heartbeat).
    pub fn watches_on<O, H, K, F>(self, key: K, mapper: F) -> Self
    where
        O: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
        H: std::hash::Hash,
        K: Fn(&O) -> H + Send + Sync + 'static,
        F: Fn(&O, &[Arc<R::Resource>]) -> Vec<ObjectRef<R::Resource>> + Send + Sync + 'static,
    {
        self.reconcile_on_change(key).watches(mapper)
    }

    /// Updates of a watched kind `O` (a child or a related kind) wake reconciles only when `key`
    /// changes; creations and deletions always do, and the cache still gets every update. Use it
    /// when a reconcile reads only part of an object, so the rest of its churn costs nothing.
    ///
    /// ```
    /// # use kube_plan::{Context, Controller, Plan, Reconciler};
    /// # use k8s_openapi::api::batch::v1::Job;
    /// # #[derive(kube::CustomResource, serde::Serialize, serde::Deserialize, Clone, Debug, schemars::JsonSchema)]
    /// # #[kube(group = "example.com", version = "v1", kind = "Task", namespaced, status = "TaskStatus")]
    /// # struct TaskSpec {}
    /// # #[derive(kube_plan::Status, serde::Serialize, serde::Deserialize, Clone, Debug, Default, schemars::JsonSchema)]
    /// # struct TaskStatus {}
    /// # struct Tasks;
    /// # impl Reconciler for Tasks {
    /// #     type Resource = Task;
    /// #     type Error = std::convert::Infallible;
    /// #     async fn reconcile(&self, _: &Task, _: &Context) -> Result<Plan<Task>, Self::Error> { Ok(Plan::new()) }
    /// # }
    /// // The reconciler only cares whether its Job finished, not about every status update.
    /// let controller = Controller::new("task", Tasks)
    ///     .owns::<Job>()
    ///     .reconcile_on_change::<Job, _>(|job| {
    ///         job.status.as_ref().map(|s| (s.succeeded, s.failed))
    ///     });
    /// # let _ = controller;
    /// ```
    pub fn reconcile_on_change<O, H>(
        mut self,
        key: impl Fn(&O) -> H + Send + Sync + 'static,
    ) -> Self
    where
        O: Resource + 'static,
        H: std::hash::Hash,
    {
        // Only a hash of each object's key is kept: 8 bytes per object, whatever the key.
        let hashed = move |o: &O| {
            use std::hash::{BuildHasher, BuildHasherDefault};
            BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                .hash_one(key(o))
        };
        self.kinds.set(wake_fn(hashed, changed::<u64>));
        self
    }

    /// Like [`Controller::reconcile_on_change`], with the rule of which changes of the key wake a
    /// reconcile in the controller's hands: `wakes(before, after)` gets the key of the last event
    /// about the object (`None` at first sight) and its key now (`None` once it is deleted). The key
    /// of every object of kind `O` is kept, so keep it small.
    ///
    /// A controller that creates a child and learns nothing from seeing it appear, nor from seeing a
    /// finished one go, spares itself two reconciles per child:
    ///
    /// ```
    /// # use kube_plan::{Context, Controller, Plan, Reconciler};
    /// # use k8s_openapi::api::batch::v1::Job;
    /// # #[derive(kube::CustomResource, serde::Serialize, serde::Deserialize, Clone, Debug, schemars::JsonSchema)]
    /// # #[kube(group = "example.com", version = "v1", kind = "Task", namespaced, status = "TaskStatus")]
    /// # struct TaskSpec {}
    /// # #[derive(kube_plan::Status, serde::Serialize, serde::Deserialize, Clone, Debug, Default, schemars::JsonSchema)]
    /// # struct TaskStatus {}
    /// # struct Tasks;
    /// # impl Reconciler for Tasks {
    /// #     type Resource = Task;
    /// #     type Error = std::convert::Infallible;
    /// #     async fn reconcile(&self, _: &Task, _: &Context) -> Result<Plan<Task>, Self::Error> { Ok(Plan::new()) }
    /// # }
    /// // Whether the Job has finished.
    /// let finished = |job: &Job| {
    ///     job.status.as_ref().is_some_and(|s| s.succeeded.unwrap_or(0) + s.failed.unwrap_or(0) > 0)
    /// };
    /// let controller = Controller::new("task", Tasks)
    ///     .owns::<Job>()
    ///     .reconcile_on_transition::<Job, _>(finished, |before, after| match (before, after) {
    ///         (None, Some(false)) => false,  // created, still running: its creator knows
    ///         (Some(true), None) => false,   // a finished Job going: its end was seen
    ///         (before, after) => before != after,
    ///     });
    /// # let _ = controller;
    /// ```
    pub fn reconcile_on_transition<O, H>(
        mut self,
        key: impl Fn(&O) -> H + Send + Sync + 'static,
        wakes: impl Fn(Option<&H>, Option<&H>) -> bool + Send + Sync + 'static,
    ) -> Self
    where
        O: Resource + 'static,
        H: Send + 'static,
    {
        self.kinds.set(wake_fn(key, wakes));
        self
    }

    /// Adds finalizer `name`, so [`Reconciler::cleanup`] runs before the object goes away.
    pub fn finalizer(mut self, name: &str) -> Self {
        self.finalizer = Some(name.to_owned());
        self
    }

    /// The label key marking children (default: `<group>/owner-uid`).
    pub fn owner_label(mut self, key: &str) -> Self {
        self.owner_label = Some(key.to_owned());
        self
    }

    /// How many objects may reconcile at once (default 4). One object never reconciles twice at
    /// once, and objects due a reconcile take a free worker in the order they became due: one
    /// that keeps asking again (a requeue, its children's events) waits behind the others.
    pub fn concurrency(mut self, n: u16) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Writes status changes that leave every condition's type, status and reason as they were
    /// (progress: counts, lists, messages) at most once per `interval` per object; the object is
    /// reconciled again when the interval ends, so its last state is always written. Condition
    /// changes are written at once. Default: every change at once.
    pub fn coalesce_status(mut self, interval: Duration) -> Self {
        self.status_interval = Some(interval);
        self
    }

    /// Backoff after failed reconciles (default 1 s doubling to 5 min), per object, reset on success.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Trims every cached object of kind `O` (primary, child or related) before it is stored: drop
    /// what no reconcile reads, so that a large cluster's objects cost less memory. Reconcilers and
    /// mappers see the trimmed objects. Managed fields are always dropped; see [`crate::trim`].
    ///
    /// ```
    /// # use kube_plan::{Context, Controller, Plan, Reconciler};
    /// # use k8s_openapi::api::core::v1::Node;
    /// # #[derive(kube::CustomResource, serde::Serialize, serde::Deserialize, Clone, Debug, schemars::JsonSchema)]
    /// # #[kube(group = "example.com", version = "v1", kind = "App", status = "AppStatus")]
    /// # struct AppSpec {}
    /// # #[derive(kube_plan::Status, serde::Serialize, serde::Deserialize, Clone, Debug, Default, schemars::JsonSchema)]
    /// # struct AppStatus {}
    /// # struct MyReconciler;
    /// # impl Reconciler for MyReconciler {
    /// #     type Resource = App;
    /// #     type Error = std::convert::Infallible;
    /// #     async fn reconcile(&self, _: &App, _: &Context) -> Result<Plan<App>, Self::Error> { Ok(Plan::new()) }
    /// # }
    /// // This operator places work by node labels only: a Node's status (images, conditions,
    /// // addresses) is never read, so it is not kept.
    /// let controller = Controller::new("app", MyReconciler)
    ///     .watches::<Node, _>(|_node, _apps| Vec::new())
    ///     .trim_cached::<Node>(|node| node.status = None);
    /// # let _ = controller;
    /// ```
    pub fn trim_cached<O>(mut self, trim: impl Fn(&mut O) + Send + Sync + 'static) -> Self
    where
        O: Resource + 'static,
    {
        self.kinds.set::<TrimFn<O>>(Arc::new(trim));
        self
    }

    /// Restricts the watch of primaries (for example with a label selector).
    pub fn primary_watch(mut self, config: watcher::Config) -> Self {
        self.primary_watch = config;
        self
    }

    /// How the controller's watches get their initial state. By default each streams it where the
    /// API server offers streaming lists (one object at a time, each trimmed as it arrives: no peak
    /// of a whole decoded list) and lists it elsewhere; see [`crate::initial_list`].
    ///
    /// ```
    /// # use kube_plan::{Context, Controller, Plan, Reconciler};
    /// # #[derive(kube::CustomResource, serde::Serialize, serde::Deserialize, Clone, Debug, schemars::JsonSchema)]
    /// # #[kube(group = "example.com", version = "v1", kind = "App", status = "AppStatus")]
    /// # struct AppSpec {}
    /// # #[derive(kube_plan::Status, serde::Serialize, serde::Deserialize, Clone, Debug, Default, schemars::JsonSchema)]
    /// # struct AppStatus {}
    /// # struct MyReconciler;
    /// # impl Reconciler for MyReconciler {
    /// #     type Resource = App;
    /// #     type Error = std::convert::Infallible;
    /// #     async fn reconcile(&self, _: &App, _: &Context) -> Result<Plan<App>, Self::Error> { Ok(Plan::new()) }
    /// # }
    /// use kube_plan::initial_list::InitialList;
    ///
    /// // Behind a proxy that holds watch requests: list first, as clients always did.
    /// let controller = Controller::new("app", MyReconciler).initial_list(InitialList::Listed);
    /// # let _ = controller;
    /// ```
    pub fn initial_list(mut self, how: InitialList) -> Self {
        self.initial_list = how;
        self
    }

    /// The controller's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Builds the watches; returns the run future and a future that resolves once every cache synced.
    pub(crate) fn start(
        self,
        client: Client,
        recorder: Recorder,
        metrics: Metrics,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> (BoxFuture<'static, ()>, BoxFuture<'static, ()>) {
        let group = <R::Resource as Resource>::group(&()).to_string();
        let label_key = self.owner_label.clone().unwrap_or_else(|| {
            if group.is_empty() {
                "framework/owner-uid".to_owned()
            } else {
                format!("{group}/owner-uid")
            }
        });
        let api: Api<R::Resource> = Api::all(client.clone());
        // The primary watch is ours (not kube's default) so deletions can be handed to the reconciler.
        let (primary_reader, primary_writer) = reflector::store::<R::Resource>();
        let (deleted_tx, mut deleted_rx) = tokio::sync::mpsc::unbounded_channel::<R::Resource>();
        // Readiness of the primary cache, from the stream itself: kube's applier already waits on the
        // store's readiness, and that wait (a single oneshot receiver) wakes only one of two waiters.
        let (primary_ready_tx, mut primary_ready_rx) = tokio::sync::watch::channel(false);
        let primary_events = trimmed(
            initial_list::watch(api, self.primary_watch, self.initial_list),
            self.kinds.get::<TrimFn<R::Resource>>(),
        );
        let written = Arc::new(Written::default());
        let shown = Arc::clone(&written);
        let triggers = Arc::new(Triggers::default());
        let noted = Arc::clone(&triggers);
        let primary_stream = with_hidden_deletions(
            reflector::reflector(primary_writer, primary_events),
            primary_reader.clone(),
        )
        .default_backoff()
        // The event of the controller's own status write wakes nothing: it holds what the
        // reconcile that wrote it already knew. Waking on it doubled the reconciles of every
        // object whose status changed, and kept a saturated controller busy with the same
        // objects while others waited (kube-runtime picks among waiting objects in hash
        // order, not in order of arrival).
        .try_filter(move |event| {
            let wake = match event {
                watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => {
                    !shown.seen(&obj.uid().unwrap_or_else(|| obj.name_any()), obj)
                }
                watcher::Event::Delete(obj) => {
                    let _ = deleted_tx.send(obj.clone());
                    true
                }
                watcher::Event::InitDone => {
                    let _ = primary_ready_tx.send(true);
                    true
                }
                watcher::Event::Init => true,
            };
            futures::future::ready(wake)
        })
        .touched_objects()
        .inspect_ok(move |obj| noted.triggered(&ObjectRef::from_obj(obj)));
        let mut ctrl = KubeController::for_stream(primary_stream, primary_reader)
            .with_config(ControllerConfig::default().concurrency(0));
        for t in self.triggers {
            let noted = Arc::clone(&triggers);
            ctrl = ctrl.reconcile_on(t.inspect(move |key| noted.triggered(key)));
        }
        let primaries = Primaries {
            store: ctrl.store(),
            triggers: Arc::clone(&triggers),
        };
        let mut stores = Vec::new();
        let mut caches = Caches::default();
        let mut ready: Vec<BoxFuture<'static, ()>> = Vec::new();
        for own in self.owned {
            let (c, s) = own(
                client.clone(),
                ctrl,
                primaries.clone(),
                &label_key,
                &self.kinds,
                self.initial_list,
            );
            ctrl = c;
            ready.push(s.ready());
            stores.push(s);
        }
        for w in self.watches {
            let (c, type_id, any, synced) = w(
                client.clone(),
                ctrl,
                primaries.clone(),
                &self.kinds,
                self.initial_list,
            );
            ctrl = c;
            caches.related.insert(type_id, any);
            ready.push(synced);
        }
        // The primaries themselves, for reconcilers that look across objects of their own kind.
        caches.related.insert(
            TypeId::of::<R::Resource>(),
            Arc::new(primaries.store.clone()) as Arc<dyn Any + Send + Sync>,
        );
        metrics
            .max_concurrent
            .with_label_values(&[&self.name])
            .set(i64::from(self.concurrency));
        ready.push(
            async move {
                let _ = primary_ready_rx.wait_for(|ready| *ready).await;
            }
            .boxed(),
        );
        // Resolves once every cache has synced; reconciles wait for it, so a reconcile never sees a
        // half-filled cache of children or related objects (kube-runtime only waits for the primary's).
        let synced_name = self.name.clone();
        let synced = futures::future::join_all(ready)
            .map(move |_| tracing::debug!(controller = %synced_name, "caches synced"))
            .boxed()
            .shared();
        let runtime = Arc::new(Runtime {
            synced: synced.clone(),
            name: self.name.clone(),
            reconciler: self.reconciler,
            executor: Executor {
                client: client.clone(),
                manager: self.name.clone(),
                label_key,
                stores,
                applied: Applied::default(),
            },
            client,
            recorder,
            metrics,
            finalizer: self.finalizer,
            caches: Arc::new(caches),
            backoff: Mutex::new(BackoffTracker::new(self.backoff)),
            status_writes: StatusWrites::new(self.status_interval),
            written,
            worker_permits: Arc::new(Semaphore::new(usize::from(self.concurrency))),
            primaries: primaries.store.clone(),
            triggers,
        });
        let name = self.name;
        let forget = runtime.clone();
        let deletions = async move {
            while let Some(obj) = deleted_rx.recv().await {
                forget.triggers.forget(&ObjectRef::from_obj(&obj));
                let key = obj.uid().unwrap_or_else(|| obj.name_any());
                forget.status_writes.forget(&key);
                forget.written.forget(&key);
                forget.executor.applied.forget_owner(&key);
                forget.reconciler.deleted(&obj);
            }
            // The watch is gone (shutdown has begun): let the controller finish its running
            // reconciles rather than ending the select below early.
            futures::future::pending::<()>().await;
        };
        let run = ctrl
            .graceful_shutdown_on(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .run(
                |obj, rt: Arc<Runtime<R>>| async move { rt.reconcile(obj).await },
                |_obj, _err, _rt| Action::requeue(Duration::from_secs(5)),
                runtime.clone(),
            )
            .for_each(move |res| {
                if let Err(e) = res {
                    match e {
                        kube::runtime::controller::Error::ObjectNotFound(_) => {
                            tracing::debug!(controller = %name, error = %e, "object gone before reconcile")
                        }
                        e => tracing::warn!(controller = %name, error = %e, "controller"),
                    }
                }
                futures::future::ready(())
            });
        // The controller's end ends the deletion listener too.
        let run = async move {
            tokio::select! {
                _ = run => {}
                _ = deletions => {}
            }
        }
        .boxed();
        (run, synced.boxed())
    }
}

/// The keys of `child`'s controller-or-owner references of kind `K`, as the primaries' cache keys
/// them (owners no longer cached are left out: there is nothing to reconcile).
fn owner_keys<K>(child: &impl Resource, primaries: &Store<K>) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let meta = child.meta();
    meta.owner_references
        .iter()
        .flatten()
        .filter(|o| o.api_version == K::api_version(&()) && o.kind == K::kind(&()))
        .filter_map(|o| {
            let mut key = ObjectRef::<K>::new(&o.name);
            if let Some(ns) = &meta.namespace {
                key = key.within(ns);
            }
            // The store falls back to the cluster-wide key; the found object's own key is the one
            // the primary watch and every other trigger use.
            primaries
                .get(&key)
                .filter(|p| p.meta().uid.as_deref() == Some(o.uid.as_str()))
                .map(|p| ObjectRef::from_obj(p.as_ref()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_a_namespaced_child_maps_to_its_cluster_scoped_owners_own_key() {
        use k8s_openapi::api::core::v1::{Node, Pod};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let (primaries, mut writer) = reflector::store::<Node>();
        let mut node = Node::default();
        node.metadata.name = Some("n1".into());
        node.metadata.uid = Some("u1".into());
        writer.apply_watcher_event(&watcher::Event::Apply(node.clone()));
        let mut pod = Pod::default();
        pod.metadata.name = Some("p".into());
        pod.metadata.namespace = Some("ns".into());
        let owner = |uid: &str| OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: "n1".into(),
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: None,
        };
        pod.metadata.owner_references = Some(vec![owner("u1")]);
        let keys = owner_keys::<Node>(&pod, &primaries);
        // The same key the Node's own watch uses: no namespace. With the child's namespace on it,
        // the controller would treat it as another object and could reconcile n1 twice at once.
        assert_eq!(keys, vec![ObjectRef::from_obj(&node)]);
        assert_eq!(keys[0].namespace, None);
        // An owner reference to an object the cache does not hold (another uid: a namesake).
        pod.metadata.owner_references = Some(vec![owner("other")]);
        assert!(owner_keys::<Node>(&pod, &primaries).is_empty());
    }
}
