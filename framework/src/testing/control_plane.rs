//! A local cluster started from Rust: etcd and kube-apiserver, and, when their binaries are there,
//! kube-controller-manager, kube-scheduler and KWOK with simulated nodes.
//!
//! Everything lives in a state directory: certificates made with rcgen (`pki/`), the admin
//! `kubeconfig`, `logs/`, and `pids/` (see [`super::process`]). etcd's data goes to `/dev/shm` where
//! there is one (its path is kept in `etcd-data`). Every server listens on loopback ports chosen
//! free; a port taken by someone else before its component bound it makes the start begin again,
//! at most three times.
//!
//! A private cluster's processes are attached to the test process and its state directory is
//! temporary; a shared cluster's are detached and its state directory is a fixed path, which a lock
//! guards so that parallel test processes end up sharing one cluster.

use super::process::{self, Lifetime, harness};
use super::tools::Tools;
use super::{TestError, pki, simulated_node};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the API server has to become ready.
const APISERVER_WITHIN: Duration = Duration::from_secs(120);

/// How long the other components have to open their port.
const COMPONENT_WITHIN: Duration = Duration::from_secs(60);

/// How many times a start begins again after a port was taken under it.
const START_ATTEMPTS: usize = 3;

/// The start of a private control plane's directory name, in the system's temporary directory.
pub(crate) const DIR_PREFIX: &str = "kube-plan-cluster-";

/// The file in a private control plane's directory naming the process that started it.
pub(crate) const OWNER_FILE: &str = "owner.pid";

/// The executable a process that joins a cluster may leave in its state directory: run first when
/// the cluster stops (a real kubelet, say, that must put the machine back as it was).
pub const ON_STOP: &str = "on-stop";

/// The KWOK stages for Pods used unless a test names its own: see the file for its conventions.
const DEFAULT_POD_STAGES: &str = include_str!("kwok-pod-stages.yaml");

/// A process of a test cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Component {
    /// etcd.
    Etcd,
    /// kube-apiserver.
    KubeApiserver,
    /// kube-controller-manager: garbage collection, namespaces, service accounts, node lifecycle.
    KubeControllerManager,
    /// kube-scheduler.
    KubeScheduler,
    /// KWOK: the kubelet of every simulated node.
    Kwok,
}

impl Component {
    /// Every component, in start order.
    pub const ALL: [Component; 5] = [
        Component::Etcd,
        Component::KubeApiserver,
        Component::KubeControllerManager,
        Component::KubeScheduler,
        Component::Kwok,
    ];

    /// The binary's name, also the name of its log and PID files.
    pub fn name(self) -> &'static str {
        match self {
            Component::Etcd => "etcd",
            Component::KubeApiserver => "kube-apiserver",
            Component::KubeControllerManager => "kube-controller-manager",
            Component::KubeScheduler => "kube-scheduler",
            Component::Kwok => "kwok",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Component {
    type Err = TestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Component::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                TestError::Harness(format!(
                    "no component {s:?}; there are {}",
                    Component::ALL.map(Component::name).join(", ")
                ))
            })
    }
}

/// What a cluster is started with.
#[derive(Clone, Debug, Default)]
pub(crate) struct Options {
    /// Simulated nodes named `kwok-node-<i>`, Ready before the start returns.
    pub(crate) nodes: u32,
    /// etcd and kube-apiserver only, even when the other binaries are there.
    pub(crate) api_only: bool,
    /// Extra flags per component, after the harness's own.
    pub(crate) args: BTreeMap<Component, Vec<String>>,
    /// KWOK's stages for Pods, instead of the default ones.
    pub(crate) pod_stages: Option<PathBuf>,
}

/// A cluster this process started.
#[derive(Debug)]
pub(crate) struct ControlPlane {
    state: PathBuf,
    /// Its processes (attached to this one), to be reaped.
    children: Mutex<BTreeMap<Component, Child>>,
    /// A private cluster's temporary directory (removed on drop).
    _dir: Option<tempfile::TempDir>,
}

impl ControlPlane {
    /// Starts a private cluster in a temporary directory; its processes end with this process.
    pub(crate) fn start_private(tools: &Tools, options: &Options) -> Result<Self, TestError> {
        remove_stale_dirs();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(|e| harness("creating a directory", e))?;
        std::fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
            .map_err(|e| harness("writing the owner's PID", e))?;
        let children = up_retrying(tools, dir.path(), options, Lifetime::Attached)?;
        Ok(Self {
            state: dir.path().to_owned(),
            children: Mutex::new(children),
            _dir: Some(dir),
        })
    }

