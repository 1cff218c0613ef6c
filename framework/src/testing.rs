//! A real local control plane for tests: etcd, kube-apiserver, kube-controller-manager and KWOK
//! (simulated nodes), the way controller-runtime's envtest gives Go operators one.
//!
//! Every process is started from Rust, on free loopback ports, with certificates made for it; no
//! script, no container runtime. The binaries come from, in order:
//!
//! 1. `KUBEBUILDER_ASSETS` (the directory `setup-envtest use -p path` prints, holding `etcd` and
//!    `kube-apiserver`, as Go operators' envtest uses it): an API server alone, like envtest, or a
//!    whole cluster if `kube-controller-manager`, `kube-scheduler`, `kwok` and KWOK's node stages
//!    (`kwok-node-stages/`) are there too;
//! 2. `KUBE_PLAN_TOOLS`, a directory holding all of them;
//! 3. `tools/tools.sh`, shipped with this crate, which builds them once per machine from the Go
//!    module proxy (Go needed) into `~/.cache/kube-plan-tools`.
//!
//! With `KUBECONFIG` set, [`TestCluster::shared`] attaches to that cluster instead.
//!
//! A test asks for the cluster with [`TestCluster::shared`] (started on first use and reused by
//! every test of the process, and by later test binaries: its processes are detached and recorded
//! in [`TestCluster::default_state_dir`]), or [`TestCluster::start`] / [`TestCluster::builder`]
//! for a private one, stopped on drop or when the test process ends, even after a panic.
//!
//! Each test gets its own namespace ([`TestCluster::namespace`]) and, where it needs them, its own
//! nodes ([`TestCluster::add_nodes`]), so tests run in parallel without seeing each other.
//!
//! ```no_run
//! use kube_plan::testing::{TestCluster, eventually};
//! use k8s_openapi::api::core::v1::Namespace;
//! use kube::Api;
//! use std::time::Duration;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let cluster = TestCluster::shared()?;
//! let client = cluster.client().await?;
//! let ns = cluster.namespace(&client, "example").await?;
//! let api: Api<Namespace> = Api::all(client.clone());
//! eventually(Duration::from_secs(10), "namespace exists", || async {
//!     api.get_opt(ns.name()).await.ok().flatten().ok_or("not yet")
//! })
//! .await?;
//! # Ok(()) }
//! ```

mod control_plane;
mod pki;
mod process;
mod tools;

use control_plane::ControlPlane;
pub use control_plane::{Component, ON_STOP};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tools::Tools;

