//! Warm before schedule: a node that joins with the warm-up taint takes no workload until Drop has
//! cached its images there, and loses the taint at the deadline when they cannot be pulled.
//! Each test uses its own taint key: every test's operator watches every Node.

use drop::api::{CachedImage, CachedImageSpec, PolicyReference, PullPolicy, PullPolicySpec};
use e2e::{DropUnderTest, PodRecorder, changes, cluster, wait_until};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, NodeSpec, Pod, Taint};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use kube_plan::testing::{TestCluster, TestNamespace, TestNodes, eventually, simulated_node};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const POOL: &str = "e2e.drop/pool";

struct Warming {
    client: Client,
    ns: TestNamespace,
    drop: DropUnderTest,
    taint: String,
    recorder: PodRecorder,
}

impl Warming {
    async fn start(cluster: &TestCluster, client: Client, id: &str, deadline: Duration) -> Self {
        let ns = cluster.namespace(&client, id).await.unwrap();
        let taint = format!("drop.corewire.io/warming-{id}");
        let warmup = drop::warmup::Warmup {
            taint: taint.clone(),
            deadline,
        };
        let recorder = PodRecorder::start(&client, ns.name());
        let drop = DropUnderTest::start_with(&client, ns.name(), ns.name(), |s| {
            s.warmup = Some(warmup);
        })
        .await;
        Self {
            client,
            ns,
            drop,
            taint,
            recorder,
        }
    }

    fn pool(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(POOL.to_owned(), self.ns.name().to_owned())])
    }

    /// Images `refs` under one eager policy, on this test's pool.
    async fn images(&self, refs: &[(&str, &str)]) -> Vec<String> {
        let policy = format!("{}-eager", self.ns.name());
        self.drop
            .create(
                &Api::<PullPolicy>::all(self.client.clone()),
                PullPolicy::new(
                    &policy,
                    PullPolicySpec {
                        max_concurrent_nodes: 4,
                        min_delay_between_pulls: Some(Duration::ZERO.into()),
                        failure_backoff: Some(drop::api::BackoffConfig {
                            initial: Some(Duration::from_secs(2).into()),
                            max: Some(Duration::from_secs(4).into()),
                        }),
                        ..Default::default()
                    },
                ),
            )
            .await;
        let api: Api<CachedImage> = Api::all(self.client.clone());
        let mut names = Vec::new();
        for (i, (image, tag)) in refs.iter().enumerate() {
            let name = format!("{}-{i}", self.ns.name());
            let spec = CachedImageSpec {
                image: (*image).into(),
                tag: Some((*tag).into()),
                node_selector: self.pool(),
                policy_ref: Some(PolicyReference {
                    name: policy.clone(),
                }),
                ..CachedImageSpec::default()
            };
            self.drop.create(&api, CachedImage::new(&name, spec)).await;
            names.push(name);
        }
        // The node joins after the operator has seen every image: one created in the same instant
        // as a node may reach the operator after it and find the node already released, which is
        // right for that order but not what these tests are about.
        for name in &names {
            wait_until(&api, name, 30, "image reconciled", |i: &CachedImage| {
                i.status
                    .as_ref()
                    .and_then(|s| s.observed_generation)
                    .is_some_and(|g| g >= 1)
            })
            .await;
        }
        names
    }

    /// A node of the pool that joins with the warm-up taint.
    async fn tainted_node(&self, cluster: &TestCluster) -> (TestNodes, String) {
        let name = format!("{}-warm", self.ns.name());
        let mut node = simulated_node(&name, &self.pool());
        node.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: self.taint.clone(),
                value: Some("true".into()),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        let nodes = cluster
            .create_nodes(&self.client, vec![node])
            .await
            .unwrap();
        (nodes, name)
    }

    /// Records when `node` is first seen without the taint (local clock).
    fn watch_release(&self, node: &str) -> Arc<Mutex<Option<Timestamp>>> {
        let released = Arc::new(Mutex::new(None));
        let seen = released.clone();
        let api: Api<Node> = Api::all(self.client.clone());
        let (name, taint) = (node.to_owned(), self.taint.clone());
        tokio::spawn(async move {
            let mut events = std::pin::pin!(changes(api));
            while let Some((n, _)) = events.next().await {
                let tainted = n
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|ts| ts.iter().any(|t| t.key == taint));
                if n.name_any() == name && !tainted {
                    seen.lock().unwrap().get_or_insert_with(Timestamp::now);
                }
            }
        });
        released
    }

    async fn finish(self, nodes: TestNodes) {
        self.drop.stop().await;
        let prefix = self.ns.name().to_owned();
        let images: Api<CachedImage> = Api::all(self.client.clone());
        for ci in images.list(&Default::default()).await.unwrap().items {
            if ci.name_any().starts_with(&prefix) {
                let _ = images
                    .delete(&ci.name_any(), &DeleteParams::default())
                    .await;
            }
        }
        let policies: Api<PullPolicy> = Api::all(self.client.clone());
        let _ = policies
            .delete(&format!("{prefix}-eager"), &DeleteParams::default())
            .await;
        drop(nodes);
    }
}

/// A Pod meeting Pod Security "restricted" that does not tolerate the warm-up taint, for `node`.
fn workload(name: &str, node: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65534,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "job", "image": "docker.io/library/busybox:1.36",
                "securityContext": {"allowPrivilegeEscalation": false,
                                    "capabilities": {"drop": ["ALL"]}}
            }]
        }
    }))
    .unwrap()
}

