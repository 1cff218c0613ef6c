//! The framework's own guarantees, on the local control plane, with reconcilers written for the test.

use e2e::cluster;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use kube_plan::testing::eventually;
use kube_plan::{Child, Context, Controller, Operator, Plan, PrinterColumns, Reconciler, Status};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// An object whose reconciler applies one ConfigMap once, then keeps whatever children it is shown.
#[derive(
    CustomResource,
    PrinterColumns,
    Serialize,
    Deserialize,
    Clone,
    Debug,
    Default,
    schemars::JsonSchema,
)]
#[kube(
    group = "framework.e2e.example",
    version = "v1",
    kind = "Holder",
    namespaced,
    status = "HolderStatus"
)]
pub struct HolderSpec {}

#[derive(
    Status, PrinterColumns, Serialize, Deserialize, Clone, Debug, Default, schemars::JsonSchema,
)]
pub struct HolderStatus {
    /// The child has been applied.
    #[serde(default)]
    applied: bool,
    /// A reconcile has been shown the child.
    #[serde(default)]
    seen: bool,
    #[status(conditions)]
    #[serde(default)]
    conditions: Vec<Condition>,
}

const CHILD: &str = "held";

struct HolderReconciler {
    /// Opens the ConfigMap watch that the test holds back.
    release: watch::Sender<bool>,
}

impl Reconciler for HolderReconciler {
    type Resource = Holder;
    type Error = kube_plan::children::ChildError;

    async fn reconcile(&self, h: &Holder, ctx: &Context) -> Result<Plan<Holder>, Self::Error> {
        let mut status = h.status.clone().unwrap_or_default();
        let mut plan = Plan::new();
        if !status.applied {
            let mut cm = ConfigMap::default();
            cm.metadata.name = Some(CHILD.into());
            cm.metadata.namespace = h.metadata.namespace.clone();
            status.applied = true;
            // The write of this status wakes nothing (it is the controller's own); the child's
            // event is held back with its watch, so ask to run again.
            return Ok(plan
                .child(Child::new(&cm)?)
                .status(status)
                .requeue_after(Duration::from_millis(200)));
        }
        let shown = ctx.owned::<ConfigMap>();
        for c in &shown {
            plan = plan.keep(c.as_ref());
        }
        if shown.is_empty() {
            // Applied by an earlier reconcile, not in the cache yet: let the watch deliver it while
            // this reconcile runs, and give a framework that reads the live cache the chance to show
            // it here (a fixed view never does, so this waits out its deadline there).
            self.release.send_replace(true);
            let _ = eventually(Duration::from_secs(2), "child in the cache", || async {
                if ctx.owned::<ConfigMap>().is_empty() {
                    Err("not yet")
                } else {
                    Ok(())
                }
            })
            .await;
        }
        status.seen = !shown.is_empty();
        Ok(plan.status(status))
    }
}

