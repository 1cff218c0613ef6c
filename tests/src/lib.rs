//! Shared helpers of the end-to-end suites (`tests/tests/*.rs`). Every suite runs against a real local
//! control plane started (or reused) through `kube_plan::testing`.

pub mod audit;
pub mod chaos;
pub mod fixtures;
pub mod identity;
pub mod realnode;

use futures::future::BoxFuture;
use kube::Client;
use kube_plan::testing::{TestCluster, TestError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The shared cluster and a client for it; installs the TLS provider first.
pub async fn cluster() -> Result<(&'static TestCluster, Client), TestError> {
    kube_plan::install_crypto_provider();
    kube_plan::testing::init_logging();
    let cluster = TestCluster::shared()?;
    let client = cluster.client().await?;
    Ok((cluster, client))
}

/// Installs (or updates) Drop's CRDs and waits until they are established.
pub async fn install_drop_crds(client: &Client) -> Result<(), kube_plan::crd::CrdError> {
    kube_plan::crd::install(
        client,
        &drop::api::crds(),
        "drop-e2e",
        std::time::Duration::from_secs(60),
    )
    .await
}

/// Drop running in this test process, limited to objects labelled `e2e.drop/test=<id>`, with its pull
/// Pods in the test's namespace (which enforces Pod Security "restricted", as the chart's does).
pub struct DropUnderTest {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), kube_plan::OperatorError>>>,
    /// The label value objects of this test carry.
    pub id: String,
}

/// Label key selecting a test's objects.
pub const TEST_LABEL: &str = "e2e.drop/test";

impl DropUnderTest {
    /// Starts Drop for test `id`, pulling into `namespace`.
    pub async fn start(client: &Client, namespace: &str, id: &str) -> Self {
        Self::start_with(client, namespace, id, |_| {}).await
    }

    /// Like [`DropUnderTest::start`], with `adjust` changing the settings first.
    pub async fn start_with(
        client: &Client,
        namespace: &str,
        id: &str,
        adjust: impl FnOnce(&mut drop::operator::Settings),
    ) -> Self {
        restrict_namespace(client, namespace).await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut settings = drop::operator::Settings {
            pod_namespace: namespace.to_owned(),
            pull_timeout: std::time::Duration::from_secs(120),
            install_crds: true,
            watch_selector: Some(format!("{TEST_LABEL}={id}")),
            ..drop::operator::Settings::default()
        };
        adjust(&mut settings);
        let task = tokio::spawn(drop::operator::run(client.clone(), settings, async move {
            let _ = stopped.await;
        }));
        Self {
            stop: Some(stop),
            task: Some(task),
            id: id.to_owned(),
        }
    }