/// Errors of the test harness.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// The harness script could not run or failed.
    #[error("local control plane: {0}")]
    Harness(String),
    /// The kubeconfig could not be read.
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// An API call failed.
    #[error("{0}: {1}")]
    Api(String, #[source] kube::Error),
    /// A condition did not hold in time.
    #[error("{0}")]
    Timeout(#[from] Timeout),
}

/// A condition that did not hold before its deadline, with the last thing observed.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {waited:?} waiting for {what}; last observation: {last}")]
pub struct Timeout {
    /// What was awaited.
    pub what: String,
    /// How long.
    pub waited: Duration,
    /// The last observation.
    pub last: String,
}

/// Polls `check` (every 100 ms) until it returns `Ok`, or fails after `deadline` with the last `Err`.
///
/// This is how tests wait: on a condition, with a deadline, never on a fixed sleep.
pub async fn eventually<T, E, F, Fut>(
    deadline: Duration,
    what: &str,
    mut check: F,
) -> Result<T, Timeout>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= deadline => {
                return Err(Timeout {
                    what: what.to_owned(),
                    waited: start.elapsed(),
                    last: e.to_string(),
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A running local control plane.
#[derive(Debug)]
pub struct TestCluster {
    kubeconfig: PathBuf,
    /// The state directory of a cluster started here (private or shared).
    state: Option<PathBuf>,
    /// Whether KWOK runs (simulated nodes can be added).
    kwok: bool,
    /// What stops it when this drops.
    owner: Owner,
}

/// Who stops a cluster.
#[derive(Debug)]
enum Owner {
    /// Nobody here: a cluster attached to, or the shared one (it outlives test runs).
    Elsewhere,
    /// A private cluster this process started: held for its `Drop`, which stops it.
    Process(ControlPlane),
}

static SHARED: OnceLock<Result<TestCluster, String>> = OnceLock::new();

/// The environment variable naming a directory of control-plane binaries (envtest's).
const ASSETS: &str = "KUBEBUILDER_ASSETS";

/// The environment variable naming the shared cluster's state directory.
pub const STATE_ENV: &str = "KUBE_PLAN_CLUSTER_STATE";

impl TestCluster {
    /// The cluster shared by all tests on this machine, started on first use:
    ///
    /// - `KUBECONFIG` set: that cluster;
    /// - `KUBEBUILDER_ASSETS` set: a control plane from those binaries, for this process only;
    /// - otherwise a whole cluster (with KWOK and three simulated nodes) in
    ///   [`TestCluster::default_state_dir`], reused if it runs, left running for the next test
    ///   binary; [`TestCluster::down`] stops it.
    pub fn shared() -> Result<&'static TestCluster, TestError> {
        SHARED
            .get_or_init(|| Self::attach_or_ensure().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| TestError::Harness(e.clone()))
    }

    fn attach_or_ensure() -> Result<Self, TestError> {
        if let Some(path) = std::env::var_os("KUBECONFIG") {
            return Ok(Self::attached(PathBuf::from(path)));
        }
        if std::env::var_os(ASSETS).is_some() {
            return Self::builder().start();
        }
        Self::builder()
            .nodes(SHARED_NODES)
            .shared_at(&Self::default_state_dir())
    }

    fn attached(kubeconfig: PathBuf) -> Self {
        Self {
            kubeconfig,
            state: None,
            kwok: true,
            owner: Owner::Elsewhere,
        }
    }

    /// A cluster to configure before it starts: nodes, flags per component, KWOK's Pod stages.
    ///
    /// ```no_run
    /// use kube_plan::testing::{Component, TestCluster};
    /// # fn main() -> Result<(), kube_plan::testing::TestError> {
    /// let cluster = TestCluster::builder()
    ///     .nodes(2)
    ///     .args(Component::KubeApiserver, ["--feature-gates=WatchList=false"])
    ///     .start()?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> TestClusterBuilder {
        TestClusterBuilder::default()
    }

    /// A private cluster with `nodes` simulated nodes, stopped on drop (and when the test
    /// process ends).
    pub fn start(nodes: u32) -> Result<Self, TestError> {
        Self::builder().nodes(nodes).start()
    }

    /// A private control plane, etcd and kube-apiserver, started from the binaries in `assets`
    /// (as `setup-envtest` lays them out) and stopped on drop. Nothing else is needed: no script,
    /// no Go, no container runtime.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), kube_plan::testing::TestError> {
    /// let cluster = kube_plan::testing::TestCluster::from_assets("/usr/local/kubebuilder/bin")?;
    /// println!("kubeconfig: {}", cluster.kubeconfig().display());
    /// # Ok(()) }
    /// ```
    pub fn from_assets(assets: impl AsRef<Path>) -> Result<Self, TestError> {
        let mut builder = Self::builder().assets(assets);
        builder.options.api_only = true;
        builder.start()
    }

    /// Where the shared cluster lives: `KUBE_PLAN_CLUSTER_STATE`, else `kube-plan-cluster` in the
    /// cargo target directory of the running test binary, else in the temporary directory.
    pub fn default_state_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os(STATE_ENV) {
            return PathBuf::from(dir);
        }
        let target = std::env::current_exe().ok().and_then(|exe| {
            exe.ancestors()
                .find(|d| d.join("CACHEDIR.TAG").is_file())
                .map(Path::to_path_buf)
        });
        match target {
            Some(target) => target.join("kube-plan-cluster"),
            None => std::env::temp_dir().join("kube-plan-shared-cluster"),
        }
    }

    /// Stops the cluster whose state is in `state` (see [`TestClusterBuilder::shared_at`]), with
    /// every process that joined it, and removes the directory. `false` when nothing was there.
    pub fn down(state: &Path) -> Result<bool, TestError> {
        control_plane::down(state)
    }

    /// The components of the cluster in `state`, each with its PID while it runs.
    pub fn status(state: &Path) -> Vec<(Component, Option<u32>)> {
        control_plane::status(state)
    }

    /// Restarts `component` of the cluster whose state is in `state` (see
    /// [`TestCluster::restart`]), whether or not it still runs.
    pub fn restart_in(state: &Path, component: Component) -> Result<(), TestError> {
        control_plane::restart_detached(state, component)
    }

    /// Path of the kubeconfig (admin credentials).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The state directory (certificates, kubeconfig, logs, PIDs) of a cluster started here,
    /// `None` for one attached to with `KUBECONFIG`.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state.as_deref()
    }

    /// Stops a private cluster now (also done on drop). The shared cluster is left alone.
    pub fn stop(&mut self) -> Result<(), TestError> {
        // A control plane of this process stops as it drops here.
        self.owner = Owner::Elsewhere;
        Ok(())
    }

    /// Stops `component` and starts it again with the same flags, ports and data, as an upgrade
    /// or a crash-and-restart would; returns once the API server is ready again.
    pub fn restart(&self, component: Component) -> Result<(), TestError> {
        match (&self.owner, &self.state) {
            (Owner::Process(plane), _) => plane.restart(component),
            (Owner::Elsewhere, Some(state)) => control_plane::restart_detached(state, component),
            (Owner::Elsewhere, None) => Err(TestError::Harness(
                "a cluster attached to with KUBECONFIG cannot be restarted from here".into(),
            )),
        }
    }

    /// A client for this cluster. Make one per test: a client belongs to the async runtime that made it.
    pub async fn client(&self) -> Result<Client, TestError> {
        Client::try_from(self.config().await?)
            .map_err(|e| TestError::Api("building client".into(), e))
    }

    /// The client configuration for this cluster, for a client with its own layers (for example
    /// `kube::client::ClientBuilder::try_from(config)?.with_layer(..)`).
    pub async fn config(&self) -> Result<Config, TestError> {
        let kc =
            Kubeconfig::read_from(&self.kubeconfig).map_err(|source| TestError::Kubeconfig {
                path: self.kubeconfig.clone(),
                source,
            })?;
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|source| TestError::Kubeconfig {
                path: self.kubeconfig.clone(),
                source,
            })
    }

    /// A fresh namespace named `<prefix>-<random>`, deleted when the returned guard drops.
    pub async fn namespace(
        &self,
        client: &Client,
        prefix: &str,
    ) -> Result<TestNamespace, TestError> {
        let name = format!("{}-{}", prefix, unique_suffix());
        let api: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    "framework.test/e2e".to_owned(),
                    "true".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        api.create(&PostParams::default(), &ns)
            .await
            .map_err(|e| TestError::Api(format!("creating namespace {name}"), e))?;
        Ok(TestNamespace {
            name,
            kubeconfig: self.kubeconfig.clone(),
        })
    }

    /// Adds `count` simulated nodes named `<prefix>-<i>` with `labels`, and waits until KWOK reports
    /// them Ready. They are deleted when the returned guard drops.
    pub async fn add_nodes(
        &self,
        client: &Client,
        prefix: &str,
        count: usize,
        labels: &BTreeMap<String, String>,
    ) -> Result<TestNodes, TestError> {
        let nodes = (0..count)
            .map(|i| simulated_node(&format!("{prefix}-{i}"), labels))
            .collect();
        self.create_nodes(client, nodes).await
    }

    /// Creates the given Node objects (e.g. [`simulated_node`]s given taints), and waits until KWOK
    /// reports them Ready. They are deleted when the returned guard drops. A control plane without
    /// KWOK ([`TestCluster::from_assets`]) answers with an error at once.
    pub async fn create_nodes(
        &self,
        client: &Client,
        nodes: Vec<Node>,
    ) -> Result<TestNodes, TestError> {
        if !self.kwok {
            return Err(TestError::Harness(
                "simulated nodes need KWOK, and this control plane runs etcd and kube-apiserver \
                 only: give it kube-controller-manager, kube-scheduler and kwok too"
                    .into(),
            ));
        }
        let api: Api<Node> = Api::all(client.clone());
        let mut guard = TestNodes {
            names: Vec::new(),
            kubeconfig: self.kubeconfig.clone(),
        };
        for node in nodes {
            let name = node.metadata.name.clone().unwrap_or_default();
            api.create(&PostParams::default(), &node)
                .await
                .map_err(|e| TestError::Api(format!("creating node {name}"), e))?;
            guard.names.push(name);
        }
        for name in &guard.names {
            wait_node_ready(&api, name).await?;
        }
        Ok(guard)
    }
}

