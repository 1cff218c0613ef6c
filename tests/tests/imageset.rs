//! CachedImageSets on the local control plane: children follow the static list and the referenced
//! DiscoveryPolicy's discovered images, carry the set's settings, roll up into the set's status, and
//! go with the set whichever way it is deleted.

use drop::api::{
    CachedImage, CachedImageSet, CachedImageSetPhase, CachedImageSetSpec, DiscoveredImage,
    DiscoveryPolicy, DiscoveryPolicyReference, DiscoveryPolicySpec, DiscoverySource,
    IMAGESET_LABEL, ImageEntry, ImagePullPolicy, PolicyReference, PrometheusSource, PullPolicy,
    PullPolicySpec, SourceType,
};
use drop::cachedimageset::plan::{Wanted, child_name};
use e2e::{DropUnderTest, cluster};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::{Client, ResourceExt};
use kube_plan::testing::eventually;
use std::collections::BTreeMap;
use std::time::Duration;

const POOL: &str = "e2e.drop/pool";

struct Scene {
    client: Client,
    drop: DropUnderTest,
    ns: kube_plan::testing::TestNamespace,
    _nodes: kube_plan::testing::TestNodes,
    sets: Api<CachedImageSet>,
    images: Api<CachedImage>,
}

async fn scene(id: &str) -> Scene {
    scene_with(id, 2, None, drop::operator::STATUS_INTERVAL).await
}

/// A scene of `nodes` nodes whose Drop uses `drop_client` (the test's client if `None`) and writes
/// progress to status at most every `status_interval`.
async fn scene_with(
    id: &str,
    nodes: usize,
    drop_client: Option<Client>,
    status_interval: Duration,
) -> Scene {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, id).await.unwrap();
    let pool = BTreeMap::from([(POOL.to_owned(), ns.name().to_owned())]);
    let nodes = cluster
        .add_nodes(&client, ns.name(), nodes, &pool)
        .await
        .unwrap();
    let drop_client = drop_client.unwrap_or_else(|| client.clone());
    let drop = DropUnderTest::start_with(&drop_client, ns.name(), ns.name(), |s| {
        s.status_interval = status_interval;
    })
    .await;
    let s = Scene {
        sets: Api::all(client.clone()),
        images: Api::all(client.clone()),
        client,
        drop,
        ns,
        _nodes: nodes,
    };
    let fast = PullPolicy::new(
        &s.name("fast"),
        PullPolicySpec {
            max_concurrent_nodes: 4,
            min_delay_between_pulls: Some(Duration::ZERO.into()),
            ..PullPolicySpec::default()
        },
    );
    s.drop.create(&Api::all(s.client.clone()), fast).await;
    s
}

impl Scene {
    fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.ns.name())
    }

    fn spec(&self, images: &[(&str, &str)]) -> CachedImageSetSpec {
        CachedImageSetSpec {
            policy_ref: Some(PolicyReference {
                name: self.name("fast"),
            }),
            node_selector: BTreeMap::from([(POOL.to_owned(), self.ns.name().to_owned())]),
            images: images
                .iter()
                .map(|(i, t)| ImageEntry {
                    image: i.to_string(),
                    tag: Some(t.to_string()),
                    digest: None,
                })
                .collect(),
            ..CachedImageSetSpec::default()
        }
    }

    async fn create_set(&self, suffix: &str, spec: CachedImageSetSpec) -> String {
        let name = self.name(suffix);
        self.drop
            .create(&self.sets, CachedImageSet::new(&name, spec))
            .await;
        name
    }

    async fn children(&self, set: &str) -> Vec<CachedImage> {
        let lp = ListParams::default().labels(&format!("{IMAGESET_LABEL}={set}"));
        let mut items = self.images.list(&lp).await.unwrap().items;
        items.sort_by_key(|c| c.name_any());
        items
    }

    async fn wait_set(
        &self,
        name: &str,
        what: &str,
        ok: impl Fn(&CachedImageSet) -> bool,
    ) -> CachedImageSet {
        e2e::wait_until(&self.sets, name, 60, what, ok).await
    }

    async fn wait_children(&self, set: &str, want: &[String]) -> Vec<CachedImage> {
        let mut want = want.to_vec();
        want.sort();
        eventually(
            Duration::from_secs(60),
            "children follow the set",
            || async {
                let got = self.children(set).await;
                let names: Vec<String> = got.iter().map(ResourceExt::name_any).collect();
                if names == want {
                    Ok(got)
                } else {
                    Err(format!("{names:?}"))
                }
            },
        )
        .await
        .unwrap()
    }

    async fn finish(self) {
        self.drop.stop().await;
    }
}