/// Creates the Holder `h` in `namespace` once its CRD (installed by the operator under test) is served.
async fn create_holder(client: &kube::Client, namespace: &str) -> Api<Holder> {
    let holders: Api<Holder> = Api::namespaced(client.clone(), namespace);
    eventually(Duration::from_secs(30), "Holder created", || async {
        holders
            .create(&PostParams::default(), &Holder::new("h", HolderSpec {}))
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    holders
}

#[tokio::test]
async fn framework_child_applied_is_not_pruned_while_its_watch_lags() {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "fw-prune").await.unwrap();
    let (release, released) = watch::channel(false);
    // The operator's client holds back ConfigMap watches until the reconciler releases them, so
    // the test decides when the operator's ConfigMap cache catches up with the API server.
    let hold: e2e::Hook = Arc::new(move |_, uri| {
        let watch = uri.path().ends_with("/configmaps")
            && uri.query().is_some_and(|q| q.contains("watch=true"));
        let mut released = released.clone();
        watch.then(|| {
            Box::pin(async move {
                let _ = released.wait_for(|open| *open).await;
            }) as futures::future::BoxFuture<'static, ()>
        })
    });
    let held_client = e2e::hooked_client(cluster, hold).await;

    // Every change the API server makes to the child, seen without delay.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let deletions = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen_deletions = deletions.clone();
    let watching = tokio::spawn(async move {
        let mut events = std::pin::pin!(e2e::changes(cms));
        while let Some((cm, gone)) = events.next().await {
            if gone || cm.metadata.deletion_timestamp.is_some() {
                let name = cm.metadata.name.unwrap_or_default();
                seen_deletions.lock().unwrap().push(name);
            }
        }
    });

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = Operator::new("framework-e2e", held_client)
        .install_crds(vec![kube_plan::crd::build::<Holder>()])
        .controller(
            Controller::new("holder", HolderReconciler { release })
                // The hook delays watch requests; the caches must fill by listing, as they would
                // behind an API server without streaming lists.
                .initial_list(kube_plan::initial_list::InitialList::Listed)
                .owns::<ConfigMap>()
                .primary_watch(
                    watcher::Config::default().fields(&format!("metadata.namespace={}", ns.name())),
                ),
        );
    let running = tokio::spawn(operator.run_until(async move {
        let _ = stopped.await;
    }));

    let holders = create_holder(&client, ns.name()).await;
    eventually(
        Duration::from_secs(60),
        "a reconcile shown the child",
        || async {
            if !deletions.lock().unwrap().is_empty() {
                return Ok(());
            }
            let h = holders.get("h").await.map_err(|e| e.to_string())?;
            match h.status {
                Some(s) if s.seen => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
    .unwrap();

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let child = cms.get_opt(CHILD).await.unwrap();
    assert!(
        child.is_some_and(|c| c.metadata.deletion_timestamp.is_none()),
        "the applied child is gone"
    );
    assert_eq!(
        deletions.lock().unwrap().as_slice(),
        &[] as &[String],
        "the framework deleted a child it had applied"
    );
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    watching.abort();
}

/// Panics on every reconcile, as a controller hit by a bug would.
struct Panicking;

impl Reconciler for Panicking {
    type Resource = Holder;
    type Error = kube_plan::children::ChildError;

    async fn reconcile(&self, _: &Holder, _: &Context) -> Result<Plan<Holder>, Self::Error> {
        panic!("reconciler bug for the test");
    }
}

#[tokio::test]
async fn framework_operator_fails_health_and_exits_when_a_controller_dies() {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "fw-panic").await.unwrap();
    let health = {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        free.local_addr().unwrap()
    };
    let operator = Operator::new("framework-e2e-panic", client.clone())
        .health_addr(health)
        .install_crds(vec![kube_plan::crd::build::<Holder>()])
        .controller(Controller::new("panicking", Panicking).primary_watch(
            watcher::Config::default().fields(&format!("metadata.namespace={}", ns.name())),
        ));
    // Never told to stop: it must stop by itself.
    let running = tokio::spawn(operator.run_until(futures::future::pending::<()>()));
    create_holder(&client, ns.name()).await;
    let outcome = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the operator kept running without its controller")
        .unwrap();
    let err = outcome.expect_err("a dead controller is an error");
    let text = err.to_string();
    assert!(text.contains("controller panicking stopped"), "{text}");
    assert!(text.contains("reconciler bug for the test"), "{text}");
    let answer = reqwest::get(format!("http://{health}/healthz"))
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 500);
    assert!(answer.text().await.unwrap().contains("panicking"));
}

/// Writes its status on every reconcile and comes back 100 ms later: a replica that writes all the
/// time, so any write after it lost the lease shows.
struct Busy;

impl Reconciler for Busy {
    type Resource = Holder;
    type Error = kube_plan::children::ChildError;

    async fn reconcile(&self, h: &Holder, _: &Context) -> Result<Plan<Holder>, Self::Error> {
        let mut status = h.status.clone().unwrap_or_default();
        status.applied = !status.applied;
        Ok(Plan::new()
            .status(status)
            .requeue_after(Duration::from_millis(100)))
    }
}

#[tokio::test]
async fn framework_leader_whose_renewals_hang_stops_writing_before_a_standby_takes_over() {
    use k8s_openapi::api::coordination::v1::Lease;
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "fw-fence").await.unwrap();
    let election = |id: &str| {
        let mut e = kube_plan::LeaderElection::new("fw-fence", ns.name(), id);
        e.lease_duration = Duration::from_secs(4);
        e.renew_deadline = Duration::from_secs(3);
        e.retry_period = Duration::from_millis(500);
        e
    };
    // Replica a: once `freeze` is set, its Lease requests hang (a partition between it and the API
    // server's lease endpoint); its writes are recorded with when they were sent.
    let (freeze, frozen) = watch::channel(false);
    let writes_a = Arc::new(Mutex::new(Vec::<(std::time::Instant, String)>::new()));
    let record = writes_a.clone();
    let hook: e2e::Hook = Arc::new(move |method, uri| {
        let lease = uri.path().contains("/leases");
        if !lease && *method != http::Method::GET {
            record.lock().unwrap().push((
                std::time::Instant::now(),
                format!("{method} {}", uri.path()),
            ));
        }
        let mut frozen = frozen.clone();
        (lease && *frozen.borrow()).then(|| {
            Box::pin(async move {
                let _ = frozen.wait_for(|f| !*f).await;
            }) as futures::future::BoxFuture<'static, ()>
        })
    });
    let client_a = e2e::hooked_client(cluster, hook).await;
    let operator = |name: &str, client: kube::Client| {
        Operator::new(name, client)
            .install_crds(vec![kube_plan::crd::build::<Holder>()])
            .leader_election(election(name))
            .controller(Controller::new("busy", Busy).primary_watch(
                watcher::Config::default().fields(&format!("metadata.namespace={}", ns.name())),
            ))
    };
    let a =
        tokio::spawn(operator("replica-a", client_a).run_until(futures::future::pending::<()>()));
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns.name());
    let holder = || async {
        leases
            .get_opt("fw-fence")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
            .ok_or("no holder")
    };
    eventually(Duration::from_secs(30), "replica-a leads", || async {
        match holder().await? {
            h if h == "replica-a" => Ok(()),
            _ => Err("another holder"),
        }
    })
    .await
    .unwrap();
    let (stop_b, stopped_b) = tokio::sync::oneshot::channel::<()>();
    let b = tokio::spawn(operator("replica-b", client.clone()).run_until(async move {
        let _ = stopped_b.await;
    }));
    create_holder(&client, ns.name()).await;
    eventually(Duration::from_secs(30), "replica-a writing", || async {
        if writes_a.lock().unwrap().len() >= 3 {
            Ok(())
        } else {
            Err("no writes yet")
        }
    })
    .await
    .unwrap();

    freeze.send_replace(true);
    let took_over = eventually(Duration::from_secs(30), "replica-b takes over", || async {
        match holder().await? {
            h if h == "replica-b" => Ok(std::time::Instant::now()),
            _ => Err("replica-a still holds it"),
        }
    })
    .await
    .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(30), a)
        .await
        .expect("replica-a kept running after its renewals hung")
        .unwrap();
    assert!(
        outcome
            .expect_err("losing the lease is an error")
            .to_string()
            .contains("lost leadership"),
    );
    let last = writes_a.lock().unwrap().last().cloned().unwrap();
    assert!(
        last.0 < took_over,
        "replica-a wrote {} after replica-b took over",
        last.1
    );
    freeze.send_replace(false);
    let _ = stop_b.send(());
    // Bounded: one fresh-clone run hung here for over 10 minutes (replica-b's graceful stop or a
    // request of replica-a held by the freeze hook; not found yet). A hang must fail the test, not
    // stall the suite.
    tokio::time::timeout(Duration::from_secs(60), b)
        .await
        .expect("replica-b stops within 60 s of being told to")
        .unwrap()
        .unwrap();
}