    /// The state directory.
    pub(crate) fn state(&self) -> &Path {
        &self.state
    }

    /// Stops `component` and starts it again with the same flags, ports and data.
    pub(crate) fn restart(&self, component: Component) -> Result<(), TestError> {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        restart(&self.state, component, Lifetime::Attached, &mut children)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let children = self.children.get_mut().unwrap_or_else(|p| p.into_inner());
        stop_all(&self.state, children);
    }
}

/// Reuses the running cluster in `state` (every component alive), or starts one there, detached.
/// Serialised by a lock beside the directory: parallel callers end up sharing one cluster.
pub(crate) fn ensure_shared(
    tools: &Tools,
    state: &Path,
    options: &Options,
) -> Result<PathBuf, TestError> {
    let _lock = lock(state)?;
    if healthy(state) {
        return Ok(state.join("kubeconfig"));
    }
    if state.exists() {
        stop_all(state, &mut BTreeMap::new());
        remove_dir(state)?;
    }
    up_retrying(tools, state, options, Lifetime::Detached)?;
    Ok(state.join("kubeconfig"))
}

/// Stops the cluster in `state`, with whatever joined it, and removes the directory. `false` when
/// there was none.
pub(crate) fn down(state: &Path) -> Result<bool, TestError> {
    let _lock = lock(state)?;
    if !state.exists() {
        return Ok(false);
    }
    stop_all(state, &mut BTreeMap::new());
    remove_dir(state)?;
    Ok(true)
}

/// The components of the cluster in `state` with their PID while they run.
pub(crate) fn status(state: &Path) -> Vec<(Component, Option<u32>)> {
    started_components(state)
        .into_iter()
        .map(|c| {
            let pid = process::alive(state, c.name())
                .then(|| process::recorded_pid(state, c.name()))
                .flatten();
            (c, pid)
        })
        .collect()
}

/// Whether `component` was started in `state`.
pub(crate) fn runs(state: &Path, component: Component) -> bool {
    started_components(state).contains(&component)
}

/// Restarts `component` of the detached cluster in `state`.
pub(crate) fn restart_detached(state: &Path, component: Component) -> Result<(), TestError> {
    restart(state, component, Lifetime::Detached, &mut BTreeMap::new())
}

fn lock(state: &Path) -> Result<File, TestError> {
    if let Some(parent) = state.parent() {
        std::fs::create_dir_all(parent).map_err(|e| harness("creating a directory", e))?;
    }
    let mut name = state.as_os_str().to_owned();
    name.push(".lock");
    let file = File::create(&name).map_err(|e| harness("creating the cluster's lock", e))?;
    file.lock()
        .map_err(|e| harness("taking the cluster's lock", e))?;
    Ok(file)
}

fn remove_dir(dir: &Path) -> Result<(), TestError> {
    std::fs::remove_dir_all(dir).map_err(|e| harness(&format!("removing {}", dir.display()), e))
}

/// Whether every component recorded in `state` runs and the kubeconfig is there.
fn healthy(state: &Path) -> bool {
    let components = started_components(state);
    !components.is_empty()
        && state.join("kubeconfig").is_file()
        && components.iter().all(|c| process::alive(state, c.name()))
}

