//! Drop's CachedImage controller on the local control plane, with KWOK playing the kubelet.
//! Every test runs its own Drop (selecting only its objects), on its own nodes and namespace.

use drop::api::{
    CachedImage, CachedImagePhase, CachedImageSpec, PolicyReference, PullPolicy, PullPolicySpec,
};
use e2e::{DropUnderTest, PodRecorder, cluster};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{LocalObjectReference, Node, Pod, Taint, Toleration};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use kube_plan::testing::{TestCluster, eventually};
use std::collections::BTreeMap;
use std::time::Duration;

const POOL: &str = "e2e.drop/pool";

struct Scene {
    client: Client,
    drop: DropUnderTest,
    ns: kube_plan::testing::TestNamespace,
    nodes: kube_plan::testing::TestNodes,
    images: Api<CachedImage>,
    pods: Api<Pod>,
    recorder: PodRecorder,
}

/// A test's world: `n` nodes in its own pool, its namespace, and Drop running for it.
async fn scene(id: &str, n: usize) -> Scene {
    let (cluster, client) = cluster().await.unwrap();
    scene_in(cluster, client, id, n).await
}

async fn scene_in(cluster: &TestCluster, client: Client, id: &str, n: usize) -> Scene {
    let ns = cluster.namespace(&client, id).await.unwrap();
    let pool = BTreeMap::from([(POOL.to_owned(), ns.name().to_owned())]);
    let nodes = cluster
        .add_nodes(&client, ns.name(), n, &pool)
        .await
        .unwrap();
    let recorder = PodRecorder::start(&client, ns.name());
    let drop = DropUnderTest::start(&client, ns.name(), ns.name()).await;
    Scene {
        images: Api::all(client.clone()),
        pods: Api::namespaced(client.clone(), ns.name()),
        client,
        drop,
        ns,
        nodes,
        recorder,
    }
}

impl Scene {
    fn pool(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(POOL.to_owned(), self.ns.name().to_owned())])
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.ns.name())
    }

    fn image_spec(&self, image: &str, tag: &str) -> CachedImageSpec {
        CachedImageSpec {
            image: image.into(),
            tag: Some(tag.into()),
            node_selector: self.pool(),
            ..CachedImageSpec::default()
        }
    }

    /// The spec of `image:1` on this test's nodes under PullPolicy `policy`.
    fn image_under(&self, image: &str, policy: &str) -> CachedImageSpec {
        CachedImageSpec {
            policy_ref: Some(PolicyReference {
                name: policy.to_owned(),
            }),
            ..self.image_spec(image, "1")
        }
    }

    async fn create_image(&self, suffix: &str, spec: CachedImageSpec) -> String {
        let name = self.name(suffix);
        self.drop
            .create(&self.images, CachedImage::new(&name, spec))
            .await;
        name
    }

    async fn create_policy(&self, suffix: &str, spec: PullPolicySpec) -> String {
        let name = self.name(suffix);
        self.drop
            .create(&Api::all(self.client.clone()), PullPolicy::new(&name, spec))
            .await;
        name
    }

    async fn wait_image(
        &self,
        name: &str,
        secs: u64,
        what: &str,
        ok: impl Fn(&CachedImage) -> bool,
    ) -> CachedImage {
        e2e::wait_until(&self.images, name, secs, what, ok).await
    }

    async fn pull_pods_of(&self, image: &str) -> Vec<Pod> {
        self.pods
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|p| {
                p.annotations()
                    .get(drop::podbuilder::IMAGE_ANNOTATION)
                    .map(String::as_str)
                    == Some(image)
            })
            .collect()
    }

    async fn finish(self) {
        self.drop.stop().await;
        let api: Api<CachedImage> = Api::all(self.client.clone());
        let prefix = self.ns.name().to_owned();
        for ci in api.list(&Default::default()).await.unwrap().items {
            if ci.name_any().starts_with(&prefix) {
                let _ = api.delete(&ci.name_any(), &DeleteParams::default()).await;
            }
        }
        let policies: Api<PullPolicy> = Api::all(self.client.clone());
        for p in policies.list(&Default::default()).await.unwrap().items {
            if p.name_any().starts_with(&prefix) {
                let _ = policies
                    .delete(&p.name_any(), &DeleteParams::default())
                    .await;
            }
        }
        drop(self.nodes);
    }
}

fn phase(ci: &CachedImage) -> Option<CachedImagePhase> {
    ci.status.as_ref().and_then(|s| s.phase)
}