/// Every watch of the framework asks for a streaming list (objects arrive one at a time, each trimmed
/// as it comes, instead of one large decoded list); an API server with streaming lists turned off
/// (Kubernetes 1.33 ships them off) refuses that watch, and the framework lists instead.
#[tokio::test]
async fn framework_watches_stream_their_initial_state_or_fall_back_to_lists() {
    use kube::runtime::watcher::Event;
    use kube_plan::initial_list;
    use kube_plan::testing::{Component, TestCluster};

    let (_, client) = cluster().await.expect("cluster");
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    assert!(
        initial_list::streams_initial_state(&api).await,
        "Kubernetes 1.37 streams initial states"
    );

    let mut off = TestCluster::builder()
        .args(
            Component::KubeApiserver,
            ["--feature-gates=WatchList=false"],
        )
        .start()
        .expect("a cluster without streaming lists");
    let api: Api<ConfigMap> = Api::namespaced(off.client().await.expect("client"), "default");
    assert!(!initial_list::streams_initial_state(&api).await);
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("listed-not-streamed".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &cm)
        .await
        .expect("create");
    let mut events = Box::pin(initial_list::watch(
        api,
        watcher::Config::default(),
        initial_list::InitialList::Auto,
    ));
    let mut seen = Vec::new();
    let synced = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = events.next().await {
            match event.expect("the watch works without streaming lists") {
                Event::InitApply(cm) => seen.push(cm.metadata.name.unwrap_or_default()),
                Event::InitDone => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(synced.is_ok(), "the initial list never completed");
    assert!(seen.iter().any(|n| n == "listed-not-streamed"), "{seen:?}");
    off.stop().expect("stopping the private cluster");
}

/// An object whose ConfigMap of the same name holds its text as first created: a child to create
/// only.
#[derive(
    CustomResource,
    PrinterColumns,
    Serialize,
    Deserialize,
    Clone,
    Debug,
    Default,
    schemars::JsonSchema,
)]
#[kube(
    group = "framework.e2e.example",
    version = "v1",
    kind = "Stamp",
    namespaced,
    status = "StampStatus"
)]
pub struct StampSpec {
    text: String,
}

