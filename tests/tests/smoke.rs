//! The local control plane itself: simulated kubelet stages, garbage collection, namespace deletion,
//! and the harness's process lifecycle.

use e2e::cluster;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube_plan::testing::{Component, TestCluster, eventually};
use std::path::Path;
use std::time::Duration;

fn pod(name: &str, node: &str, image: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            restart_policy: Some("Never".into()),
            containers: vec![Container {
                name: "c".into(),
                image: Some(image.into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

fn waiting_reason(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .clone()
}

#[tokio::test]
async fn smoke_pod_on_simulated_node_is_pulled_and_completes() {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "smoke-ok").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    pods.create(
        &PostParams::default(),
        &pod("p", "kwok-node-0", "docker.io/library/busybox:1.36"),
    )
    .await
    .unwrap();
    let done = e2e::pod_in_phase(&pods, "p", "Succeeded", Duration::from_secs(30))
        .await
        .unwrap();
    let image_id = done.status.unwrap().container_statuses.unwrap()[0]
        .image_id
        .clone();
    assert!(
        image_id.starts_with("docker.io/library/busybox@sha256:"),
        "imageID should carry a digest: {image_id}"
    );
}

#[tokio::test]
async fn smoke_unresolvable_image_reports_pull_errors() {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "smoke-bad").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    pods.create(
        &PostParams::default(),
        &pod("p", "kwok-node-1", "registry.invalid.local:9999/x:nope"),
    )
    .await
    .unwrap();
    let seen = std::sync::Mutex::new(Vec::<String>::new());
    eventually(
        Duration::from_secs(30),
        "ErrImagePull then ImagePullBackOff",
        || {
            let pods = pods.clone();
            let seen = &seen;
            async move {
                let p = pods.get("p").await.map_err(|e| e.to_string())?;
                let reason = waiting_reason(&p);
                let mut seen = seen.lock().unwrap();
                if let Some(r) = &reason
                    && seen.last() != Some(r)
                {
                    seen.push(r.clone());
                }
                drop(seen);
                let phase = p
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.clone())
                    .unwrap_or_default();
                assert_eq!(phase, "Pending", "a failed pull never runs the pod");
                if reason.as_deref() == Some("ImagePullBackOff") {
                    Ok(())
                } else {
                    Err(format!("{reason:?}"))
                }
            }
        },
    )
    .await
    .unwrap();
    let seen = seen.into_inner().unwrap();
    assert_eq!(
        seen.first().map(String::as_str),
        Some("ErrImagePull"),
        "reasons seen: {seen:?}"
    );
}

#[tokio::test]
async fn smoke_owner_deletion_garbage_collects_dependents() {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "smoke-gc").await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let owner = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("owner".into()),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            },
        )
        .await
        .unwrap();
    let dependent = ConfigMap {
        metadata: ObjectMeta {
            name: Some("dependent".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: "owner".into(),
                uid: owner.metadata.uid.clone().unwrap(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    cms.create(&PostParams::default(), &dependent)
        .await
        .unwrap();
    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    eventually(
        Duration::from_secs(60),
        "dependent garbage-collected",
        || async {
            match cms.get_opt("dependent").await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(_) => Err("still there".to_owned()),
            }
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn smoke_namespace_deletion_completes_with_pods_inside() {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "smoke-ns").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    pods.create(
        &PostParams::default(),
        &pod("p", "kwok-node-2", "docker.io/library/alpine:3.19"),
    )
    .await
    .unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete(ns.name(), &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "namespace gone", || async {
        match namespaces
            .get_opt(ns.name())
            .await
            .map_err(|e| e.to_string())?
        {
            None => Ok(()),
            Some(n) => Err(format!("phase {:?}", n.status.and_then(|s| s.phase))),
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn smoke_down_leaves_no_process_behind() {
    kube_plan::install_crypto_provider();
    let mut private = TestCluster::start(1).unwrap();
    let state = private.state_dir().unwrap().to_path_buf();
    let pids = e2e::recorded_pids(&state);
    assert!(
        pids.iter()
            .all(|p| Path::new(&format!("/proc/{p}")).exists()),
        "all components run"
    );
    let client = private.client().await.unwrap();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
    assert_eq!(
        nodes.list(&Default::default()).await.unwrap().items.len(),
        1
    );
    private.stop().unwrap();
    for p in pids {
        assert!(
            !Path::new(&format!("/proc/{p}")).exists(),
            "process {p} still alive after down"
        );
    }
    assert!(!state.exists(), "state directory removed");
}

#[test]
fn smoke_crashed_component_fails_up_with_its_log_tail() {
    let err = TestCluster::builder()
        .args(Component::KubeApiserver, ["--no-such-flag=1"])
        .start()
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("kube-apiserver exited during start-up"),
        "{text}"
    );
    assert!(
        text.contains("unknown flag: --no-such-flag"),
        "the log tail names the cause: {text}"
    );
}

#[tokio::test]
async fn smoke_a_second_process_reuses_the_running_cluster() {
    let (cluster, _) = cluster().await.unwrap();
    // Another process (a second test binary, a developer's shell) asks for the cluster: it must get
    // the running one at once, not wait on a lock the running components hold.
    let line = e2e::run_ok(
        std::process::Command::new("timeout")
            .arg("30")
            .arg(env!("CARGO_BIN_EXE_cluster"))
            .arg("ensure"),
        "cluster ensure",
    );
    if std::env::var_os("KUBECONFIG").is_none() {
        assert!(
            line.contains(&cluster.kubeconfig().display().to_string()),
            "{line}"
        );
    }
}

#[test]
fn smoke_down_stops_a_joined_process_whose_binary_was_rebuilt() {
    // A process that joined the cluster (the demo's operator), whose binary was rebuilt since: its
    // /proc/PID/exe reads "<path> (deleted)", and `down` must still recognise and stop it.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("operator");
    std::fs::copy("/bin/sleep", &bin).unwrap();
    let mut child = std::process::Command::new(&bin).arg("300").spawn().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("pids")).unwrap();
    std::fs::write(state.join("pids/operator"), child.id().to_string()).unwrap();
    std::fs::write(state.join("pids/operator.exe"), bin.display().to_string()).unwrap();
    let rebuilt = dir.path().join("operator.new");
    std::fs::copy("/bin/sleep", &rebuilt).unwrap();
    std::fs::rename(&rebuilt, &bin).unwrap();
    assert!(TestCluster::down(&state).unwrap(), "there was a cluster");
    let status = child.wait().unwrap();
    assert!(!status.success(), "stopped by a signal, not left running");
}

/// What a real kubelet and containerd leave on the machine while they run.
#[derive(Debug, PartialEq)]
struct MachineTraces {
    processes: Vec<String>,
    mounts: Vec<String>,
    cgroups: Vec<String>,
    netns: Vec<String>,
    bridge: bool,
}

fn machine_traces(state: &Path) -> MachineTraces {
    let state = state.to_string_lossy().into_owned();
    let mut processes = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        let exe = exe.to_string_lossy().into_owned();
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let ours = exe.ends_with("/kubelet")
            || exe.contains("containerd")
            || exe.ends_with("/docker-registry");
        if ours && (cmdline.contains(&state) || exe.contains("containerd-shim")) {
            processes.push(format!("{exe}: {cmdline}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&state) || l.contains("/run/netns/cni-"))
        .map(str::to_owned)
        .collect();
    let cgroups = std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.flatten()
                .map(|h| h.path().join("kubepods"))
                .filter(|p| p.exists())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    let netns = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("cni-"))
                .collect()
        })
        .unwrap_or_default();
    let bridge = Path::new("/sys/class/net/drope2e0").exists();
    MachineTraces {
        processes,
        mounts,
        cgroups,
        netns,
        bridge,
    }
}

fn sysctl(name: &str) -> String {
    std::fs::read_to_string(Path::new("/proc/sys").join(name))
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test]
async fn smoke_real_node_down_leaves_nothing_behind() {
    use e2e::realnode::{self, RealNode};
    let (cluster, client) = cluster().await.unwrap();
    let node = RealNode::ensure(cluster);
    let state = realnode::state_dir(cluster);
    // A Pod running on it, so there is a sandbox, a network namespace and mounts to tear down.
    let ns = cluster.namespace(&client, "smoke-real").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    node.copy_image("busybox:1", &format!("{}/busybox:1", ns.name()))
        .await;
    let mut sleeper = pod(
        "sleeper",
        &node.name,
        &format!("{}/{}/busybox:1", node.registry, ns.name()),
    );
    let spec = sleeper.spec.as_mut().unwrap();
    spec.tolerations = Some(node.placement().1);
    spec.containers[0].command = Some(vec!["/bin/sleep".into(), "3600".into()]);
    pods.create(&PostParams::default(), &sleeper).await.unwrap();
    eventually(Duration::from_secs(60), "sleeper running", || async {
        let p = pods.get("sleeper").await.map_err(|e| e.to_string())?;
        match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
            Some("Running") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
    let running = machine_traces(&state);
    assert!(!running.processes.is_empty() && !running.mounts.is_empty() && running.bridge);
    eprintln!(
        "while up: {} processes, {} mounts, cgroups {:?}, netns {:?}",
        running.processes.len(),
        running.mounts.len(),
        running.cgroups,
        running.netns
    );
    // The sysctls as they were before the kubelet changed them.
    let before: Vec<(String, String)> = std::fs::read_to_string(state.join("sysctl.orig"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert!(!before.is_empty());

    realnode::down(cluster);

    assert_eq!(
        machine_traces(&state),
        MachineTraces {
            processes: vec![],
            mounts: vec![],
            cgroups: vec![],
            netns: vec![],
            bridge: false,
        }
    );
    for (name, value) in before {
        assert_eq!(sysctl(&name), value, "{name} restored");
    }
    assert!(!state.exists(), "state directory removed");
}