fn ready_reason(ci: &CachedImage) -> String {
    ci.status
        .as_ref()
        .and_then(|s| kube_plan::conditions::get(&s.conditions, "Ready"))
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn cachedimage_basic_caches_on_every_matching_node() {
    let s = scene("ci-basic", 3).await;
    let fast = s
        .create_policy(
            "fast",
            PullPolicySpec {
                max_concurrent_nodes: 3,
                min_delay_between_pulls: Some(Duration::ZERO.into()),
                ..Default::default()
            },
        )
        .await;
    let mut spec = s.image_spec("docker.io/library/nginx", "1.25-alpine");
    spec.policy_ref = Some(PolicyReference { name: fast });
    let name = s.create_image("nginx", spec).await;

    // While pulling, the Pods are owned by the CachedImage.
    let owned = eventually(Duration::from_secs(30), "a pull Pod", || async {
        s.pull_pods_of(&name)
            .await
            .into_iter()
            .next()
            .ok_or("none yet")
    })
    .await
    .unwrap();
    let owner = &owned.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("CachedImage", name.as_str(), Some(true))
    );

    let ci = s
        .wait_image(&name, 60, "Ready 3/3", |ci| {
            phase(ci) == Some(CachedImagePhase::Ready)
        })
        .await;
    let st = ci.status.unwrap();
    assert_eq!(st.ready.as_deref(), Some("3/3"));
    assert_eq!(st.cached_nodes.to_vec(), s.nodes.names().to_vec());
    assert!(
        st.resolved_digest
            .as_deref()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{:?}",
        st.resolved_digest
    );
    assert_eq!(st.observed_generation, ci.metadata.generation);
    let ready = kube_plan::conditions::get(&st.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.reason.as_str(), ready.message.as_str()),
        ("Cached", "Image cached on all 3 target nodes")
    );

    eventually(Duration::from_secs(30), "finished Pods removed", || async {
        let left = s.pull_pods_of(&name).await.len();
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} left"))
        }
    })
    .await
    .unwrap();

    // kubectl wait understands the Ready condition.
    let bin = e2e::tool("kubectl");
    let cluster = TestCluster::shared().unwrap();
    e2e::run_ok(
        std::process::Command::new(bin)
            .arg(format!("--kubeconfig={}", cluster.kubeconfig().display()))
            .args([
                "wait",
                "--for=condition=Ready",
                "--timeout=10s",
                &format!("cachedimage/{name}"),
            ]),
        "kubectl wait",
    );
    s.finish().await;
}

#[tokio::test]
async fn cachedimage_failures_back_off_and_recover() {
    let s = scene("ci-fail", 1).await;
    let policy = s
        .create_policy(
            "retry",
            PullPolicySpec {
                // No spacing between starts, so the gaps show the backoff alone.
                min_delay_between_pulls: Some(Duration::ZERO.into()),
                failure_backoff: Some(drop::api::BackoffConfig {
                    initial: Some(Duration::from_secs(2).into()),
                    max: Some(Duration::from_secs(8).into()),
                }),
                ..Default::default()
            },
        )
        .await;
    let mut spec = s.image_spec("docker.io/library/busybox", "1.36");
    spec.policy_ref = Some(PolicyReference { name: policy });
    // Credentials the (simulated) registry refuses.
    spec.image_pull_secrets = vec![LocalObjectReference {
        name: "invalid-creds".into(),
    }];
    let name = s.create_image("busybox", spec).await;

    let ci = s
        .wait_image(&name, 60, "Degraded after 4 failures", |ci| {
            phase(ci) == Some(CachedImagePhase::Degraded)
                && ci
                    .status
                    .as_ref()
                    .is_some_and(|s| s.consecutive_failures >= 4)
        })
        .await;
    assert_eq!(ready_reason(&ci), "PullFailed");
    let st = ci.status.unwrap();
    let progress = kube_plan::conditions::get(&st.conditions, "PullProgress").unwrap();
    assert!(
        ["Stalled", "Pulling"].contains(&progress.reason.as_str()),
        "{}",
        progress.reason
    );
    assert_eq!(st.failed_nodes[0].reason, "ErrImagePull");
    assert_eq!(st.nodes_failed, 1);

    // Retries are spaced by the backoff: 2 s, 4 s, 8 s (capped), measured between Pod creations.
    let starts: Vec<Timestamp> = s.recorder.records().iter().map(|r| r.created).collect();
    let gaps: Vec<i64> = starts
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_secs())
        .collect();
    println!("retry gaps (s): {gaps:?}");
    for (i, gap) in gaps.iter().enumerate().take(4) {
        let backoff = [2, 4, 8, 8][i];
        assert!(
            *gap >= backoff,
            "retry {} after {gap}s, backoff {backoff}s",
            i + 1
        );
    }
    assert!(
        gaps.windows(2).take(3).all(|w| w[1] >= w[0]),
        "the backoff grows: {gaps:?}"
    );

    // The credentials are fixed: the next retry succeeds and the image recovers.
    s.images
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"spec": {"imagePullSecrets": [{"name": "good-creds"}]}}),
            ),
        )
        .await
        .unwrap();
    let ci = s
        .wait_image(&name, 60, "recovered", |ci| {
            phase(ci) == Some(CachedImagePhase::Ready)
        })
        .await;
    assert_eq!(ci.status.unwrap().consecutive_failures, 0);
    s.finish().await;
}

/// Most pulls in flight at any instant among `records` (from first seen to end, both on the local
/// clock; the API server's creation times only have one-second resolution).