#[derive(
    Status, PrinterColumns, Serialize, Deserialize, Clone, Debug, Default, schemars::JsonSchema,
)]
pub struct StampStatus {
    /// The text the last reconcile planned with.
    #[serde(default)]
    planned: String,
    #[status(conditions)]
    #[serde(default)]
    conditions: Vec<Condition>,
}

struct StampReconciler;

impl Reconciler for StampReconciler {
    type Resource = Stamp;
    type Error = kube_plan::children::ChildError;

    async fn reconcile(&self, s: &Stamp, _: &Context) -> Result<Plan<Stamp>, Self::Error> {
        let mut cm = ConfigMap::default();
        cm.metadata.name = s.metadata.name.clone();
        cm.metadata.namespace = s.metadata.namespace.clone();
        cm.data = Some([("text".to_owned(), s.spec.text.clone())].into());
        let mut status = s.status.clone().unwrap_or_default();
        status.planned = s.spec.text.clone();
        Ok(Plan::new()
            .child(Child::new(&cm)?.create_only())
            .status(status))
    }
}

#[tokio::test]
async fn framework_create_only_child_is_created_once_and_a_foreign_name_is_a_conflict() {
    use kube::api::{DeleteParams, Patch, PatchParams};
    use kube_plan::controller::CHILD_CONFLICT;
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "fw-once").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = Operator::new("framework-e2e-once", client.clone())
        .install_crds(vec![kube_plan::crd::build::<Stamp>()])
        .controller(
            Controller::new("stamp", StampReconciler)
                .owns::<ConfigMap>()
                .primary_watch(
                    watcher::Config::default().fields(&format!("metadata.namespace={}", ns.name())),
                ),
        );
    let running = tokio::spawn(operator.run_until(async move {
        let _ = stopped.await;
    }));
    let stamps: Api<Stamp> = Api::namespaced(client.clone(), ns.name());
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let text_of = |name: &'static str| {
        let cms = cms.clone();
        async move {
            let cm = cms.get_opt(name).await.map_err(|e| e.to_string())?;
            let text = cm.and_then(|c| c.data?.get("text").cloned());
            text.ok_or_else(|| format!("no ConfigMap {name} with text"))
        }
    };
    let planned = |name: &'static str, text: &'static str| {
        let stamps = stamps.clone();
        async move {
            let s = stamps.get(name).await.map_err(|e| e.to_string())?;
            match s.status.map(|st| st.planned) {
                Some(p) if p == text => Ok(()),
                other => Err(format!("planned {other:?}")),
            }
        }
    };
    let stamp = |name: &str, text: &str| {
        Stamp::new(
            name,
            StampSpec {
                text: text.to_owned(),
            },
        )
    };
    eventually(Duration::from_secs(30), "Stamp a created", || async {
        stamps
            .create(&PostParams::default(), &stamp("a", "one"))
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    let first = eventually(Duration::from_secs(30), "ConfigMap a", || text_of("a"))
        .await
        .unwrap();
    assert_eq!(first, "one");

    // A changed plan does not touch the child once it exists.
    stamps
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"text": "two"}})),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "a reconciled with two", || {
        planned("a", "two")
    })
    .await
    .unwrap();
    assert_eq!(
        text_of("a").await.unwrap(),
        "one",
        "created once, left as it is"
    );

    // Gone, it is created again, from the plan of the day.
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(30), "ConfigMap a again", || async {
        match text_of("a").await?.as_str() {
            "two" => Ok(()),
            other => Err(format!("text {other}")),
        }
    })
    .await
    .unwrap();

    // A name someone else holds is a conflict, and their object is left alone.
    let mut foreign = ConfigMap::default();
    foreign.metadata.name = Some("b".into());
    foreign.data = Some([("text".to_owned(), "theirs".to_owned())].into());
    cms.create(&PostParams::default(), &foreign).await.unwrap();
    stamps
        .create(&PostParams::default(), &stamp("b", "ours"))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "b reports the conflict",
        || async {
            let s = stamps.get("b").await.map_err(|e| e.to_string())?;
            let conds = s.status.map(|st| st.conditions).unwrap_or_default();
            if kube_plan::conditions::is_true(&conds, CHILD_CONFLICT) {
                Ok(())
            } else {
                Err(format!("{conds:?}"))
            }
        },
    )
    .await
    .unwrap();
    let b = cms.get("b").await.unwrap();
    assert_eq!(b.data.unwrap()["text"], "theirs");
    assert!(b.metadata.owner_references.unwrap_or_default().is_empty());
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