fn ready_message(s: &CachedImageSet) -> (String, String) {
    s.status
        .as_ref()
        .and_then(|st| kube_plan::conditions::get(&st.conditions, "Ready"))
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

fn child_of(set: &str, reference: &str) -> String {
    child_name(set, &Wanted::parse(reference).unwrap())
}

#[tokio::test]
async fn imageset_static_children_follow_the_list_and_settings() {
    let s = scene("set-static").await;
    let name = s
        .create_set(
            "tools",
            s.spec(&[
                ("docker.io/library/alpine", "3.19"),
                ("docker.io/library/busybox", "1.36"),
            ]),
        )
        .await;
    let children = s
        .wait_children(
            &name,
            &[
                child_of(&name, "docker.io/library/alpine:3.19"),
                child_of(&name, "docker.io/library/busybox:1.36"),
            ],
        )
        .await;
    let set = s.sets.get(&name).await.unwrap();
    for c in &children {
        let owner = &c.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("CachedImageSet", set.uid().unwrap().as_str(), Some(true))
        );
        assert_eq!(c.labels()[IMAGESET_LABEL], name);
        assert_eq!(c.spec.policy_ref.as_ref().unwrap().name, s.name("fast"));
        assert_eq!(c.spec.node_selector, s.spec(&[]).node_selector);
    }
    let set = s
        .wait_set(&name, "Ready", |x| {
            x.status.as_ref().and_then(|st| st.phase) == Some(CachedImageSetPhase::Ready)
        })
        .await;
    assert_eq!(
        ready_message(&set),
        ("Ready".to_owned(), "All 2 images are cached".to_owned())
    );
    assert_eq!(
        (
            set.status.as_ref().unwrap().images_managed,
            set.status.as_ref().unwrap().images_ready
        ),
        (2, 2)
    );

    // The list changes: one child added, one pruned.
    let spec = s.spec(&[
        ("docker.io/library/alpine", "3.19"),
        ("docker.io/library/redis", "7-alpine"),
    ]);
    s.sets
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"images": spec.images}})),
        )
        .await
        .unwrap();
    s.wait_children(
        &name,
        &[
            child_of(&name, "docker.io/library/alpine:3.19"),
            child_of(&name, "docker.io/library/redis:7-alpine"),
        ],
    )
    .await;

    // A propagated field changes: every child follows.
    s.sets
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"imagePullPolicy": "IfNotPresent"}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "children use IfNotPresent",
        || async {
            let cs = s.children(&name).await;
            if cs.len() == 2
                && cs
                    .iter()
                    .all(|c| c.spec.image_pull_policy == ImagePullPolicy::IfNotPresent)
            {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        },
    )
    .await
    .unwrap();
    s.finish().await;
}