#[tokio::test]
async fn cachedimage_pacing_respects_concurrency_and_spacing() {
    let s = scene("ci-pace", 6).await;
    let policy = s
        .create_policy(
            "paced",
            PullPolicySpec {
                max_concurrent_nodes: 2,
                min_delay_between_pulls: Some(Duration::from_secs(5).into()),
                ..Default::default()
            },
        )
        .await;
    let mut spec = s.image_spec("docker.io/library/busybox", "slow-8s");
    spec.policy_ref = Some(PolicyReference {
        name: policy.clone(),
    });
    let t0 = Timestamp::now();
    let name = s.create_image("slow", spec).await;
    s.wait_image(&name, 180, "Ready 6/6", |ci| {
        phase(ci) == Some(CachedImagePhase::Ready)
    })
    .await;
    let makespan = Timestamp::now().duration_since(t0);

    let records = s.recorder.records();
    assert_eq!(
        records.len(),
        6,
        "one pull per node, no duplicates: {records:?}"
    );
    let starts: Vec<Timestamp> = records.iter().map(|r| r.created).collect();
    for w in starts.windows(2) {
        assert!(
            w[1].duration_since(w[0]) >= SignedDuration::from_secs(5),
            "starts {} and {} closer than 5 s",
            w[0],
            w[1]
        );
    }
    let overlap = PodRecorder::max_in_flight(&records);
    assert!(overlap <= 2, "{overlap} pulls in flight at once");

    // The ideal by the pacing rules, from the pure engine, for the same world (8 s pulls).
    let pace = drop::pacing::Pace {
        max_concurrent: 2,
        min_delay: Duration::from_secs(5),
        ..drop::pacing::Pace::builtin()
    };
    let ideal = ideal_makespan(&pace, 6, 8);
    println!(
        "pacing: 6 nodes, c=2, d=5s, 8 s pulls: makespan {:.1}s, ideal {}s, overhead {:.1}s; gaps {:?}",
        makespan.as_secs_f64(),
        ideal,
        makespan.as_secs_f64() - ideal as f64,
        starts
            .windows(2)
            .map(|w| w[1].duration_since(w[0]).as_secs())
            .collect::<Vec<_>>()
    );
    s.finish().await;
}

/// Makespan of `nodes` pulls of `secs` seconds each under `pace`, with instant reactions.
fn ideal_makespan(pace: &drop::pacing::Pace, nodes: usize, secs: i64) -> i64 {
    use drop::pacing::{History, InFlight, Input, PullKey, Target, decide};
    let t = |s: i64| Timestamp::from_second(1_900_000_000 + s).unwrap();
    let paces = BTreeMap::from([(None, pace.clone())]);
    let targets: Vec<Target> = (0..nodes)
        .map(|i| Target {
            key: PullKey::new("x", &format!("n{i}")),
            priority: 0,
            policy: None,
            registry: "docker.io".into(),
        })
        .collect();
    let mut history: BTreeMap<PullKey, History> = BTreeMap::new();
    let mut flying: Vec<(InFlight, i64)> = Vec::new();
    let mut now = 0;
    loop {
        flying.retain(|(f, end)| {
            if *end <= now {
                history.entry(f.key.clone()).or_default().last_success = Some(t(*end));
                false
            } else {
                true
            }
        });
        let in_flight: Vec<InFlight> = flying.iter().map(|(f, _)| f.clone()).collect();
        let d = decide(&Input {
            now: t(now),
            paces: &paces,
            targets: &targets.iter().collect::<Vec<_>>(),
            earlier_starts: &BTreeMap::new(),
            in_flight: &in_flight,
            history: &history,
            pull_timeout: Duration::from_secs(3600),
            registry_budgets: &BTreeMap::new(),
        });
        for k in d.start {
            history.entry(k.clone()).or_default().last_start = Some(t(now));
            flying.push((
                InFlight {
                    key: k,
                    policy: None,
                    registry: "docker.io".into(),
                    started: t(now),
                },
                now + secs,
            ));
        }
        if flying.is_empty()
            && history
                .values()
                .filter(|h| h.last_success.is_some())
                .count()
                == nodes
        {
            return now;
        }
        let next_end = flying.iter().map(|(_, e)| *e).min();
        let wake = d.wake_at.map(|w| w.as_second() - 1_900_000_000);
        now = [next_end, wake]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + 1)
            .max(now + 1);
    }
}

