//! A real local control plane for tests: etcd, kube-apiserver, kube-controller-manager and KWOK
//! (simulated nodes), the way controller-runtime's envtest gives Go operators one.
//!
//! Where the cluster comes from, in order:
//!
//! 1. `KUBECONFIG` set: the tests attach to that cluster.
//! 2. `KUBEBUILDER_ASSETS` set (the directory `setup-envtest use -p path` prints, holding `etcd` and
//!    `kube-apiserver`, as Go operators' envtest uses it): etcd and kube-apiserver started from Rust
//!    on free loopback ports, with certificates made in a temporary directory, and killed on drop or
//!    when the test process ends. No script, no other tool; there are no nodes, no scheduler and no
//!    garbage collector, as with envtest. [`TestCluster::from_assets`] does the same for any directory.
//! 3. Otherwise this repository's harness script (`tests/harness/cluster.sh`, or
//!    `FRAMEWORK_TEST_HARNESS`), which builds the upstream binaries once per machine and adds
//!    kube-controller-manager, kube-scheduler and KWOK (simulated nodes).
//!
//! A test asks for the cluster with [`TestCluster::shared`] (started on first use, then reused by
//! every test of the process; the harness's also by later test binaries), or [`TestCluster::start`]
//! for a private one torn down on drop.
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

use control_plane::ControlPlane;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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
    /// What stops it when this drops.
    owner: Owner,
}

/// Who stops a cluster.
#[derive(Debug)]
enum Owner {
    /// Nobody here: a cluster attached to, or the harness's shared one (it outlives test runs).
    Elsewhere,
    /// A private cluster of the harness: `script down` with its state directory.
    Harness { script: PathBuf, state: PathBuf },
    /// A control plane this process started from binaries: held for its `Drop`, which stops it.
    Process(#[expect(dead_code, reason = "held for its Drop")] ControlPlane),
}

static SHARED: OnceLock<Result<TestCluster, String>> = OnceLock::new();

/// The environment variable naming a directory of control-plane binaries (envtest's).
const ASSETS: &str = "KUBEBUILDER_ASSETS";

impl TestCluster {
    /// The cluster shared by all tests on this machine: `KUBECONFIG` if set, else the harness's default
    /// cluster, started if it is not running. It stays up for the next test run; `cluster.sh down`
    /// stops it.
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
        if let Some(assets) = std::env::var_os(ASSETS) {
            return Self::from_assets(assets);
        }
        let script = harness_script()?;
        let out = run_script(&script, &["ensure"], None, &[])?;
        Ok(Self::attached(kubeconfig_from_env_line(&out)?))
    }

    fn attached(kubeconfig: PathBuf) -> Self {
        Self {
            kubeconfig,
            owner: Owner::Elsewhere,
        }
    }

    /// A private cluster with `nodes` simulated nodes in a fresh state directory, stopped on drop.
    ///
    /// With `KUBEBUILDER_ASSETS` set, it is [`TestCluster::from_assets`] (which has no nodes: ask
    /// for 0).
    pub fn start(nodes: u32) -> Result<Self, TestError> {
        if let Some(assets) = std::env::var_os(ASSETS) {
            if nodes > 0 {
                return Err(TestError::Harness(format!(
                    "{ASSETS} gives etcd and kube-apiserver only; {nodes} simulated nodes need \
                     the harness (KWOK): unset {ASSETS}"
                )));
            }
            return Self::from_assets(assets);
        }
        Self::start_with_env(nodes, &[])
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
        let plane = ControlPlane::start(assets.as_ref())?;
        Ok(Self {
            kubeconfig: plane.kubeconfig(),
            owner: Owner::Process(plane),
        })
    }