    /// Stops Drop (as SIGTERM would) and waits for it to finish.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            // A graceful stop waits for running reconciles; one that never ends is a bug to see,
            // not a test run that hangs.
            tokio::time::timeout(std::time::Duration::from_secs(120), task)
                .await
                .expect("the operator stops within 120 s of being told to")
                .expect("operator task")
                .expect("operator ends cleanly");
        }
    }

    /// Labels that put an object under this test's operator.
    pub fn labels(&self) -> std::collections::BTreeMap<String, String> {
        std::collections::BTreeMap::from([(TEST_LABEL.to_owned(), self.id.clone())])
    }

    /// Creates `object` under this test's operator (labelled for it), retrying while its CRD is not
    /// served yet (Drop installs the CRDs as it starts).
    pub async fn create<K>(&self, api: &kube::Api<K>, mut object: K) -> K
    where
        K: kube::Resource + Clone + std::fmt::Debug + serde::Serialize,
        K: serde::de::DeserializeOwned,
        K::DynamicType: Default,
    {
        object.meta_mut().labels = Some(self.labels());
        let what = format!("{} created", K::kind(&Default::default()));
        kube_plan::testing::eventually(std::time::Duration::from_secs(30), &what, || async {
            api.create(&kube::api::PostParams::default(), &object)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for DropUnderTest {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Waits until the object `name` satisfies `ok`, for at most `secs` seconds; on timeout the panic
/// shows the object as last read (its `Debug` form, status included).
pub async fn wait_until<K>(
    api: &kube::Api<K>,
    name: &str,
    secs: u64,
    what: &str,
    ok: impl Fn(&K) -> bool,
) -> K
where
    K: Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    try_wait_until(api, name, secs, what, ok)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`wait_until`] that hands the timeout back (with the object as last read) instead of
/// panicking, for a caller that has more to show.
pub async fn try_wait_until<K>(
    api: &kube::Api<K>,
    name: &str,
    secs: u64,
    what: &str,
    ok: impl Fn(&K) -> bool,
) -> Result<K, String>
where
    K: Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    kube_plan::testing::eventually(std::time::Duration::from_secs(secs), what, || async {
        let object = api.get(name).await.map_err(|e| e.to_string())?;
        if ok(&object) {
            Ok(object)
        } else {
            Err(format!("{object:?}"))
        }
    })
    .await
    .map_err(|e| e.to_string())
}

/// Labels the namespace to enforce Pod Security "restricted".
pub async fn restrict_namespace(client: &Client, namespace: &str) {
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let label = serde_json::json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
    api.patch(namespace, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect("label namespace");
}

/// Every change `api` sees, as (object, gone), from a watch that keeps going through errors (its
/// backoff retries, as when the API server restarts): the tests' way to see objects change.
pub fn changes<K>(api: kube::Api<K>) -> impl futures::Stream<Item = (K, bool)> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(|event| async move {
            match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => Some((o, false)),
                Ok(watcher::Event::Delete(o)) => Some((o, true)),
                _ => None,
            }
        })
}

/// The Warning Events (reason: message) about objects whose name `about` accepts, in every namespace.
pub async fn warnings_about(client: &Client, about: impl Fn(&str) -> bool) -> Vec<String> {
    let events: kube::Api<k8s_openapi::api::core::v1::Event> = kube::Api::all(client.clone());
    events
        .list(&Default::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .filter(|e| about(e.involved_object.name.as_deref().unwrap_or_default()))
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .map(|e| format!("{:?}: {:?}", e.reason, e.message))
        .collect()
}

/// What a test saw of one pull Pod.
#[derive(Clone, Debug)]
pub struct PodRecord {
    /// Pod name.
    pub name: String,
    /// Node it was pinned to.
    pub node: String,
    /// CachedImage it pulls for.
    pub image: String,
    /// Its creation time (one-second resolution, from the API server).
    pub created: jiff::Timestamp,
    /// When the test first saw it (local clock, like `ended`).
    pub seen: jiff::Timestamp,
    /// When the test first saw it pulled, failed or gone (local clock).
    pub ended: Option<jiff::Timestamp>,
    /// It was deleted (or marked for deletion) before it reported a result: a pull thrown away.
    pub deleted_early: bool,
    /// Its pull secrets.
    pub pull_secrets: Vec<String>,
}

/// Records every pull Pod of a namespace as it appears and ends, from a watch.
#[derive(Clone, Default)]
pub struct PodRecorder {
    records: std::sync::Arc<std::sync::Mutex<Vec<PodRecord>>>,
}

impl PodRecorder {
    /// Starts recording Pods in `namespace`.
    pub fn start(client: &Client, namespace: &str) -> Self {
        use futures::StreamExt;
        let rec = Self::default();
        let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(client.clone(), namespace);
        let records = rec.records.clone();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(changes(api));
            while let Some((pod, gone)) = events.next().await {
                let Some(view) = drop::podbuilder::PullPodView::of(&pod) else {
                    continue;
                };
                let result = !matches!(view.outcome, drop::podbuilder::PullOutcome::Pulling);
                let going = gone || pod.metadata.deletion_timestamp.is_some();
                let ended = going || result;
                let mut all = records.lock().unwrap();
                match all.iter_mut().find(|r| r.name == view.name) {
                    Some(r) => {
                        if ended && r.ended.is_none() {
                            r.ended = Some(jiff::Timestamp::now());
                            r.deleted_early = going && !result;
                        }
                    }
                    None => all.push(PodRecord {
                        name: view.name.clone(),
                        node: view.node.clone(),
                        image: view.image.clone(),
                        created: view.created,
                        seen: jiff::Timestamp::now(),
                        ended: ended.then(jiff::Timestamp::now),
                        deleted_early: going && !result,
                        pull_secrets: pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.image_pull_secrets.clone())
                            .unwrap_or_default()
                            .into_iter()
                            .map(|s| s.name)
                            .collect(),
                    }),
                }
            }
        });
        rec
    }

    /// Most pulls in flight at once among `records`, from when each Pod was first seen until it
    /// was seen ended (an end and a start at the same instant: the end first).
    pub fn max_in_flight(records: &[PodRecord]) -> usize {
        let mut edges: Vec<(jiff::Timestamp, i32)> = Vec::new();
        for r in records {
            edges.push((r.seen, 1));
            if let Some(e) = r.ended {
                edges.push((e, -1));
            }
        }
        edges.sort();
        let (mut now, mut most) = (0i32, 0i32);
        for (_, d) in edges {
            now += d;
            most = most.max(now);
        }
        usize::try_from(most).unwrap_or(0)
    }

    /// Everything recorded so far, in the order the Pods appeared (the API server's creation times
    /// only have one-second resolution, so the local first-seen time orders them).
    pub fn records(&self) -> Vec<PodRecord> {
        let mut all = self.records.lock().unwrap().clone();
        all.sort_by_key(|r| r.seen);
        all
    }
}

/// Runs `cmd` and returns its standard output; panics with its standard error unless it succeeds.
/// `what` names the program (and where it comes from, for a missing one).
pub fn run_ok(cmd: &mut std::process::Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Path of a tool the harness built or fetched (`helm`, `kubectl`, …).
pub fn tool(name: &str) -> std::path::PathBuf {
    tools_cache().join("bin").join(name)
}

/// Where `framework/tools/tools.sh` builds and links the binaries.
pub fn tools_cache() -> std::path::PathBuf {
    let home = || std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default());
    std::env::var_os("KUBE_PLAN_TOOLS_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| home().join(".cache"))
                .join("kube-plan-tools")
        })
}