#[tokio::test]
async fn cachedimage_new_node_is_pulled_promptly_and_removed_node_leaves() {
    let (cluster, client) = cluster().await.unwrap();
    let s = scene_in(cluster, client.clone(), "ci-nodes", 2).await;
    let eager = s
        .create_policy(
            "eager",
            PullPolicySpec {
                max_concurrent_nodes: 4,
                min_delay_between_pulls: Some(Duration::ZERO.into()),
                ..Default::default()
            },
        )
        .await;
    let mut spec = s.image_spec("docker.io/library/alpine", "3.19");
    spec.policy_ref = Some(PolicyReference { name: eager });
    let name = s.create_image("alpine", spec).await;
    s.wait_image(&name, 60, "Ready 2/2", |ci| {
        ci.status.as_ref().and_then(|s| s.ready.as_deref()) == Some("2/2")
    })
    .await;

    // A node joins the pool: its pull starts from the Node watch, not a periodic resync.
    let joined = Timestamp::now();
    let extra = cluster
        .add_nodes(&client, &format!("{}-late", s.ns.name()), 1, &s.pool())
        .await
        .unwrap();
    let new_node = extra.names()[0].clone();
    eventually(
        Duration::from_secs(30),
        "pull Pod on the new node",
        || async {
            let recs = s.recorder.records();
            recs.iter()
                .find(|r| r.node == new_node)
                .map(|r| r.created)
                .ok_or("not yet")
        },
    )
    .await
    .unwrap();
    let latency = s
        .recorder
        .records()
        .iter()
        .find(|r| r.node == new_node)
        .map(|r| r.seen.duration_since(joined));
    println!(
        "new node: pull Pod seen {:.2}s after the Node was created",
        latency.unwrap_or_default().as_secs_f64()
    );
    s.wait_image(&name, 60, "Ready 3/3", |ci| {
        ci.status.as_ref().and_then(|s| s.ready.as_deref()) == Some("3/3")
    })
    .await;

    // A node leaves the pool (relabelled): it drops out of the counts.
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            &new_node,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {POOL: "elsewhere"}}})),
        )
        .await
        .unwrap();
    let ci = s
        .wait_image(&name, 30, "back to 2/2", |ci| {
            ci.status.as_ref().and_then(|s| s.ready.as_deref()) == Some("2/2")
        })
        .await;
    assert!(!ci.status.unwrap().cached_nodes.contains(&new_node));
    drop(extra);
    s.finish().await;
}

#[tokio::test]
async fn cachedimage_selectors_tolerations_secrets_and_priority() {
    let (cluster, client) = cluster().await.unwrap();
    let s = scene_in(cluster, client.clone(), "ci-select", 2).await;
    // A tainted node in the pool: only images tolerating the taint go there.
    let mut tainted_labels = s.pool();
    tainted_labels.insert("role".into(), "build".into());
    let tainted = cluster
        .add_nodes(
            &client,
            &format!("{}-build", s.ns.name()),
            1,
            &tainted_labels,
        )
        .await
        .unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    let taint = Taint {
        key: "dedicated".into(),
        value: Some("ci".into()),
        effect: "NoSchedule".into(),
        ..Taint::default()
    };
    nodes
        .patch(
            &tainted.names()[0],
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"taints": [taint]}})),
        )
        .await
        .unwrap();

    // Both images wait for their policy, so they compete for it from the same moment.
    let serial = s.name("serial");
    let mut plain = s.image_spec("docker.io/library/redis", "7-alpine");
    plain.policy_ref = Some(PolicyReference {
        name: serial.clone(),
    });
    plain.priority = Some(10);
    let mut urgent = s.image_spec("docker.io/library/postgres", "16");
    urgent.policy_ref = Some(PolicyReference {
        name: serial.clone(),
    });
    urgent.priority = Some(-10);
    urgent.image_pull_secrets = vec![LocalObjectReference {
        name: "registry-creds".into(),
    }];
    urgent.tolerations = vec![Toleration {
        key: Some("dedicated".into()),
        operator: Some("Equal".into()),
        value: Some("ci".into()),
        effect: Some("NoSchedule".into()),
        ..Toleration::default()
    }];
    let low = s.create_image("a-low", plain).await;
    let high = s.create_image("z-high", urgent).await;
    s.wait_image(&high, 30, "waiting for its policy", |ci| {
        ready_reason(ci) == "PolicyNotFound"
    })
    .await;
    s.create_policy(
        "serial",
        PullPolicySpec {
            max_concurrent_nodes: 1,
            min_delay_between_pulls: Some(Duration::ZERO.into()),
            ..Default::default()
        },
    )
    .await;

    let ci_low = s
        .wait_image(&low, 60, "low Ready", |ci| {
            phase(ci) == Some(CachedImagePhase::Ready)
        })
        .await;
    let ci_high = s
        .wait_image(&high, 60, "high Ready", |ci| {
            phase(ci) == Some(CachedImagePhase::Ready)
        })
        .await;
    assert_eq!(
        ci_low.status.unwrap().nodes_targeted,
        2,
        "the untolerated tainted node is skipped"
    );
    assert_eq!(
        ci_high.status.unwrap().nodes_targeted,
        3,
        "the tolerating image includes it"
    );

    let records = s.recorder.records();
    let first_low = records.iter().position(|r| r.image == low).unwrap();
    let last_high = records.iter().rposition(|r| r.image == high).unwrap();
    assert!(
        last_high < first_low,
        "priority -10 pulls before priority 10 under one policy: {records:?}"
    );
    assert!(
        records
            .iter()
            .filter(|r| r.image == high)
            .all(|r| r.pull_secrets == vec!["registry-creds".to_owned()])
    );
    assert!(
        records
            .iter()
            .filter(|r| r.image == low)
            .all(|r| r.node != tainted.names()[0])
    );
    drop(tainted);
    s.finish().await;
}