/// The components `up` started in `state` (written before the first of them).
fn started_components(state: &Path) -> Vec<Component> {
    std::fs::read_to_string(state.join("components"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// [`up`], begun again (with new ports) when a component could not bind its port: a port chosen
/// free can be taken before the component binds it, by another cluster starting at the same time
/// or as a client's ephemeral port. Any other failure ends at once.
fn up_retrying(
    tools: &Tools,
    state: &Path,
    options: &Options,
    lifetime: Lifetime,
) -> Result<BTreeMap<Component, Child>, TestError> {
    let mut attempt = 1;
    loop {
        let mut children = BTreeMap::new();
        match up(tools, state, options, lifetime, &mut children) {
            Ok(()) => return Ok(children),
            Err(e) => {
                let port_taken = Component::ALL.iter().any(|c| {
                    std::fs::read_to_string(process::log_path(state, c.name()))
                        .is_ok_and(|log| log.contains("address already in use"))
                });
                stop_all(state, &mut children);
                if !port_taken || attempt == START_ATTEMPTS {
                    return Err(e);
                }
                tracing::info!(
                    attempt,
                    "a port was taken before its component bound it; starting again"
                );
                attempt += 1;
            }
        }
    }
}

/// Which components run, given the binaries and the options.
fn components(tools: &Tools, options: &Options) -> Result<Vec<Component>, TestError> {
    for c in [Component::Etcd, Component::KubeApiserver] {
        if !tools.has(c.name()) {
            return Err(TestError::Harness(format!(
                "{} has no {c}: point KUBEBUILDER_ASSETS at a directory holding etcd and \
                 kube-apiserver (setup-envtest use -p path)",
                tools.bin.display()
            )));
        }
    }
    let rest = [
        Component::KubeControllerManager,
        Component::KubeScheduler,
        Component::Kwok,
    ];
    let whole = !options.api_only
        && rest.iter().all(|c| tools.has(c.name()))
        && tools.kwok_node_stages.is_some();
    if options.nodes > 0 && !whole {
        return Err(TestError::Harness(format!(
            "{} simulated nodes need kube-controller-manager, kube-scheduler, kwok and KWOK's \
             node stages beside etcd and kube-apiserver in {}",
            options.nodes,
            tools.bin.display()
        )));
    }
    let mut all = vec![Component::Etcd, Component::KubeApiserver];
    if whole {
        all.extend(rest);
    }
    Ok(all)
}

/// The ports of a cluster.
struct Ports {
    etcd: u16,
    etcd_peer: u16,
    api: u16,
    kcm: u16,
    scheduler: u16,
    kwok: u16,
}

impl Ports {
    fn pick() -> Result<Self, TestError> {
        Ok(Self {
            etcd: free_port()?,
            etcd_peer: free_port()?,
            api: free_port()?,
            kcm: free_port()?,
            scheduler: free_port()?,
            kwok: free_port()?,
        })
    }

    /// The port `component` listens on.
    fn of(&self, component: Component) -> u16 {
        match component {
            Component::Etcd => self.etcd,
            Component::KubeApiserver => self.api,
            Component::KubeControllerManager => self.kcm,
            Component::KubeScheduler => self.scheduler,
            Component::Kwok => self.kwok,
        }
    }
}

/// Writes the state, starts every component and waits until the cluster is usable.
fn up(
    tools: &Tools,
    state: &Path,
    options: &Options,
    lifetime: Lifetime,
    children: &mut BTreeMap<Component, Child>,
) -> Result<(), TestError> {
    let components = components(tools, options)?;
    for sub in ["logs", "pids"] {
        let dir = state.join(sub);
        if dir.exists() {
            remove_dir(&dir)?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| harness("creating the state directory", e))?;
    }
    let ports = Ports::pick()?;
    pki::write_pki(state)?;
    pki::write_kubeconfig(state, ports.api)?;
    let write = |file: &str, text: String| {
        std::fs::write(state.join(file), text).map_err(|e| harness("writing the state", e))
    };
    write(
        "components",
        components.iter().map(|c| format!("{c}\n")).collect(),
    )?;
    let etcd_data = etcd_data_dir(state);
    write("etcd-data", etcd_data.display().to_string())?;
    if components.contains(&Component::Kwok) {
        write("kwok-stages.yaml", kwok_stages(tools, options)?)?;
    }
    let started = Instant::now();
    for &component in &components {
        let mut args = flags(component, state, &ports, &etcd_data);
        args.extend(options.args.get(&component).into_iter().flatten().cloned());
        let child = process::start(
            state,
            component.name(),
            &tools.binary(component.name()),
            &args,
            lifetime,
        )?;
        if let Some(child) = child {
            children.insert(component, child);
        }
        // etcd is ready when the API server is: its readiness covers its storage.
        match component {
            Component::Etcd => {}
            Component::KubeApiserver => {
                on_thread(wait_api_ready(state, children))?;
            }
            other => wait_port(state, other, ports.of(other), children)?,
        }
        tracing::debug!(%component, elapsed = ?started.elapsed(), "ready");
    }
    on_thread(settle(state, options.nodes, &components, children))
}

/// The flags of `component`.
fn flags(component: Component, state: &Path, ports: &Ports, etcd_data: &Path) -> Vec<String> {
    let pki = |f: &str| pki::file(state, f);
    let kubeconfig = state.join("kubeconfig").display().to_string();
    let clients = || {
        vec![
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--bind-address=127.0.0.1".into(),
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics".into(),
            "--leader-elect=false".into(),
        ]
    };
    match component {
        Component::Etcd => {
            let (client, peer) = (ports.etcd, ports.etcd_peer);
            vec![
                "--name=test".into(),
                format!("--data-dir={}", etcd_data.display()),
                format!("--listen-client-urls=http://127.0.0.1:{client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster=test=http://127.0.0.1:{peer}"),
                "--unsafe-no-fsync=true".into(),
                "--quota-backend-bytes=1073741824".into(),
                "--log-level=warn".into(),
            ]
        }
        Component::KubeApiserver => vec![
            format!("--etcd-servers=http://127.0.0.1:{}", ports.etcd),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", ports.api),
            format!("--tls-cert-file={}", pki("serving.crt")),
            format!("--tls-private-key-file={}", pki("serving.key")),
            format!("--client-ca-file={}", pki("ca.crt")),
            "--authorization-mode=Node,RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", pki("sa.pub")),
            format!("--service-account-signing-key-file={}", pki("sa.key")),
            format!("--service-cluster-ip-range={}", pki::SERVICE_RANGE),
            "--allow-privileged=false".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ],
        Component::KubeControllerManager => {
            let mut args = clients();
            args.extend([
                format!("--secure-port={}", ports.kcm),
                format!("--root-ca-file={}", pki("ca.crt")),
                format!("--service-account-private-key-file={}", pki("sa.key")),
                "--use-service-account-credentials=false".into(),
                "--node-monitor-period=5s".into(),
                "--node-monitor-grace-period=40s".into(),
                "--v=1".into(),
            ]);
            args
        }
        Component::KubeScheduler => {
            let mut args = clients();
            args.push(format!("--secure-port={}", ports.scheduler));
            args
        }
        Component::Kwok => vec![
            format!("--kubeconfig={kubeconfig}"),
            "--manage-all-nodes=false".into(),
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
            "--node-lease-duration-seconds=40".into(),
            "--cidr=10.244.0.0/16".into(),
            "--node-ip=127.0.0.1".into(),
            format!("--server-address=127.0.0.1:{}", ports.kwok),
            format!("--config={}", state.join("kwok-stages.yaml").display()),
        ],
    }
}

/// etcd's data directory: on tmpfs where there is one (much faster than a disk), else in `state`.
fn etcd_data_dir(state: &Path) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        // Unique among running processes (the PID) and within this one (the suffix's counter).
        shm.join(format!(
            "kube-plan-etcd-{}-{}",
            std::process::id(),
            super::unique_suffix()
        ))
    } else {
        state.join("etcd")
    }
}