/// An object that is either hot (its reconcile takes a while and asks to run again at once) or
/// cold (reconciled once and done).
#[derive(
    CustomResource,
    PrinterColumns,
    Serialize,
    Deserialize,
    Clone,
    Debug,
    Default,
    schemars::JsonSchema,
)]
#[kube(
    group = "framework.e2e.example",
    version = "v1",
    kind = "Turn",
    namespaced,
    status = "TurnStatus"
)]
pub struct TurnSpec {
    hot: bool,
}

#[derive(
    Status, PrinterColumns, Serialize, Deserialize, Clone, Debug, Default, schemars::JsonSchema,
)]
pub struct TurnStatus {
    #[status(conditions)]
    #[serde(default)]
    conditions: Vec<Condition>,
}

struct TurnReconciler {
    /// The names of the objects reconciled at least once.
    served: Arc<Mutex<std::collections::BTreeSet<String>>>,
}

impl Reconciler for TurnReconciler {
    type Resource = Turn;
    type Error = std::convert::Infallible;

    async fn reconcile(&self, t: &Turn, _: &Context) -> Result<Plan<Turn>, Self::Error> {
        let name = t.metadata.name.clone().unwrap_or_default();
        self.served.lock().unwrap().insert(name);
        if t.spec.hot {
            // Work that keeps the controller's only worker busy (a slow reconcile, not a wait
            // for anything), after which the object wants to run again.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Ok(Plan::new().requeue_after(Duration::ZERO));
        }
        Ok(Plan::new())
    }
}

/// A controller of the Turns in `ns` with a single worker, running until the sender fires.
struct TurnOperator {
    registry: prometheus::Registry,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<Result<(), kube_plan::OperatorError>>,
    turns: Api<Turn>,
}

impl TurnOperator {
    fn start(
        client: &kube::Client,
        ns: &str,
        name: &str,
        reconciler: impl Reconciler<Resource = Turn>,
    ) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let operator = Operator::new(&format!("framework-e2e-{name}"), client.clone())
            .install_crds(vec![kube_plan::crd::build::<Turn>()])
            .controller(
                Controller::new(name, reconciler)
                    .concurrency(1)
                    .primary_watch(
                        watcher::Config::default().fields(&format!("metadata.namespace={ns}")),
                    ),
            );
        let registry = operator.registry().clone();
        let running = tokio::spawn(operator.run_until(async move {
            let _ = stopped.await;
        }));
        Self {
            registry,
            stop,
            running,
            turns: Api::namespaced(client.clone(), ns),
        }
    }

    /// Creates the Turn `name` (a retry that finds it made counts).
    async fn create(&self, name: &str, hot: bool) {
        eventually(Duration::from_secs(30), "Turn created", || async {
            match self
                .turns
                .create(&PostParams::default(), &Turn::new(name, TurnSpec { hot }))
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
        .unwrap();
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.running.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn framework_a_saturated_controller_still_reconciles_every_object() {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "fw-turns").await.unwrap();
    let served = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let operator = TurnOperator::start(
        &client,
        ns.name(),
        "turn",
        TurnReconciler {
            served: Arc::clone(&served),
        },
    );
    // Objects that always want the worker again, then many that need it once.
    for i in 0..6 {
        operator.create(&format!("hot-{i}"), true).await;
    }
    let cold: Vec<String> = (0..30).map(|i| format!("cold-{i}")).collect();
    for name in &cold {
        operator.create(name, false).await;
    }
    // Waiting objects take the free worker in turn: none is passed over for as long as the hot
    // ones keep coming back.
    let all_served = eventually(
        Duration::from_secs(60),
        "every cold Turn reconciled",
        || {
            let served = served.lock().unwrap().clone();
            let missing: Vec<&String> = cold.iter().filter(|n| !served.contains(*n)).collect();
            let result = if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("never reconciled: {missing:?}"))
            };
            async move { result }
        },
    )
    .await;
    // The waits are there to see: objects queued for the worker, and how long they waited.
    let waits = operator
        .registry
        .gather()
        .into_iter()
        .find(|f| f.name() == "workqueue_queue_duration_seconds")
        .map(|f| f.get_metric()[0].get_histogram().get_sample_count());
    operator.stop().await;
    all_served.unwrap();
    assert!(
        waits.is_some_and(|n| n > 36),
        "every object waited for the worker at least once: {waits:?}"
    );
}