#[tokio::test]
async fn cachedimage_restart_mid_rollout_makes_no_duplicates() {
    let (cluster, client) = cluster().await.unwrap();
    let mut s = scene_in(cluster, client.clone(), "ci-restart", 4).await;
    let policy = s
        .create_policy(
            "two",
            PullPolicySpec {
                max_concurrent_nodes: 2,
                min_delay_between_pulls: Some(Duration::from_secs(1).into()),
                ..Default::default()
            },
        )
        .await;
    let mut spec = s.image_spec("docker.io/library/busybox", "slow-6s");
    spec.policy_ref = Some(PolicyReference { name: policy });
    let name = s.create_image("restart", spec).await;
    eventually(Duration::from_secs(30), "two pulls in flight", || async {
        let n = s
            .recorder
            .records()
            .iter()
            .filter(|r| r.ended.is_none())
            .count();
        if n == 2 {
            Ok(())
        } else {
            Err(format!("{n} in flight"))
        }
    })
    .await
    .unwrap();

    // Kill the operator mid-rollout and start a new one.
    let old = std::mem::replace(
        &mut s.drop,
        DropUnderTest::start(&client, s.ns.name(), s.ns.name()).await,
    );
    old.stop().await;
    s.wait_image(&name, 90, "Ready 4/4 after the restart", |ci| {
        phase(ci) == Some(CachedImagePhase::Ready)
    })
    .await;
    let records = s.recorder.records();
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &records {
        *per_node.entry(r.node.as_str()).or_default() += 1;
    }
    assert!(
        per_node.values().all(|n| *n == 1),
        "each node pulled exactly once across the restart: {per_node:?}"
    );
    assert_eq!(per_node.len(), 4);
    assert!(PodRecorder::max_in_flight(&records) <= 2);
    s.finish().await;
}

#[tokio::test]
async fn cachedimage_deletion_removes_pull_pods() {
    let s = scene("ci-delete", 2).await;
    let name = s
        .create_image(
            "slowdel",
            s.image_spec("docker.io/library/busybox", "slow-60s"),
        )
        .await;
    eventually(Duration::from_secs(30), "a pull in flight", || async {
        if s.pull_pods_of(&name).await.is_empty() {
            Err("none")
        } else {
            Ok(())
        }
    })
    .await
    .unwrap();
    s.images
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "pull Pods gone", || async {
        let n = s.pull_pods_of(&name).await.len();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} left"))
        }
    })
    .await
    .unwrap();
    s.finish().await;
}

#[tokio::test]
async fn cachedimage_missing_policy_is_reported_then_honoured() {
    let s = scene("ci-nopolicy", 1).await;
    let mut spec = s.image_spec("docker.io/library/nginx", "1.27");
    let policy_name = s.name("later");
    spec.policy_ref = Some(PolicyReference {
        name: policy_name.clone(),
    });
    let name = s.create_image("waits", spec).await;
    let ci = s
        .wait_image(&name, 30, "PolicyNotFound", |ci| {
            ready_reason(ci) == "PolicyNotFound"
        })
        .await;
    assert!(
        s.pull_pods_of(&name).await.is_empty(),
        "nothing pulled without its policy"
    );
    assert_eq!(phase(&ci), Some(CachedImagePhase::Pending));
    // The policy appears: the image proceeds, driven by the PullPolicy watch.
    s.create_policy("later", PullPolicySpec::default()).await;
    s.wait_image(&name, 60, "Ready once the policy exists", |ci| {
        phase(ci) == Some(CachedImagePhase::Ready)
    })
    .await;
    s.finish().await;
}

#[tokio::test]
async fn cachedimage_operator_without_crds_fails_with_a_clear_message() {
    kube_plan::install_crypto_provider();
    // A cluster of its own, where Drop's CRDs were never installed.
    let bare = TestCluster::start(0).unwrap();
    let client = bare.client().await.unwrap();
    let settings = drop::operator::Settings {
        pull_timeout: Duration::from_secs(60),
        ..drop::operator::Settings::default()
    };
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        drop::operator::run(client, settings, std::future::pending()),
    )
    .await
    .expect("fails at once instead of waiting")
    .unwrap_err()
    .to_string();
    assert!(err.contains("cachedimages.drop.corewire.io"), "{err}");
    assert!(
        err.contains("not installed; install the CRD chart or apply the generated YAML first"),
        "{err}"
    );
}