/// The simulated nodes of the shared cluster.
const SHARED_NODES: u32 = 3;

/// A [`TestCluster`] being configured; see [`TestCluster::builder`].
#[derive(Debug, Default)]
#[must_use = "a builder starts nothing until `start` or `shared_at`"]
pub struct TestClusterBuilder {
    options: control_plane::Options,
    assets: Option<PathBuf>,
}

impl TestClusterBuilder {
    /// Simulated nodes named `kwok-node-<i>`, Ready before the cluster is handed out.
    pub fn nodes(mut self, nodes: u32) -> Self {
        self.options.nodes = nodes;
        self
    }

    /// Extra flags for `component`, after the ones it always gets (a later flag wins).
    pub fn args<I, S>(mut self, component: Component, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.options
            .args
            .entry(component)
            .or_default()
            .extend(args.into_iter().map(Into::into));
        self
    }

    /// KWOK's stages for Pods, instead of the default ones (a file of `Stage` objects).
    pub fn pod_stages(mut self, path: impl Into<PathBuf>) -> Self {
        self.options.pod_stages = Some(path.into());
        self
    }

    /// The binaries to run, instead of `KUBEBUILDER_ASSETS` or the tool cache.
    pub fn assets(mut self, dir: impl AsRef<Path>) -> Self {
        self.assets = Some(dir.as_ref().to_owned());
        self
    }

