//! The framework as a team outside this repository meets it: a control plane from a directory of
//! binaries (`KUBEBUILDER_ASSETS`, as Go's envtest), and a crate of its own that depends on
//! `kube-plan` by path and tests its operator with nothing from this repository's scripts.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::PostParams;
use kube_plan::testing::TestCluster;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory laid out as `setup-envtest` leaves one: etcd, kube-apiserver and kubectl, copied
/// from the harness's tool cache (built there once per machine).
fn envtest_assets() -> tempfile::TempDir {
    let repo = e2e::repo();
    let out = Command::new("bash")
        .arg(repo.join("tests/harness/tools.sh"))
        .arg("ensure")
        .output()
        .expect("running tools.sh");
    assert!(
        out.status.success(),
        "tools.sh ensure: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bin = PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("tools.sh printed its bin directory"),
    );
    let assets = tempfile::Builder::new()
        .prefix("envtest-assets-")
        .tempdir()
        .unwrap();
    for b in ["etcd", "kube-apiserver", "kubectl"] {
        std::fs::copy(bin.join(b), assets.path().join(b)).unwrap();
    }
    assets
}

/// The API server's port in `kubeconfig`.
fn api_port(kubeconfig: &Path) -> u16 {
    let text = std::fs::read_to_string(kubeconfig).unwrap();
    text.split("https://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no port in {text}"))
}

/// Whether something listens on loopback `port`.
fn answers(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[tokio::test]
async fn framework_test_cluster_starts_from_kubebuilder_assets_and_leaves_nothing_behind() {
    let assets = envtest_assets();
    let cluster = TestCluster::from_assets(assets.path()).unwrap();
    let kubeconfig = cluster.kubeconfig().to_owned();
    let port = api_port(&kubeconfig);
    let client = cluster.client().await.unwrap();
    let ns = cluster.namespace(&client, "envtest").await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("written".into());
    api.create(&PostParams::default(), &cm).await.unwrap();
    assert!(api.get_opt("written").await.unwrap().is_some());
    assert!(answers(port));
    drop(ns);
    drop(client);
    drop(cluster);
    // Dropped: both processes are gone and so is the directory.
    assert!(!answers(port), "kube-apiserver still answers");
    assert!(!kubeconfig.exists(), "the cluster's directory is left");
}

/// The consumer crate: a CRD, a reconciler that writes a ConfigMap and a Ready condition, and a
/// test on a `TestCluster`.
const CONSUMER_LIB: &str = r#"
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, ResourceExt};
use kube_plan::conditions::{self, Cond};
use kube_plan::{Child, Context, Plan, PrinterColumns, Reconciler, Status};
use serde::{Deserialize, Serialize};

/// A greeting to keep in a ConfigMap.
#[derive(CustomResource, PrinterColumns, Serialize, Deserialize, Clone, Debug, Default, schemars::JsonSchema)]
#[kube(group = "greetings.example.org", version = "v1", kind = "Greeting", namespaced, status = "GreetingStatus")]
pub struct GreetingSpec {
    #[column]
    pub text: String,
}

#[derive(Status, PrinterColumns, Serialize, Deserialize, Clone, Debug, Default, schemars::JsonSchema)]
pub struct GreetingStatus {
    #[status(conditions)]
    #[column(name = "Ready", condition = "Ready", field = "status")]
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

pub struct Greeter;

impl Reconciler for Greeter {
    type Resource = Greeting;
    type Error = kube_plan::children::ChildError;