#[tokio::test]
async fn cachedimage_operator_reports_ready_every_time_it_starts() {
    // Readiness once used a wait kube's applier also used on the same store, which wakes only one
    // waiter: about every other start never became ready. Start several times to catch it.
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "ci-ready").await.unwrap();
    let http = reqwest::Client::new();
    for round in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let settings = drop::operator::Settings {
            pod_namespace: ns.name().to_owned(),
            pull_timeout: Duration::from_secs(60),
            health_addr: Some(format!("127.0.0.1:{port}").parse().unwrap()),
            install_crds: true,
            watch_selector: Some(format!("{}={}", e2e::TEST_LABEL, ns.name())),
            ..drop::operator::Settings::default()
        };
        let running = tokio::spawn(drop::operator::run(client.clone(), settings, async move {
            let _ = stopped.await;
        }));
        let url = format!("http://127.0.0.1:{port}/readyz");
        eventually(
            Duration::from_secs(20),
            &format!("ready on start {round}"),
            || async {
                let status = http
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .status();
                if status.is_success() {
                    Ok(())
                } else {
                    Err(status.to_string())
                }
            },
        )
        .await
        .unwrap();
        let _ = stop.send(());
        running.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn cachedimage_metrics_count_pulls_and_forget_deleted_images() {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "ci-metrics").await.unwrap();
    let pool = BTreeMap::from([(POOL.to_owned(), ns.name().to_owned())]);
    let _nodes = cluster
        .add_nodes(&client, ns.name(), 2, &pool)
        .await
        .unwrap();
    e2e::restrict_namespace(&client, ns.name()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = drop::operator::Settings {
        pod_namespace: ns.name().to_owned(),
        pull_timeout: Duration::from_secs(60),
        metrics_addr: Some(format!("127.0.0.1:{port}").parse().unwrap()),
        install_crds: true,
        watch_selector: Some(format!("{}={}", e2e::TEST_LABEL, ns.name())),
        ..drop::operator::Settings::default()
    };
    let running = tokio::spawn(drop::operator::run(client.clone(), settings, async move {
        let _ = stopped.await;
    }));
    let images: Api<CachedImage> = Api::all(client.clone());
    let name = format!("{}-m", ns.name());
    let mut ci = CachedImage::new(
        &name,
        CachedImageSpec {
            image: "docker.io/library/nginx".into(),
            tag: Some("1.27".into()),
            node_selector: pool.clone(),
            ..Default::default()
        },
    );
    ci.metadata.labels = Some(BTreeMap::from([(
        e2e::TEST_LABEL.to_owned(),
        ns.name().to_owned(),
    )]));
    eventually(Duration::from_secs(30), "created", || async {
        images
            .create(&PostParams::default(), &ci)
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let metrics = || async {
        http.get(&url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())
    };
    let label = format!("{{cachedimage=\"{name}\"}}");
    let text = eventually(Duration::from_secs(60), "both pulls counted", || async {
        let text = metrics().await?;
        if text.contains(&format!("drop_images_cached_total{label} 2")) {
            Ok(text)
        } else {
            Err("not yet".to_owned())
        }
    })
    .await
    .unwrap();
    for line in [
        format!("drop_nodes_targeted{label} 2"),
        format!("drop_nodes_cached{label} 2"),
        format!("drop_consecutive_failures{label} 0"),
    ] {
        assert!(text.contains(&line), "missing {line:?}");
    }
    assert!(
        text.contains("drop_pull_duration_seconds_count 2"),
        "two pull durations observed"
    );
    assert!(
        text.contains("controller_runtime_reconcile_total{controller=\"cachedimage\",result="),
        "framework metrics served too"
    );
    // The seed's own reconcile counter counts the same reconciles.
    let count = |prefix: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(prefix) && l.contains("controller=\"cachedimage\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(
        count("drop_reconcile_total{") > 0,
        "drop_reconcile_total counts"
    );
    assert_eq!(
        count("drop_reconcile_total{"),
        count("controller_runtime_reconcile_total{")
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("drop_") && l.contains("node=\"")),
        "no per-node labels"
    );

    // Deleting the image removes its series.
    images.delete(&name, &Default::default()).await.unwrap();
    eventually(Duration::from_secs(30), "series removed", || async {
        let text = metrics().await?;
        if text.contains(&label) {
            Err("still there".to_owned())
        } else {
            Ok(())
        }
    })
    .await
    .unwrap();
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

/// A rollout on a loaded machine: every pull Pod the operator creates must pull before it is
/// deleted, and every image must settle. Before the framework pruned only from the view a reconcile
/// was given, a reconcile that started before the Pod cache showed a new Pod, and ended after it did,
/// deleted that Pod within milliseconds of its creation, and the pull stayed "in flight" with no Pod.
// Several worker threads, as the operator binary has: on one thread the Pod cache cannot change
// between a reconcile's start and its plan's execution, which hides the race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cachedimage_stall_rollout_under_cpu_load_deletes_no_pod_before_it_pulls() {
    const NODES: usize = 30;
    const IMAGES: usize = 4;
    let s = scene("ci-stall", NODES).await;
    let policy = s
        .create_policy(
            "busy",
            PullPolicySpec {
                max_concurrent_nodes: 6,
                min_delay_between_pulls: Some(Duration::ZERO.into()),
                ..Default::default()
            },
        )
        .await;
    let load = e2e::CpuLoad::start(2);
    let t0 = Timestamp::now();
    let mut names = Vec::new();
    for i in 0..IMAGES {
        let mut spec = s.image_spec(&format!("docker.io/library/stall{i}"), "1");
        spec.policy_ref = Some(PolicyReference {
            name: policy.clone(),
        });
        names.push(s.create_image(&format!("img{i}"), spec).await);
    }
    for name in &names {
        s.wait_image(name, 300, "Ready on every node", |ci| {
            phase(ci) == Some(CachedImagePhase::Ready)
        })
        .await;
    }
    let settled = Timestamp::now().duration_since(t0);
    drop(load);

    let records = s.recorder.records();
    let early: Vec<&e2e::PodRecord> = records.iter().filter(|r| r.deleted_early).collect();
    println!(
        "stall: {NODES} nodes x {IMAGES} images under 2 busy loops: settled in {:.1}s, {} pull Pods, {} deleted before pulling",
        settled.as_secs_f64(),
        records.len(),
        early.len()
    );
    assert!(
        early.is_empty(),
        "pull Pods deleted before they pulled: {early:?}"
    );
    assert_eq!(
        records.len(),
        NODES * IMAGES,
        "one pull Pod per (image, node), none thrown away and redone"
    );
    // Each phase change is told once: one Pulling and one Cached Event per image, never repeated
    // (a reconcile reading a status older than the one just written would tell it again).
    // The Event follows the status write that tells of the change in the same reconcile: a test
    // that has seen Ready may ask before it is there, so it waits for each to be told at least once.
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::all(s.client.clone());
    let told = |all: &[k8s_openapi::api::core::v1::Event], name: &str, reason: &str| -> i32 {
        all.iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(name))
            .filter(|e| e.reason.as_deref() == Some(reason))
            .map(|e| e.count.unwrap_or(1).max(1))
            .sum()
    };
    let all = eventually(
        Duration::from_secs(30),
        "every phase change told",
        || async {
            let all = events
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?
                .items;
            let untold: Vec<String> = names
                .iter()
                .flat_map(|n| ["Pulling", "Cached"].map(|r| (n, r)))
                .filter(|(n, r)| told(&all, n, r) == 0)
                .map(|(n, r)| format!("{n}: {r}"))
                .collect();
            if untold.is_empty() {
                Ok(all)
            } else {
                Err(format!("not yet told: {untold:?}"))
            }
        },
    )
    .await
    .unwrap();
    for name in &names {
        for reason in ["Pulling", "Cached"] {
            let n = told(&all, name, reason);
            assert_eq!(n, 1, "{name}: {reason} told {n} times");
        }
    }
    s.finish().await;
}