/// Counts the runs of each Turn, with the `hot` each run saw. The Turn named `gate` holds the
/// controller's only worker, at its first run, until the cache shows `b` hot.
struct GatedReconciler {
    runs: Arc<Mutex<std::collections::BTreeMap<String, Vec<bool>>>>,
}

impl Reconciler for GatedReconciler {
    type Resource = Turn;
    type Error = std::convert::Infallible;

    async fn reconcile(&self, t: &Turn, ctx: &Context) -> Result<Plan<Turn>, Self::Error> {
        let name = t.metadata.name.clone().unwrap_or_default();
        let first = {
            let mut runs = self.runs.lock().unwrap();
            let seen = runs.entry(name.clone()).or_default();
            seen.push(t.spec.hot);
            seen.len() == 1
        };
        if name == "gate" && first {
            let b_is_hot = || {
                ctx.cached::<Turn>()
                    .iter()
                    .any(|o| o.metadata.name.as_deref() == Some("b") && o.spec.hot)
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !b_is_hot() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(Plan::new())
    }
}

#[tokio::test]
async fn framework_an_object_changed_while_it_waits_for_a_worker_runs_once_for_it_all() {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "fw-gated").await.unwrap();
    let runs = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    let operator = TurnOperator::start(
        &client,
        ns.name(),
        "gated",
        GatedReconciler {
            runs: Arc::clone(&runs),
        },
    );
    let ran = |name: &'static str| {
        let runs = Arc::clone(&runs);
        async move {
            eventually(Duration::from_secs(30), "a run", || {
                let n = runs.lock().unwrap().get(name).map_or(0, Vec::len);
                async move {
                    if n > 0 {
                        Ok(())
                    } else {
                        Err(format!("{name} not run yet"))
                    }
                }
            })
            .await
        }
    };
    // The gate takes the only worker; b is created, then changed, while it waits for it.
    operator.create("gate", false).await;
    ran("gate").await.unwrap();
    operator.create("b", false).await;
    operator
        .turns
        .patch(
            "b",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"hot": true}})),
        )
        .await
        .unwrap();
    ran("b").await.unwrap();
    // Fences: c waits behind b's run, d behind whatever was queued when c ran (a second run of b
    // would have been): once d has run, b has had every run it was going to get.
    operator.create("c", false).await;
    ran("c").await.unwrap();
    operator.create("d", false).await;
    let fenced = ran("d").await;
    operator.stop().await;
    fenced.unwrap();
    let b = runs.lock().unwrap().get("b").cloned().unwrap_or_default();
    // One run, which read b after its change: the triggers that came while it waited are answered.
    assert_eq!(b, [true], "b's runs, with the `hot` each saw");
}

/// Does nothing but record which objects it reconciled and which it was told are gone.
#[derive(Clone, Default)]
struct Recording {
    reconciled: Arc<Mutex<Vec<String>>>,
    deleted: Arc<Mutex<Vec<String>>>,
}

impl Reconciler for Recording {
    type Resource = Holder;
    type Error = kube_plan::children::ChildError;

    async fn reconcile(&self, h: &Holder, _: &Context) -> Result<Plan<Holder>, Self::Error> {
        self.reconciled
            .lock()
            .unwrap()
            .push(kube::ResourceExt::name_any(h));
        Ok(Plan::new())
    }