    fn tools(&self) -> Result<Tools, TestError> {
        match self
            .assets
            .clone()
            .or_else(|| std::env::var_os(ASSETS).map(PathBuf::from))
        {
            Some(dir) => Ok(Tools::at(&dir)),
            None => Tools::locate(),
        }
    }

    /// Starts a private cluster: its processes end when it drops or when the test process ends,
    /// and its state lives in a temporary directory.
    pub fn start(self) -> Result<TestCluster, TestError> {
        let plane = ControlPlane::start_private(&self.tools()?, &self.options)?;
        let state = plane.state().to_owned();
        Ok(TestCluster {
            kubeconfig: state.join("kubeconfig"),
            kwok: control_plane::runs(&state, Component::Kwok),
            state: Some(state),
            owner: Owner::Process(plane),
        })
    }

    /// The cluster whose state is in `state`: reused if every component runs, else started there
    /// afresh. Its processes outlive this one; [`TestCluster::down`] stops them. A lock beside
    /// the directory serialises callers, so parallel test processes share one cluster.
    pub fn shared_at(self, state: &Path) -> Result<TestCluster, TestError> {
        let kubeconfig = control_plane::ensure_shared(&self.tools()?, state, &self.options)?;
        Ok(TestCluster {
            kubeconfig,
            kwok: control_plane::runs(state, Component::Kwok),
            state: Some(state.to_owned()),
            owner: Owner::Elsewhere,
        })
    }
}

/// A Node object that KWOK manages (it plays the node's kubelet).
pub fn simulated_node(name: &str, labels: &BTreeMap<String, String>) -> Node {
    let mut all = BTreeMap::from([
        ("kubernetes.io/hostname".to_owned(), name.to_owned()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
        ("kubernetes.io/arch".to_owned(), "amd64".to_owned()),
        ("type".to_owned(), "kwok".to_owned()),
    ]);
    all.extend(labels.clone());
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(all),
            annotations: Some(BTreeMap::from([
                ("kwok.x-k8s.io/node".to_owned(), "fake".to_owned()),
                ("node.alpha.kubernetes.io/ttl".to_owned(), "0".to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}

/// Waits until the node reports `Ready=True`.
pub async fn wait_node_ready(api: &Api<Node>, name: &str) -> Result<(), TestError> {
    eventually(
        Duration::from_secs(30),
        &format!("node {name} Ready"),
        || async {
            let node = api.get(name).await.map_err(|e| e.to_string())?;
            if node_is_ready(&node) {
                Ok(())
            } else {
                Err("not Ready".to_owned())
            }
        },
    )
    .await?;
    Ok(())
}

/// Whether `node` reports `Ready=True`.
fn node_is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A test's namespace; deleted (in the background) on drop.
#[derive(Debug)]
pub struct TestNamespace {
    name: String,
    kubeconfig: PathBuf,
}

impl TestNamespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        cleanup_in_thread(self.kubeconfig.clone(), move |client| async move {
            let api: Api<Namespace> = Api::all(client);
            let _ = api.delete(&name, &DeleteParams::default()).await;
        });
    }
}

/// Nodes a test added; deleted on drop.
#[derive(Debug)]
pub struct TestNodes {
    names: Vec<String>,
    kubeconfig: PathBuf,
}

impl TestNodes {
    /// The node names.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

impl Drop for TestNodes {
    fn drop(&mut self) {
        let names = self.names.clone();
        cleanup_in_thread(self.kubeconfig.clone(), move |client| async move {
            let api: Api<Node> = Api::all(client);
            for n in names {
                let _ = api.delete(&n, &DeleteParams::default()).await;
            }
        });
    }
}

/// Runs async cleanup from `Drop` (which cannot await) on a short-lived runtime of its own.
fn cleanup_in_thread<F, Fut>(kubeconfig: PathBuf, f: F)
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let handle = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let cluster = TestCluster::attached(kubeconfig);
            if let Ok(client) = cluster.client().await {
                f(client).await;
            }
        });
    });
    let _ = handle.join();
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{:x}{:x}{}",
        std::process::id() % 0xfff,
        nanos % 0xffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Sends `tracing` output of the code under test to the test's captured output (shown when a test
/// fails), at the level `RUST_LOG` names (default `info`). Safe to call from every test.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