#[tokio::test]
async fn imageset_discovered_images_follow_the_policy_and_failures_show() {
    let s = scene("set-disc").await;
    let set_spec = CachedImageSetSpec {
        discovery_policy_ref: Some(DiscoveryPolicyReference {
            name: s.name("popular"),
        }),
        ..s.spec(&[("docker.io/library/alpine", "3.19")])
    };
    let name = s.create_set("found", set_spec).await;
    let set = s
        .wait_set(&name, "policy reported missing", |x| {
            ready_message(x).0 == "DiscoveryPolicyNotFound"
        })
        .await;
    assert_eq!(
        set.status.unwrap().phase,
        Some(CachedImageSetPhase::Degraded)
    );

    // The DiscoveryPolicy appears; its status is what its controller publishes.
    let policies: Api<DiscoveryPolicy> = Api::all(s.client.clone());
    let source = DiscoverySource {
        type_: SourceType::Prometheus,
        prometheus: Some(PrometheusSource {
            endpoint: "http://prometheus:9090".into(),
            query: "up".into(),
            ..PrometheusSource::default()
        }),
        registry: None,
        secret_ref: None,
    };
    let dp = DiscoveryPolicy::new(
        &s.name("popular"),
        DiscoveryPolicySpec {
            sources: vec![source],
            ..DiscoveryPolicySpec::default()
        },
    );
    // Not labelled for this test's Drop: its status is written below, as a DiscoveryPolicy
    // controller would; the set controller reads every DiscoveryPolicy.
    policies.create(&PostParams::default(), &dp).await.unwrap();
    let publish = |images: &[&str], ready: bool, message: &str| {
        let found: Vec<DiscoveredImage> = images
            .iter()
            .map(|i| DiscoveredImage {
                image: i.to_string(),
                score: 1,
                source: "prometheus".into(),
            })
            .collect();
        serde_json::json!({"status": {"discoveredImages": found, "imageCount": found.len(), "conditions": [{
            "type": "Ready", "status": if ready { "True" } else { "False" },
            "reason": if ready { "Synced" } else { "SourceError" }, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    };
    let pp = PatchParams::default();
    let set_status = |images: &'static [&'static str], ready: bool, message: &'static str| {
        let body = publish(images, ready, message);
        let (policies, name, pp) = (policies.clone(), s.name("popular"), pp.clone());
        async move {
            policies
                .patch_status(&name, &pp, &Patch::Merge(body))
                .await
                .unwrap()
        }
    };
    set_status(
        &["docker.io/library/nginx:1.27", "alpine:3.19"],
        true,
        "Discovered 2 images",
    )
    .await;
    s.wait_children(
        &name,
        &[
            child_of(&name, "docker.io/library/alpine:3.19"),
            child_of(&name, "docker.io/library/nginx:1.27"),
        ],
    )
    .await;
    s.wait_set(&name, "Ready with static and discovered images", |x| {
        ready_message(x).1 == "All 2 images are cached"
    })
    .await;

    // The discovered list changes: the children follow.
    set_status(&["docker.io/library/redis:7"], true, "Discovered 1 images").await;
    s.wait_children(
        &name,
        &[
            child_of(&name, "docker.io/library/alpine:3.19"),
            child_of(&name, "docker.io/library/redis:7"),
        ],
    )
    .await;

    // The policy breaks (it keeps its last good list): the set says so, and keeps its children.
    set_status(
        &["docker.io/library/redis:7"],
        false,
        "prometheus: connection refused",
    )
    .await;
    let set = s
        .wait_set(&name, "Degraded", |x| {
            x.status.as_ref().and_then(|st| st.phase) == Some(CachedImageSetPhase::Degraded)
        })
        .await;
    let (reason, message) = ready_message(&set);
    assert_eq!(reason, "Degraded");
    assert!(message.contains("connection refused"), "{message}");
    assert_eq!(s.children(&name).await.len(), 2);
    s.finish().await;
}

#[tokio::test]
async fn imageset_deletion_leaves_no_children_or_pull_pods() {
    let s = scene("set-delete").await;
    let mut slow = s.spec(&[
        ("docker.io/library/busybox", "slow-60s"),
        ("docker.io/library/alpine", "slow-60s"),
    ]);
    slow.policy_ref = Some(PolicyReference {
        name: s.name("fast"),
    });
    let background = s.create_set("bg", slow.clone()).await;
    let foreground = s.create_set("fg", slow).await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), s.ns.name());
    eventually(
        Duration::from_secs(60),
        "pulls in flight for both sets",
        || async {
            let n = pods
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
            if n >= 4 {
                Ok(())
            } else {
                Err(format!("{n} pull Pods"))
            }
        },
    )
    .await
    .unwrap();

    s.sets
        .delete(
            &background,
            &DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    s.sets
        .delete(
            &foreground,
            &DeleteParams {
                propagation_policy: Some(PropagationPolicy::Foreground),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(90),
        "sets, children and pull Pods gone",
        || async {
            let sets_left = [&background, &foreground].len()
                - [
                    s.sets.get_opt(&background).await,
                    s.sets.get_opt(&foreground).await,
                ]
                .into_iter()
                .filter(|r| matches!(r, Ok(None)))
                .count();
            let children =
                s.children(&background).await.len() + s.children(&foreground).await.len();
            let pulls = pods
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
            if sets_left + children + pulls == 0 {
                Ok(())
            } else {
                Err(format!(
                    "sets {sets_left}, children {children}, pods {pulls}"
                ))
            }
        },
    )
    .await
    .unwrap();
    // Deleting is normal: no Warning about the sets or their children (a status write racing the
    // deletion once showed as "ReconcileError: writing status ...: NotFound" with a debug dump).
    let warnings = e2e::warnings_about(&s.client, |about| {
        about.starts_with(&background) || about.starts_with(&foreground)
    })
    .await;
    assert!(warnings.is_empty(), "{warnings:#?}");
    s.finish().await;
}

#[tokio::test]
async fn imageset_follows_a_real_registry_through_its_discovery_policy() {
    let s = scene("set-real").await;
    let registry = e2e::fixtures::Registry::start().await;
    registry.push("team/app", "v1").await;
    let policies: Api<DiscoveryPolicy> = Api::all(s.client.clone());
    let source = DiscoverySource {
        type_: SourceType::Registry,
        prometheus: None,
        registry: Some(drop::api::RegistrySource {
            url: registry.url.clone(),
            repositories: vec!["team/app".into()],
            ..Default::default()
        }),
        secret_ref: None,
    };
    let mut dp = DiscoveryPolicy::new(
        &s.name("tags"),
        DiscoveryPolicySpec {
            sources: vec![source],
            sync_interval: Some(Duration::from_secs(10).into()),
            ..DiscoveryPolicySpec::default()
        },
    );
    dp.metadata.labels = Some(s.drop.labels());
    policies.create(&PostParams::default(), &dp).await.unwrap();
    let set_spec = CachedImageSetSpec {
        discovery_policy_ref: Some(DiscoveryPolicyReference {
            name: s.name("tags"),
        }),
        ..s.spec(&[])
    };
    let name = s.create_set("tagged", set_spec).await;
    let h = registry.host().to_owned();
    s.wait_children(&name, &[child_of(&name, &format!("{h}/team/app:v1"))])
        .await;

    // A new tag is pushed: the policy finds it on its next sync, and the set gets a child for it.
    registry.push("team/app", "v2").await;
    s.wait_children(
        &name,
        &[
            child_of(&name, &format!("{h}/team/app:v1")),
            child_of(&name, &format!("{h}/team/app:v2")),
        ],
    )
    .await;

    // The registry goes away: the policy fails but keeps its list; the set says why and keeps its children.
    drop(registry);
    let set = s
        .wait_set(&name, "Degraded by the failing policy", |x| {
            ready_message(x).1.contains("DiscoveryPolicy")
        })
        .await;
    let (reason, message) = ready_message(&set);
    assert_eq!(reason, "Degraded");
    assert!(
        message.contains("connection refused") || message.contains("Connection refused"),
        "{message}"
    );
    assert_eq!(
        s.children(&name).await.len(),
        2,
        "children are kept through the outage"
    );
    s.finish().await;
}

/// What a small rollout costs the API server: every write the operator's client makes (pull Pods,
/// children, statuses, Events) is counted, and the total must stay within 3 per (image, node) pair:
/// a pull Pod's creation and deletion, and the statuses and Events amortised over the rollout.
/// Progress is written at most every 30 s here, so the count does not depend on how fast the
/// machine runs the rollout: what is left is one write per pull Pod event that matters, one apply
/// per child, and the transitions of each status with their Events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imageset_api_writes_stay_within_bound() {
    const NODES: usize = 20;
    let (cluster, _) = cluster().await.unwrap();
    let counts = e2e::WriteCounts::default();
    let drop_client = e2e::hooked_client(cluster, counts.hook()).await;
    let s = scene_with(
        "set-writes",
        NODES,
        Some(drop_client),
        Duration::from_secs(30),
    )
    .await;
    let images: Vec<(String, &str)> = (0..5)
        .map(|i| (format!("docker.io/library/writes{i}"), "1"))
        .collect();
    let refs: Vec<(&str, &str)> = images.iter().map(|(i, t)| (i.as_str(), *t)).collect();
    let before = counts.snapshot();
    let name = s.create_set("five", s.spec(&refs)).await;
    s.wait_set(&name, "set Ready", |set| {
        set.status.as_ref().and_then(|st| st.phase) == Some(CachedImageSetPhase::Ready)
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), s.ns.name());
    eventually(Duration::from_secs(60), "pull Pods gone", || async {
        let n = pods
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} left"))
        }
    })
    .await
    .unwrap();
    let after = counts.snapshot();
    let writes: BTreeMap<&String, u64> = after
        .iter()
        .map(|(k, v)| (k, v - before.get(k).copied().unwrap_or(0)))
        // Installing the CRDs is the operator's start, not the rollout.
        .filter(|(k, v)| *v > 0 && !k.contains("customresourcedefinitions"))
        .collect();
    let total: u64 = writes.values().sum();
    let pairs = (images.len() * NODES) as u64;
    println!(
        "api writes: {total} for {pairs} pairs ({:.2} per pair): {writes:?}",
        total as f64 / pairs as f64
    );
    assert!(
        total <= 3 * pairs,
        "{total} writes for {pairs} pairs (bound {}): {writes:?}",
        3 * pairs
    );
    s.finish().await;
}
