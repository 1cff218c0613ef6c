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
    assets_with(&["etcd", "kube-apiserver", "kubectl"])
}

/// A temporary directory holding copies of the named binaries of the harness's tool cache.
fn assets_with(binaries: &[&str]) -> tempfile::TempDir {
    let repo = e2e::repo();
    let out = Command::new("bash")
        .arg(repo.join("framework/tools/tools.sh"))
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
    for b in binaries {
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
    // No KWOK here: asking for simulated nodes is an error at once, not a wait for a Ready that
    // never comes.
    let nodes = cluster
        .add_nodes(&client, "envtest-node", 1, &Default::default())
        .await;
    let error = nodes
        .map(|_| ())
        .expect_err("no simulated nodes without KWOK");
    assert!(error.to_string().contains("KWOK"), "{error}");
    drop(ns);
    drop(client);
    drop(cluster);
    // Dropped: both processes are gone and so is the directory.
    assert!(!answers(port), "kube-apiserver still answers");
    assert!(!kubeconfig.exists(), "the cluster's directory is left");
}

#[tokio::test]
async fn framework_test_cluster_from_a_whole_assets_directory_runs_pods_on_simulated_nodes() {
    use k8s_openapi::api::core::v1::{Node, Pod};
    // The envtest binaries plus the rest of a cluster, and KWOK's node stages beside them: nothing
    // else is needed for simulated nodes either.
    let assets = assets_with(&[
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
    ]);
    let cache = e2e::tools_cache().join("kwok-node-stages");
    for file in [
        "fast/node-initialize.yaml",
        "heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    ] {
        let to = assets.path().join("kwok-node-stages").join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(cache.join(file), &to).unwrap();
    }
    let cluster = TestCluster::builder()
        .assets(assets.path())
        .nodes(2)
        .start()
        .unwrap();
    let state = cluster.state_dir().unwrap().to_owned();
    let pids = e2e::recorded_pids(&state);
    let client = cluster.client().await.unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    assert_eq!(
        nodes.list(&Default::default()).await.unwrap().items.len(),
        2
    );
    let ns = cluster.namespace(&client, "whole").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "once"},
        "spec": {
            "nodeName": "kwok-node-1",
            "restartPolicy": "Never",
            "containers": [{"name": "c", "image": "example.test/once:1"}],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    e2e::pod_in_phase(
        &pods,
        "once",
        "Succeeded",
        std::time::Duration::from_secs(60),
    )
    .await
    .unwrap();
    drop(ns);
    drop(client);
    drop(cluster);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} outlived its cluster"
        );
    }
    assert!(!state.exists(), "the cluster's directory is left");
}

/// A second test file for the consumer crate, beside the tutorial's: a shared cluster is a static
/// that is never dropped, and its processes must still end with the test process.
const SHARED_TEST: &str = r#"
use kube_plan::testing::TestCluster;

#[tokio::test]
async fn shared_cluster_serves_and_is_never_dropped() {
    kube_plan::install_crypto_provider();
    let cluster = TestCluster::shared().expect("control plane");
    let client = cluster.client().await.unwrap();
    let ns = cluster.namespace(&client, "shared").await.unwrap();
    assert!(!ns.name().is_empty());
}
"#;

/// A third test file, run with nothing set at all: the crate builds (or finds in its cache) the
/// binaries of a whole cluster, and a test gets simulated nodes.
const NODES_TEST: &str = r#"
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube_plan::testing::TestCluster;

#[tokio::test]
async fn a_private_cluster_has_ready_simulated_nodes() {
    kube_plan::install_crypto_provider();
    let cluster = TestCluster::start(2).expect("a whole cluster from the crate's own tools");
    let client = cluster.client().await.unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    let nodes = cluster
        .add_nodes(&client, "extra", 1, &Default::default())
        .await
        .expect("KWOK readies an added node");
    assert_eq!(nodes.names(), ["extra-0"]);
}
"#;