/// KWOK's configuration: its own node stages (initialisation, heartbeats with leases) and the
/// Pod stages.
fn kwok_stages(tools: &Tools, options: &Options) -> Result<String, TestError> {
    let nodes = tools
        .kwok_node_stages
        .as_deref()
        .ok_or_else(|| TestError::Harness("KWOK's node stages are missing".into()))?;
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| harness(&format!("reading {}", p.display()), e))
    };
    let pods = match &options.pod_stages {
        Some(path) => read(path)?,
        None => DEFAULT_POD_STAGES.to_owned(),
    };
    Ok([
        read(&nodes.join("fast/node-initialize.yaml"))?,
        read(&nodes.join("heartbeat-with-lease/node-heartbeat-with-lease.yaml"))?,
        pods,
    ]
    .join("\n---\n"))
}

/// A start-up failure of `component`: `what` went wrong, and the end of its log.
fn failed(state: &Path, component: Component, what: &str) -> TestError {
    TestError::Harness(format!(
        "{what}; {component}'s log ends:\n{}",
        process::log_tail(state, component.name(), 20)
    ))
}

/// An error if `component` has exited, with the end of its log.
fn check_running(
    state: &Path,
    component: Component,
    children: &mut BTreeMap<Component, Child>,
) -> Result<(), TestError> {
    let exited = match children.get_mut(&component) {
        Some(child) => child
            .try_wait()
            .ok()
            .flatten()
            .map(|status| status.to_string()),
        None => (!process::alive(state, component.name())).then(|| "gone".to_owned()),
    };
    match exited {
        None => Ok(()),
        Some(status) => Err(failed(
            state,
            component,
            &format!("{component} exited during start-up ({status})"),
        )),
    }
}