    fn deleted(&self, h: &Holder) {
        self.deleted
            .lock()
            .unwrap()
            .push(kube::ResourceExt::name_any(h));
    }
}

#[tokio::test]
async fn framework_a_deletion_hidden_by_a_relist_still_reaches_the_reconciler() {
    use kube::api::{DeleteParams, ListParams, WatchEvent, WatchParams};
    use kube_plan::testing::{Component, TestCluster};
    kube_plan::install_crypto_provider();
    kube_plan::testing::init_logging();
    // Watches that cannot resume from a version the operator missed: no watch cache in the API
    // server, and etcd's history compacted every second.
    let cluster = TestCluster::builder()
        .args(
            Component::KubeApiserver,
            ["--watch-cache=false", "--etcd-compaction-interval=1s"],
        )
        .start()
        .expect("a cluster whose watches do not resume");
    let client = cluster.client().await.unwrap();
    let ns = cluster.namespace(&client, "fw-relist").await.unwrap();
    // While `hold` is set, the operator's watch requests for Holders wait (a network partition
    // between the operator and the API server); `waiting` counts those that arrived.
    let (hold, held) = watch::channel(false);
    let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let arrived = waiting.clone();
    let hook: e2e::Hook = Arc::new(move |_, uri| {
        let watch = uri.path().ends_with("/holders")
            && uri.query().is_some_and(|q| q.contains("watch=true"));
        let mut held = held.clone();
        (watch && *held.borrow()).then(|| {
            arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                let _ = held.wait_for(|h| !*h).await;
            }) as futures::future::BoxFuture<'static, ()>
        })
    });
    let recording = Recording::default();
    let operator = Operator::new(
        "framework-e2e-relist",
        e2e::hooked_client(&cluster, hook).await,
    )
    .install_crds(vec![kube_plan::crd::build::<Holder>()])
    .controller(
        Controller::new("recording", recording.clone())
            // Lists (not watches) fill the cache, so a re-list is not held with the watches.
            .initial_list(kube_plan::initial_list::InitialList::Listed)
            // Each watch ends after a second and is made again from where it stopped.
            .primary_watch(
                watcher::Config::default()
                    .fields(&format!("metadata.namespace={}", ns.name()))
                    .timeout(1),
            ),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(operator.run_until(async move {
        let _ = stopped.await;
    }));
    let holders: Api<Holder> = Api::namespaced(client.clone(), ns.name());
    for name in ["gone", "kept"] {
        eventually(Duration::from_secs(30), "Holder created", || async {
            holders
                .create(&PostParams::default(), &Holder::new(name, HolderSpec {}))
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap();
    }
    eventually(Duration::from_secs(30), "both reconciled", || async {
        let seen = recording.reconciled.lock().unwrap().clone();
        if ["gone", "kept"].iter().all(|n| seen.iter().any(|s| s == n)) {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await
    .unwrap();

    // Partitioned: once a watch request waits, none runs, and the deletion goes unseen.
    hold.send_replace(true);
    eventually(Duration::from_secs(30), "a watch request held", || async {
        match waiting.load(std::sync::atomic::Ordering::SeqCst) {
            0 => Err("none yet"),
            _ => Ok(()),
        }
    })
    .await
    .unwrap();
    let before = holders
        .list_metadata(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    holders
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    // The history the held watch would resume from is compacted away: resuming now is refused.
    eventually(
        Duration::from_secs(30),
        "the old version compacted",
        || async {
            let wp = WatchParams::default().timeout(1);
            let mut events = holders
                .watch(&wp, &before)
                .await
                .map_err(|e| e.to_string())?
                .boxed();
            match events.next().await {
                Some(Ok(WatchEvent::Error(e))) if e.code == 410 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
    .unwrap();
    assert!(
        recording.deleted.lock().unwrap().is_empty(),
        "nothing was seen deleted during the partition"
    );

    // Healed: the watch cannot resume, the watcher lists again, and "gone" is not in the list.
    hold.send_replace(false);
    eventually(
        Duration::from_secs(30),
        "the reconciler told of the deletion",
        || async {
            let deleted = recording.deleted.lock().unwrap().clone();
            if deleted.iter().any(|n| n == "gone") {
                Ok(deleted)
            } else {
                Err(format!("{deleted:?}"))
            }
        },
    )
    .await
    .map(|deleted| assert!(!deleted.contains(&"kept".to_owned()), "{deleted:?}"))
    .unwrap();
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}