    async fn reconcile(&self, g: &Greeting, ctx: &Context) -> Result<Plan<Greeting>, Self::Error> {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(g.name_any());
        cm.metadata.namespace = g.namespace();
        cm.data = Some([("text".to_owned(), g.spec.text.clone())].into());
        let written = ctx.owned::<ConfigMap>().iter().any(|c| {
            c.data.as_ref().and_then(|d| d.get("text")) == Some(&g.spec.text)
        });
        let mut status = g.status.clone().unwrap_or_default();
        conditions::set(
            &mut status.conditions,
            Cond::ready(written, if written { "Written" } else { "Writing" }, "the ConfigMap holds the text"),
            g.metadata.generation,
            ctx.now(),
        );
        Ok(Plan::new().child(Child::new(&cm)?).status(status))
    }
}
"#;

const CONSUMER_TEST: &str = r#"
use consumer::{Greeter, Greeting, GreetingSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube_plan::testing::{TestCluster, eventually};
use kube_plan::{Controller, Operator};
use std::time::Duration;

#[tokio::test]
async fn greeting_is_written_and_ready() {
    kube_plan::install_crypto_provider();
    // KUBEBUILDER_ASSETS names the binaries, as for Go's envtest.
    let cluster = TestCluster::start(0).expect("control plane");
    let client = cluster.client().await.unwrap();
    let ns = cluster.namespace(&client, "greet").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = Operator::new("greeter", client.clone())
        .install_crds(vec![kube_plan::crd::build::<Greeting>()])
        .controller(Controller::new("greeting", Greeter).owns::<ConfigMap>());
    let running = tokio::spawn(operator.run_until(async { let _ = stopped.await; }));

    let greetings: Api<Greeting> = Api::namespaced(client.clone(), ns.name());
    let hello = Greeting::new("hello", GreetingSpec { text: "hello, world".into() });
    eventually(Duration::from_secs(30), "Greeting created", || async {
        greetings.create(&PostParams::default(), &hello).await.map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(30), "Greeting Ready", || async {
        let g = greetings.get("hello").await.map_err(|e| e.to_string())?;
        let ready = g.status.iter().flat_map(|s| &s.conditions)
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready { Ok(()) } else { Err(format!("{:?}", g.status)) }
    })
    .await
    .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let cm = cms.get("hello").await.unwrap();
    assert_eq!(cm.data.unwrap()["text"], "hello, world");
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    println!("consumer: Greeting reconciled on a control plane from KUBEBUILDER_ASSETS");
}

#[tokio::test]
async fn shared_cluster_serves_and_is_never_dropped() {
    // A static, never dropped: its processes must still end with this test process.
    let cluster = TestCluster::shared().expect("control plane");
    let client = cluster.client().await.unwrap();
    let ns = cluster.namespace(&client, "shared").await.unwrap();
    assert!(!ns.name().is_empty());
}
"#;

#[test]
fn framework_out_of_tree_crate_tests_its_operator_with_kube_plan_alone() {
    let repo = e2e::repo();
    let assets = envtest_assets();
    let krate = tempfile::Builder::new()
        .prefix("kube-plan-consumer-")
        .tempdir()
        .unwrap();
    let dir = krate.path();
    let framework = repo.join("framework");
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            r#"[package]
name = "consumer"
version = "0.1.0"
edition = "2024"
publish = false

[dependencies]
kube-plan = {{ path = "{}" }}
kube = {{ version = "5", default-features = false, features = ["client", "rustls-tls", "ring", "runtime", "derive"] }}
k8s-openapi = {{ version = "0.29", default-features = false, features = ["std", "schemars", "v1_37"] }}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"
schemars = "1"

[dev-dependencies]
kube-plan = {{ path = "{}", features = ["testing"] }}
tokio = {{ version = "1", features = ["macros", "rt-multi-thread"] }}
"#,
            framework.display(),
            framework.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::create_dir_all(dir.join("tests")).unwrap();
    std::fs::write(dir.join("src/lib.rs"), CONSUMER_LIB).unwrap();
    std::fs::write(dir.join("tests/greeting.rs"), CONSUMER_TEST).unwrap();
    // The workspace's lock file pins the versions this repository builds with, so the consumer
    // resolves offline from the local registry cache.
    std::fs::copy(repo.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();

    // Its own target directory under this workspace's (a nested cargo must not wait on the lock
    // of the one running this test), kept between runs.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target"))
        .join("out-of-tree");
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["test", "--offline", "--", "--nocapture"])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", &target)
        .env("KUBEBUILDER_ASSETS", assets.path())
        // Nothing of this repository's: no harness script, no shared cluster.
        .env_remove("KUBECONFIG")
        .env_remove("FRAMEWORK_TEST_HARNESS")
        .env_remove("RUSTFLAGS")
        .output()
        .expect("running cargo test in the consumer crate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the consumer's tests failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(
        stdout.contains("test greeting_is_written_and_ready ... ok"),
        "{stdout}"
    );
    assert!(
        stdout.contains("test shared_cluster_serves_and_is_never_dropped ... ok"),
        "{stdout}"
    );
    for line in stdout.lines().filter(|l| l.starts_with("test result")) {
        println!("consumer crate: {line}");
    }
    // The consumer's test process has exited: nothing it started may still run, the shared
    // cluster's etcd and kube-apiserver included.
    // The kernel delivers the parent-death signal as the process ends: wait for it, with a deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = running_from(assets.path());
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running from the assets: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The processes whose executable lies in `dir`.
fn running_from(dir: &Path) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path().join("exe")).ok())
        .filter(|exe| exe.starts_with(dir))
        .map(|exe| exe.display().to_string())
        .collect()
}