    /// Like [`TestCluster::start`], with extra environment for the harness (for example
    /// `KUBE_APISERVER_EXTRA_ARGS`).
    pub fn start_with_env(nodes: u32, env: &[(&str, &str)]) -> Result<Self, TestError> {
        let script = harness_script()?;
        // Removed again if the cluster does not come up (the error carries the log's tail); kept
        // for the running cluster, whose `down` removes it.
        let dir = tempfile::Builder::new()
            .prefix("framework-cluster-")
            .tempdir()
            .map_err(|e| TestError::Harness(format!("creating a state directory: {e}")))?;
        let out = run_script(
            &script,
            &["up", "--nodes", &nodes.to_string()],
            Some(dir.path()),
            env,
        )?;
        let state = dir.keep();
        Ok(Self {
            kubeconfig: kubeconfig_from_env_line(&out)?,
            owner: Owner::Harness { script, state },
        })
    }

    /// Path of the kubeconfig (admin credentials).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The state directory of a private harness cluster (PIDs, logs), `None` otherwise.
    pub fn state_dir(&self) -> Option<&Path> {
        match &self.owner {
            Owner::Harness { state, .. } => Some(state),
            _ => None,
        }
    }

    /// Stops a private cluster now (also done on drop). The shared cluster is left alone.
    pub fn stop(&mut self) -> Result<(), TestError> {
        // A control plane of this process stops as it drops here.
        if let Owner::Harness { script, state } =
            std::mem::replace(&mut self.owner, Owner::Elsewhere)
        {
            run_script(&script, &["down"], Some(&state), &[])?;
        }
        Ok(())
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
    /// reports them Ready. They are deleted when the returned guard drops. A control plane started
    /// from binaries ([`TestCluster::from_assets`]) runs no KWOK: it answers with an error at once.
    pub async fn create_nodes(
        &self,
        client: &Client,
        nodes: Vec<Node>,
    ) -> Result<TestNodes, TestError> {
        if matches!(self.owner, Owner::Process(_)) {
            return Err(TestError::Harness(format!(
                "simulated nodes need KWOK, and a control plane started from {ASSETS} runs etcd \
                 and kube-apiserver only: use the harness's cluster (unset {ASSETS})"
            )));
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

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping private test cluster: {e}");
        }
    }
}

/// A Node object that KWOK manages (it plays the node's kubelet).
pub fn simulated_node(name: &str, labels: &BTreeMap<String, String>) -> Node {
    let mut all = BTreeMap::from([
        ("kubernetes.io/hostname".to_owned(), name.to_owned()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
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
            let ready = node
                .status
                .and_then(|s| s.conditions)
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if ready {
                Ok(())
            } else {
                Err("not Ready".to_owned())
            }
        },
    )
    .await?;
    Ok(())
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

/// Finds the harness script: `$FRAMEWORK_TEST_HARNESS`, else `tests/harness/cluster.sh` in the nearest
/// ancestor of the crate being tested that has one.
fn harness_script() -> Result<PathBuf, TestError> {
    if let Some(p) = std::env::var_os("FRAMEWORK_TEST_HARNESS") {
        return Ok(PathBuf::from(p));
    }
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_default();
    start
        .ancestors()
        .map(|d| d.join("tests/harness/cluster.sh"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            TestError::Harness(format!(
                "no tests/harness/cluster.sh above {}; set FRAMEWORK_TEST_HARNESS",
                start.display()
            ))
        })
}

fn run_script(
    script: &Path,
    args: &[&str],
    state: Option<&Path>,
    env: &[(&str, &str)],
) -> Result<String, TestError> {
    let mut cmd = Command::new("bash");
    cmd.arg(script).args(args).envs(env.iter().copied());
    if let Some(state) = state {
        cmd.env("DROP_E2E_STATE", state);
    }
    let out = cmd
        .output()
        .map_err(|e| TestError::Harness(format!("running {}: {e}", script.display())))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(TestError::Harness(format!(
            "{} {} failed ({}):\n{}",
            script.display(),
            args.join(" "),
            out.status,
            stderr
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kubeconfig_from_env_line(out: &str) -> Result<PathBuf, TestError> {
    out.lines()
        .rev()
        .find_map(|l| l.strip_prefix("export KUBECONFIG="))
        .map(PathBuf::from)
        .ok_or_else(|| TestError::Harness(format!("harness printed no KUBECONFIG line: {out}")))
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