/// Waits until something listens on `port`, or `component` exits.
fn wait_port(
    state: &Path,
    component: Component,
    port: u16,
    children: &mut BTreeMap<Component, Child>,
) -> Result<(), TestError> {
    let deadline = Instant::now() + COMPONENT_WITHIN;
    loop {
        check_running(state, component, children)?;
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(failed(
                state,
                component,
                &format!("{component} did not open port {port} within {COMPONENT_WITHIN:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `fut` to completion on a thread of its own with a runtime of its own: this may be called
/// from inside a test's runtime, which cannot be blocked on.
fn on_thread<F>(fut: F) -> Result<(), TestError>
where
    F: Future<Output = Result<(), TestError>> + Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| harness("starting a runtime", e))?
                    .block_on(fut)
            })
            .join()
            .unwrap_or_else(|_| Err(TestError::Harness("a start-up wait panicked".into())))
    })
}

async fn admin_client(state: &Path) -> Result<kube::Client, TestError> {
    let path = state.join("kubeconfig");
    let kc = kube::config::Kubeconfig::read_from(&path)
        .map_err(|e| harness("reading the kubeconfig", e))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| harness("reading the kubeconfig", e))?;
    kube::Client::try_from(config).map_err(|e| harness("making a client", e))
}

/// Asks `/readyz` every 200 ms until it answers, a started component exits, or
/// [`APISERVER_WITHIN`] passes.
async fn wait_api_ready(
    state: &Path,
    children: &mut BTreeMap<Component, Child>,
) -> Result<(), TestError> {
    let client = admin_client(state).await?;
    let deadline = Instant::now() + APISERVER_WITHIN;
    let mut last = String::from("not asked yet");
    while Instant::now() < deadline {
        for c in [Component::Etcd, Component::KubeApiserver] {
            check_running(state, c, children)?;
        }
        let asked = match http::Request::get("/readyz").body(Vec::new()) {
            Ok(request) => client
                .request_text(request)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match asked {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(failed(
        state,
        Component::KubeApiserver,
        &format!("kube-apiserver not ready within {APISERVER_WITHIN:?}: {last}"),
    ))
}

/// Creates the simulated nodes and waits until they are Ready, and, with a controller manager,
/// until the `default` ServiceAccount exists (Pods cannot be created before it).
async fn settle(
    state: &Path,
    nodes: u32,
    components: &[Component],
    children: &mut BTreeMap<Component, Child>,
) -> Result<(), TestError> {
    let client = admin_client(state).await?;
    if nodes > 0 {
        let api: Api<Node> = Api::all(client.clone());
        for i in 0..nodes {
            let node = simulated_node(&format!("kwok-node-{i}"), &BTreeMap::new());
            match api.create(&PostParams::default(), &node).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(TestError::Api(format!("creating node kwok-node-{i}"), e)),
            }
        }
        // KWOK readies nodes at its own pace: a minute plus 0.1 s a node. One list per poll.
        let within = Duration::from_secs(60) + Duration::from_millis(100) * nodes;
        let deadline = Instant::now() + within;
        let list = ListParams::default().labels("type=kwok");
        loop {
            check_running(state, Component::Kwok, children)?;
            let nodes_ready = match api.list(&list).await {
                Ok(list) => list
                    .items
                    .iter()
                    .filter(|n| super::node_is_ready(n))
                    .count(),
                Err(_) => 0,
            };
            if nodes_ready >= nodes as usize {
                break;
            }
            if Instant::now() > deadline {
                return Err(failed(
                    state,
                    Component::Kwok,
                    &format!("simulated nodes did not become Ready ({nodes_ready} of {nodes})"),
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    if components.contains(&Component::KubeControllerManager) {
        let api: Api<ServiceAccount> = Api::namespaced(client, "default");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(api.get_opt("default").await, Ok(Some(_))) {
            check_running(state, Component::KubeControllerManager, children)?;
            if Instant::now() > deadline {
                return Err(failed(
                    state,
                    Component::KubeControllerManager,
                    "no default ServiceAccount within 30 s",
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Stops `component` and starts it again with its recorded flags; waits until the API server is
/// ready again and the component still runs.
fn restart(
    state: &Path,
    component: Component,
    lifetime: Lifetime,
    children: &mut BTreeMap<Component, Child>,
) -> Result<(), TestError> {
    let name = component.name();
    let args = process::recorded_args(state, name)?;
    let exe = process::recorded_exe(state, name).ok_or_else(|| {
        TestError::Harness(format!("no {component} recorded in {}", state.display()))
    })?;
    process::stop(state, name, children.get_mut(&component));
    children.remove(&component);
    if let Some(child) = process::start(state, name, &exe, &args, lifetime)? {
        children.insert(component, child);
    }
    on_thread(wait_api_ready(state, children))?;
    check_running(state, component, children)
}

/// Stops whatever runs in `state`: first the [`ON_STOP`] hook, then processes that joined the
/// cluster, then the components in reverse start order; removes etcd's data.
fn stop_all(state: &Path, children: &mut BTreeMap<Component, Child>) {
    let hook = state.join(ON_STOP);
    if hook.is_file() {
        match std::process::Command::new(&hook)
            .env("KUBE_PLAN_CLUSTER_STATE", state)
            .status()
        {
            Ok(status) if status.success() => {}
            Ok(status) => {
                tracing::warn!(hook = %hook.display(), %status, "the on-stop hook failed")
            }
            Err(e) => {
                tracing::warn!(hook = %hook.display(), error = %e, "the on-stop hook did not run")
            }
        }
    }
    for joined in process::recorded_names(state) {
        if joined.parse::<Component>().is_err() {
            process::stop(state, &joined, None);
        }
    }
    for component in Component::ALL.into_iter().rev() {
        process::stop(state, component.name(), children.get_mut(&component));
    }
    children.clear();
    if let Ok(data) = std::fs::read_to_string(state.join("etcd-data")) {
        remove_etcd_data(Path::new(data.trim()));
    }
}

/// Removes etcd's data directory, if it is one of ours (on tmpfs, or inside a state directory).
fn remove_etcd_data(data: &Path) {
    let ours = data
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("kube-plan-etcd-") || n == "etcd");
    if ours && data.exists() {
        let _ = std::fs::remove_dir_all(data);
    }
}

/// Removes the directories (and etcd data) of private control planes whose process has ended: a
/// process that ends without dropping its cluster (a `static`, a test binary that exits) has its
/// processes killed by the parent-death signal, but its files would stay behind. A directory
/// without an owner file, or whose owner runs, is left alone.
pub(crate) fn remove_stale_dirs() {
    let proc = Path::new("/proc");
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    if !proc.is_dir() {
        return;
    }
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let owner = std::fs::read_to_string(entry.path().join(OWNER_FILE))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        if let Some(pid) = owner
            && !proc.join(pid.to_string()).exists()
        {
            if let Ok(data) = std::fs::read_to_string(entry.path().join("etcd-data")) {
                remove_etcd_data(Path::new(data.trim()));
            }
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::debug!(dir = %entry.path().display(), error = %e, "could not remove a stale control plane's directory");
            }
        }
    }
}

fn free_port() -> Result<u16, TestError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| harness("finding a free port", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn smoke_stale_control_plane_directories_are_removed_and_live_ones_kept() {
        let make = |owner: Option<u32>| {
            let dir = tempfile::Builder::new()
                .prefix(DIR_PREFIX)
                .tempdir()
                .unwrap()
                .keep();
            if let Some(pid) = owner {
                std::fs::write(dir.join(OWNER_FILE), pid.to_string()).unwrap();
            }
            dir
        };
        // A process that has ended: its PID names no process any more.
        let mut ended = Command::new("true").spawn().unwrap();
        ended.wait().unwrap();
        let stale = make(Some(ended.id()));
        let live = make(Some(std::process::id()));
        let unowned = make(None);
        remove_stale_dirs();
        assert!(!stale.exists(), "the ended process's directory went");
        assert!(live.exists() && unowned.exists(), "the others stay");
        for dir in [live, unowned] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn smoke_components_are_named_as_their_binaries() {
        for c in Component::ALL {
            assert_eq!(c.name().parse::<Component>().unwrap(), c);
        }
        let err = "kubelet".parse::<Component>().unwrap_err().to_string();
        assert!(err.contains("kube-apiserver"), "{err}");
    }
}