#[tokio::test]
async fn cachedimage_refused_pull_pod_is_reported_and_frees_its_policy() {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    use k8s_openapi::api::core::v1::Event;
    let s = scene("ci-refused", 2).await;
    // An admission policy of the cluster refuses Pods of one image in this namespace.
    let (vap_name, binding_name) = (s.name("no-forbidden"), s.name("no-forbidden"));
    let vap: ValidatingAdmissionPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"name": vap_name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                "operations": ["CREATE"], "resources": ["pods"]}]},
            "validations": [{
                "expression": "!object.spec.containers.exists(c, c.image.contains('forbidden-app'))",
                "message": "images of forbidden-app are not allowed here"}]
        }
    }))
    .unwrap();
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": binding_name},
        "spec": {
            "policyName": vap_name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels":
                {"kubernetes.io/metadata.name": s.ns.name()}}}
        }
    }))
    .unwrap();
    let vaps: Api<ValidatingAdmissionPolicy> = Api::all(s.client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(s.client.clone());
    vaps.create(&PostParams::default(), &vap).await.unwrap();
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    // Admission policies take effect a moment after they are created: wait until one refuses.
    let probe: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "probe"},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "image": "registry.example.com/forbidden-app:0",
                "securityContext": {"allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"]}}}]
        }
    }))
    .unwrap();
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    eventually(Duration::from_secs(30), "the policy refuses", || async {
        match s.pods.create(&dry, &probe).await {
            Err(kube::Error::Api(e)) if e.message.contains("forbidden-app") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap();

    // One pull at a time, no spacing: a pull slot the refused image kept would stop the other.
    let policy = s
        .create_policy(
            "tight",
            PullPolicySpec {
                max_concurrent_nodes: 1,
                min_delay_between_pulls: Some(Duration::ZERO.into()),
                ..Default::default()
            },
        )
        .await;
    let with_policy = |image: &str| s.image_under(image, &policy);
    let mut refused_spec = with_policy("registry.example.com/forbidden-app");
    refused_spec.priority = Some(10);
    let refused = s.create_image("forbidden", refused_spec).await;
    let allowed = s
        .create_image("allowed", with_policy("registry.example.com/allowed-app"))
        .await;

    let ci = s
        .wait_image(&refused, 60, "the refusal in the status", |ci| {
            ci.status
                .as_ref()
                .is_some_and(|st| st.failed_nodes.iter().any(|f| f.reason == "PullPodRefused"))
        })
        .await;
    let failure = ci.status.unwrap().failed_nodes[0].clone();
    assert!(
        failure
            .message
            .contains("images of forbidden-app are not allowed here"),
        "{failure:?}"
    );
    s.wait_image(&allowed, 90, "the other image cached", |ci| {
        phase(ci) == Some(CachedImagePhase::Ready)
    })
    .await;
    let events: Api<Event> = Api::all(s.client.clone());
    let refusals = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(refused.as_str()))
        .filter(|e| e.reason.as_deref() == Some("ChildRefused"))
        .count();
    assert!(refusals >= 1, "no ChildRefused Event on {refused}");
    assert!(
        s.pull_pods_of(&refused).await.is_empty(),
        "a refused Pod cannot exist"
    );
    let _ = bindings
        .delete(&binding_name, &DeleteParams::default())
        .await;
    let _ = vaps.delete(&vap_name, &DeleteParams::default()).await;
    s.finish().await;
}

#[tokio::test]
async fn cachedimage_deleted_while_its_status_is_written_is_no_error() {
    use std::sync::Arc;
    use tokio::sync::watch;
    let (cluster, _) = cluster().await.unwrap();
    // The operator's status writes of the image "<ns>-gone" wait until the test has deleted it.
    let (deleted, is_deleted) = watch::channel(false);
    let (held, mut is_held) = watch::channel(false);
    let hook: e2e::Hook = Arc::new(move |method, uri| {
        let status_write = *method == http::Method::PATCH
            && uri.path().contains("/cachedimages/")
            && uri.path().ends_with("-gone/status");
        let mut is_deleted = is_deleted.clone();
        let held = held.clone();
        status_write.then(|| {
            held.send_replace(true);
            Box::pin(async move {
                let _ = is_deleted.wait_for(|d| *d).await;
            }) as futures::future::BoxFuture<'static, ()>
        })
    });
    let hooked = e2e::hooked_client(cluster, hook).await;
    let s = scene_in(cluster, hooked, "ci-gone", 1).await;
    let name = s
        .create_image(
            "gone",
            s.image_spec("docker.io/library/busybox", "slow-60s"),
        )
        .await;
    tokio::time::timeout(Duration::from_secs(30), is_held.wait_for(|h| *h))
        .await
        .expect("a status write")
        .unwrap();
    s.images
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "image gone", || async {
        match s.images.get_opt(&name).await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
    deleted.send_replace(true);

    // The held write ends in 404; the reconcile that made it must not count as failed. Stopping
    // the operator waits for that reconcile, and so for any Event it would publish.
    let Scene { client, drop, .. } = s;
    drop.stop().await;
    let warnings = e2e::warnings_about(&client, |about| about == name).await;
    assert!(warnings.is_empty(), "{warnings:#?}");
}

#[tokio::test]
async fn cachedimage_image_stuck_terminating_does_not_hold_its_policy_after_a_restart() {
    let (cluster, client) = cluster().await.unwrap();
    let mut s = scene_in(cluster, client.clone(), "ci-stuck", 1).await;
    let policy = s
        .create_policy(
            "shared",
            PullPolicySpec {
                min_delay_between_pulls: Some(Duration::ZERO.into()),
                ..Default::default()
            },
        )
        .await;
    let with_policy = |image: &str| s.image_under(image, &policy);
    let (stuck_spec, next_spec) = (
        with_policy("docker.io/library/stuck"),
        with_policy("docker.io/library/next"),
    );
    let stuck = s.create_image("stuck", stuck_spec).await;
    s.wait_image(&stuck, 60, "cached", |ci| {
        phase(ci) == Some(CachedImagePhase::Ready)
    })
    .await;
    // Someone else's finalizer keeps the image Terminating.
    const HOLD: &str = "e2e.drop/hold";
    s.images
        .patch(
            &stuck,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"finalizers": [HOLD]}})),
        )
        .await
        .unwrap();
    s.images
        .delete(&stuck, &DeleteParams::default())
        .await
        .unwrap();
    // A new operator process finds it Terminating; another image under the same policy must go on.
    let old = std::mem::replace(
        &mut s.drop,
        DropUnderTest::start(&client, s.ns.name(), s.ns.name()).await,
    );
    old.stop().await;
    let next = s.create_image("next", next_spec).await;
    s.wait_image(&next, 60, "cached beside the stuck image", |ci| {
        phase(ci) == Some(CachedImagePhase::Ready)
    })
    .await;
    s.images
        .patch(
            &stuck,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    s.finish().await;
}

#[tokio::test]
async fn cachedimage_cri_o_node_reports_cached_when_the_container_cannot_be_created() {
    let s = scene("ci-crio", 2).await;
    // The simulated kubelet behaves as CRI-O for "crio-" tags: CreateContainerError, no imageID.
    let name = s
        .create_image("crio", s.image_spec("docker.io/library/busybox", "crio-1"))
        .await;
    let ci = s
        .wait_image(&name, 60, "cached on both nodes", |ci| {
            phase(ci) == Some(CachedImagePhase::Ready)
        })
        .await;
    assert_eq!(ci.status.unwrap().nodes_ready, 2);
    assert!(
        s.pull_pods_of(&name).await.is_empty(),
        "pull Pods stuck at create are deleted once the pull is known"
    );
    s.finish().await;
}