/// When Node `node` was created (whole seconds).
async fn created_at(client: &Client, node: &str) -> Timestamp {
    let node = Api::<Node>::all(client.clone()).get(node).await.unwrap();
    node.metadata.creation_timestamp.unwrap().0
}

/// The Events recorded on Node `node`: (type, reason, message).
async fn node_events(client: &Client, node: &str) -> Vec<(String, String, String)> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
    api.list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(node)
                && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Node")
        })
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn warmup_tainted_node_takes_no_workload_until_its_images_are_cached() {
    let (cluster, client) = cluster().await.unwrap();
    let w = Warming::start(cluster, client.clone(), "warm-ok", Duration::from_secs(300)).await;
    let images = w
        .images(&[
            ("docker.io/library/alpine", "3.19"),
            ("docker.io/library/nginx", "1.27"),
            ("docker.io/library/redis", "7"),
        ])
        .await;
    let (nodes, node) = w.tainted_node(cluster).await;
    let released = w.watch_release(&node);
    let pods: Api<Pod> = Api::namespaced(client.clone(), w.ns.name());
    pods.create(&PostParams::default(), &workload("job", &node))
        .await
        .unwrap();

    eventually(Duration::from_secs(60), "warm-up taint removed", || async {
        released.lock().unwrap().ok_or("still tainted")
    })
    .await
    .unwrap();
    let released = released.lock().unwrap().unwrap();
    let job = eventually(Duration::from_secs(30), "workload scheduled", || async {
        let p = pods.get("job").await.map_err(|e| e.to_string())?;
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .map(|_| p)
            .ok_or_else(|| "unscheduled".to_owned())
    })
    .await
    .unwrap();
    assert_eq!(job.spec.unwrap().node_name.as_deref(), Some(node.as_str()));

    // Every image was pulled on the node before the taint went.
    let pulls: Vec<_> = w
        .recorder
        .records()
        .into_iter()
        .filter(|r| r.node == node)
        .collect();
    for image in &images {
        let ended = pulls
            .iter()
            .filter(|r| &r.image == image && !r.deleted_early)
            .filter_map(|r| r.ended)
            .min()
            .unwrap_or_else(|| panic!("no pull of {image} ended on {node}: {pulls:?}"));
        assert!(
            ended <= released,
            "{image} was pulled at {ended}, after the taint went at {released}"
        );
    }
    // Until then the scheduler kept the workload off the node: it was bound after the release.
    let scheduled = job
        .status
        .and_then(|s| s.conditions)
        .and_then(|cs| cs.into_iter().find(|c| c.type_ == "PodScheduled"))
        .and_then(|c| c.last_transition_time)
        .map(|t| t.0)
        .expect("PodScheduled condition");
    let created = created_at(&client, &node).await;
    // The API server's times have one-second resolution.
    assert!(
        scheduled.as_second() >= released.as_second() - 1,
        "scheduled at {scheduled}, taint removed at {released}"
    );
    println!(
        "warm-up: {} images cached and the taint removed {:.1}s after the node was created",
        images.len(),
        released.duration_since(created).as_secs_f64()
    );
    let events = node_events(&client, &node).await;
    assert!(
        events
            .iter()
            .any(|(t, r, _)| t == "Normal" && r == drop::warmup::CACHED),
        "{events:?}"
    );
    let _ = pods.delete("job", &DeleteParams::default()).await;
    w.finish(nodes).await;
}

#[tokio::test]
async fn warmup_taint_goes_at_the_deadline_when_the_registry_is_down() {
    let (cluster, client) = cluster().await.unwrap();
    let deadline = Duration::from_secs(20);
    let w = Warming::start(cluster, client.clone(), "warm-late", deadline).await;
    let images = w
        .images(&[
            ("docker.io/library/alpine", "3.19"),
            ("registry.invalid/team/app", "1"),
        ])
        .await;
    let (nodes, node) = w.tainted_node(cluster).await;
    let released = w.watch_release(&node);

    eventually(
        Duration::from_secs(60),
        "warm-up taint removed at the deadline",
        || async { released.lock().unwrap().ok_or("still tainted") },
    )
    .await
    .unwrap();
    let released = released.lock().unwrap().unwrap();
    let created = created_at(&client, &node).await;
    let waited = released.duration_since(created).as_secs_f64();
    println!(
        "warm-up with the registry down: taint removed {waited:.1}s after the node was created (deadline {}s)",
        deadline.as_secs()
    );
    // Creation times are whole seconds (rounded down): the release cannot be earlier than this.
    assert!(
        waited >= deadline.as_secs_f64() - 1.0,
        "removed after {waited:.1}s"
    );
    // The Warning names what was missing; the good image was cached meanwhile.
    let events = eventually(Duration::from_secs(30), "deadline Event", || async {
        let events = node_events(&client, &node).await;
        if events
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == drop::warmup::DEADLINE)
        {
            Ok(events)
        } else {
            Err(format!("{events:?}"))
        }
    })
    .await
    .unwrap();
    let (_, _, note) = events
        .iter()
        .find(|(_, r, _)| r == drop::warmup::DEADLINE)
        .unwrap();
    assert!(note.contains(&images[1]), "{note}");
    assert!(!note.contains(&images[0]), "{note}");
    assert!(
        w.recorder
            .records()
            .iter()
            .any(|r| r.node == node && r.image == images[0] && r.ended.is_some()),
        "the good image was pulled on the node"
    );
    w.finish(nodes).await;
}