/// The files of the tutorial in docs/framework.md: each fenced block whose info string names a
/// file (```rust file=src/lib.rs), blocks for the same file joined in order.
fn tutorial_files(markdown: &str) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = Vec::new();
    let mut current: Option<usize> = None;
    for line in markdown.lines() {
        match current {
            Some(i) if line.trim_end() == "```" => {
                files[i].1.push('\n');
                current = None;
            }
            Some(i) => {
                files[i].1.push_str(line);
                files[i].1.push('\n');
            }
            None => {
                let Some(name) = line.strip_prefix("```").and_then(|info| {
                    info.split_whitespace()
                        .find_map(|w| w.strip_prefix("file="))
                }) else {
                    continue;
                };
                current = Some(match files.iter().position(|(f, _)| f == name) {
                    Some(i) => i,
                    None => {
                        files.push((name.to_owned(), String::new()));
                        files.len() - 1
                    }
                });
            }
        }
    }
    files
}

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
    // The tutorial's files, as a newcomer would write them; only the kube-plan dependency is
    // pointed at this checkout instead of the registry.
    let markdown = std::fs::read_to_string(repo.join("docs/framework.md")).unwrap();
    let files = tutorial_files(&markdown);
    let names: Vec<&str> = files.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        names,
        [
            "Cargo.toml",
            "src/lib.rs",
            "src/main.rs",
            "tests/greeting.rs"
        ],
        "the tutorial's files"
    );
    let path = format!("path = \"{}\"", framework.display());
    for (name, text) in &files {
        let text = match name.as_str() {
            "Cargo.toml" => {
                let local = text
                    .replace("kube-plan = \"0.1\"", &format!("kube-plan = {{ {path} }}"))
                    .replace(
                        "kube-plan = { version = \"0.1\",",
                        &format!("kube-plan = {{ {path},"),
                    );
                assert_eq!(
                    local.matches(&path).count(),
                    2,
                    "both kube-plan lines rewritten: {local}"
                );
                local
            }
            _ => text.clone(),
        };
        let file = dir.join(name);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    }
    std::fs::write(dir.join("tests/shared.rs"), SHARED_TEST).unwrap();
    std::fs::write(dir.join("tests/nodes.rs"), NODES_TEST).unwrap();
    // The workspace's lock file pins the versions this repository builds with, so the consumer
    // resolves offline from the local registry cache.
    std::fs::copy(repo.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();

    // Its own target directory under this workspace's (a nested cargo must not wait on the lock
    // of the one running this test), kept between runs.
    let target = e2e::target_dir().join("out-of-tree");
    let cargo_test = |tests: &[&str]| {
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(["test", "--offline"])
            .args(tests.iter().flat_map(|t| ["--test", t]))
            .args(["--", "--nocapture"])
            .current_dir(dir)
            .env("CARGO_TARGET_DIR", &target)
            // No debug information: the build is only run, never debugged, and full debug
            // information costs about 1.5 GB of a disk this machine shares.
            .env("CARGO_PROFILE_DEV_DEBUG", "false")
            // Nothing of this repository's: no cluster, no directory of binaries.
            .env_remove("KUBECONFIG")
            .env_remove("KUBEBUILDER_ASSETS")
            .env_remove("KUBE_PLAN_TOOLS")
            .env_remove("KUBE_PLAN_CLUSTER_STATE")
            .env_remove("RUSTFLAGS");
        cmd
    };
    let out = cargo_test(&["greeting", "shared"])
        .env("KUBEBUILDER_ASSETS", assets.path())
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
    // With nothing set, the crate's own tools give a whole cluster with simulated nodes.
    let out = cargo_test(&["nodes"])
        .output()
        .expect("running cargo test in the consumer crate");
    let nodes_out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the consumer's node test failed\n--- stdout\n{nodes_out}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        nodes_out.contains("test a_private_cluster_has_ready_simulated_nodes ... ok"),
        "{nodes_out}"
    );
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