/// Waits until Pod `name` reports `phase`, and returns it.
pub async fn pod_in_phase(
    pods: &kube::Api<k8s_openapi::api::core::v1::Pod>,
    name: &str,
    phase: &str,
    within: std::time::Duration,
) -> Result<k8s_openapi::api::core::v1::Pod, kube_plan::testing::Timeout> {
    kube_plan::testing::eventually(within, &format!("Pod {name} {phase}"), || async {
        let pod = pods.get(name).await.map_err(|e| e.to_string())?;
        let now = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if now == Some(phase) {
            Ok(pod)
        } else {
            Err(format!("phase {now:?}"))
        }
    })
    .await
}

/// The PIDs recorded for the components of the cluster whose state is in `state`.
pub fn recorded_pids(state: &std::path::Path) -> Vec<u32> {
    kube_plan::testing::Component::ALL
        .iter()
        .map(|c| {
            std::fs::read_to_string(state.join("pids").join(c.name()))
                .unwrap_or_else(|e| panic!("pid file of {c}: {e}"))
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("pid file of {c}: {e}"))
        })
        .collect()
}

/// The repository root.
pub fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The workspace's target directory: `CARGO_TARGET_DIR` if set, else `target/` in the repository.
/// Nested builds take a directory of their own under it.
pub fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

/// Busy loops that keep the machine's cores loaded while a test runs; stopped on drop.
pub struct CpuLoad {
    children: Vec<std::process::Child>,
}

impl CpuLoad {
    /// Starts `n` busy-looping processes.
    pub fn start(n: usize) -> Self {
        let children = (0..n)
            .map(|_| {
                std::process::Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
                    .expect("start a busy loop")
            })
            .collect();
        Self { children }
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Called by a [`hooked_client`] with each request's method and URI before the request is sent. It
/// may record the request, and may return a future the request waits for.
pub type Hook =
    Arc<dyn Fn(&http::Method, &http::Uri) -> Option<BoxFuture<'static, ()>> + Send + Sync>;

/// A client for `cluster` whose every request passes through `hook`.
pub async fn hooked_client(cluster: &TestCluster, hook: Hook) -> Client {
    let config = cluster.config().await.expect("client configuration");
    kube::client::ClientBuilder::try_from(config)
        .expect("client stack")
        .with_layer(&HookLayer(hook))
        .build()
}

struct HookLayer(Hook);

impl<S> tower::Layer<S> for HookLayer {
    type Service = Hooked<S>;

    fn layer(&self, inner: S) -> Hooked<S> {
        Hooked {
            inner,
            hook: self.0.clone(),
        }
    }
}

/// A service that calls its hook before each request.
pub struct Hooked<S> {
    inner: S,
    hook: Hook,
}

impl<S, B> tower::Service<http::Request<B>> for Hooked<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let wait = (self.hook)(req.method(), req.uri());
        let response = self.inner.call(req);
        Box::pin(async move {
            if let Some(wait) = wait {
                wait.await;
            }
            response.await
        })
    }
}

/// The resource a request addresses, as `pods`, `cachedimages/status` or `events`.
pub fn resource_of(uri: &http::Uri) -> String {
    let segs: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let mut rest: &[&str] = match segs.first() {
        Some(&"api") => segs.get(2..).unwrap_or_default(),
        Some(&"apis") => segs.get(3..).unwrap_or_default(),
        _ => &segs,
    };
    if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        rest = &rest[2..];
    }
    match (rest.first(), rest.get(2)) {
        (Some(r), Some(sub)) => format!("{r}/{sub}"),
        (Some(r), None) => (*r).to_owned(),
        _ => String::new(),
    }
}

/// Counts of the writes (POST, PUT, PATCH, DELETE) a client made, by "METHOD resource".
#[derive(Clone, Default)]
pub struct WriteCounts(Arc<Mutex<BTreeMap<String, u64>>>);

impl WriteCounts {
    /// A hook that counts into these counts.
    pub fn hook(&self) -> Hook {
        let counts = self.0.clone();
        Arc::new(move |method, uri| {
            if *method != http::Method::GET {
                let key = format!("{method} {}", resource_of(uri));
                *counts.lock().unwrap().entry(key).or_insert(0) += 1;
            }
            None
        })
    }

    /// The counts so far.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn resource_of_names_the_resource_and_subresource() {
        let r = |p: &str| super::resource_of(&p.parse().unwrap());
        assert_eq!(r("/api/v1/namespaces/ns/pods/p1"), "pods");
        assert_eq!(r("/api/v1/namespaces/ns/pods?watch=true"), "pods");
        assert_eq!(
            r("/apis/drop.corewire.io/v1alpha1/cachedimages/a/status"),
            "cachedimages/status"
        );
        assert_eq!(r("/apis/events.k8s.io/v1/namespaces/ns/events"), "events");
        assert_eq!(r("/api/v1/nodes"), "nodes");
    }
}
