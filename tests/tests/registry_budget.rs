//! A pull budget per registry: pulls from one registry stay within its budget across every
//! PullPolicy and image, images waiting on it say so, and every image gets cached.

use drop::api::{CachedImage, CachedImageSpec, PolicyReference, PullPolicy, PullPolicySpec};
use e2e::{DropUnderTest, PodRecorder, changes, cluster};
use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube_plan::testing::eventually;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const POOL: &str = "e2e.drop/pool";

#[tokio::test]
async fn registry_budget_two_policies_share_one_registry_budget() {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, "reg-budget").await.unwrap();
    let pool = BTreeMap::from([(POOL.to_owned(), ns.name().to_owned())]);
    let nodes = cluster
        .add_nodes(&client, ns.name(), 3, &pool)
        .await
        .unwrap();
    let recorder = PodRecorder::start(&client, ns.name());
    let drop = DropUnderTest::start_with(&client, ns.name(), ns.name(), |s| {
        s.registry_budgets = BTreeMap::from([("docker.io".to_owned(), 2)]);
    })
    .await;

    // Two policies, each with room for every node at once; three images, two of them from
    // docker.io (one per policy), pulls of 3 s.
    let policies: Api<PullPolicy> = Api::all(client.clone());
    let mut policy_names = Vec::new();
    for p in ["a", "b"] {
        let name = format!("{}-{p}", ns.name());
        let spec = PullPolicySpec {
            max_concurrent_nodes: 3,
            min_delay_between_pulls: Some(Duration::ZERO.into()),
            ..Default::default()
        };
        drop.create(&policies, PullPolicy::new(&name, spec)).await;
        policy_names.push(name);
    }
    let images: Api<CachedImage> = Api::all(client.clone());
    let refs = [
        ("hub-a", "docker.io/library/alpine", &policy_names[0]),
        ("hub-b", "docker.io/library/busybox", &policy_names[1]),
        ("ghcr", "ghcr.io/example/tool", &policy_names[0]),
    ];
    let reasons: Arc<Mutex<BTreeSet<(String, String)>>> = Arc::default();
    let seen = reasons.clone();
    let prefix = ns.name().to_owned();
    let watch = tokio::spawn(async move {
        let mut events = std::pin::pin!(changes(Api::<CachedImage>::all(kube::Client::clone(
            &client
        ))));
        while let Some((ci, _)) = events.next().await {
            if !ci.name_any().starts_with(&prefix) {
                continue;
            }
            let reason = ci
                .status
                .as_ref()
                .and_then(|s| kube_plan::conditions::get(&s.conditions, "PullProgress"))
                .map(|c| c.reason.clone());
            if let Some(reason) = reason {
                seen.lock().unwrap().insert((ci.name_any(), reason));
            }
        }
    });
    let mut names = Vec::new();
    for (suffix, image, policy) in refs {
        let name = format!("{}-{suffix}", ns.name());
        let spec = CachedImageSpec {
            image: image.into(),
            tag: Some("slow-3s".into()),
            node_selector: pool.clone(),
            policy_ref: Some(PolicyReference {
                name: policy.clone(),
            }),
            ..CachedImageSpec::default()
        };
        drop.create(&images, CachedImage::new(&name, spec)).await;
        names.push(name);
    }

    for name in &names {
        e2e::wait_until(&images, name, 90, "Ready 3/3", |ci| {
            ci.status.as_ref().and_then(|s| s.ready.as_deref()) == Some("3/3")
        })
        .await;
    }
    let records = recorder.records();
    let hub: Vec<_> = records
        .iter()
        .filter(|r| r.image != names[2])
        .cloned()
        .collect();
    let most = PodRecorder::max_in_flight(&hub);
    let all = PodRecorder::max_in_flight(&records);
    println!("registry budget 2: at most {most} docker.io pulls in flight ({all} with ghcr.io)");
    assert!(most <= 2, "{most} docker.io pulls in flight: {hub:?}");
    assert_eq!(
        hub.len(),
        6,
        "one pull per docker.io image and node: {hub:?}"
    );
    assert!(
        all > most,
        "the other registry is not held by docker.io's budget"
    );
    eventually(
        Duration::from_secs(10),
        "an image reported waiting for docker.io",
        || async {
            let seen = reasons.lock().unwrap().clone();
            seen.iter()
                .find(|(_, r)| r == drop::cachedimage::status::REGISTRY_BUDGET)
                .cloned()
                .ok_or(format!("{seen:?}"))
        },
    )
    .await
    .unwrap();
    watch.abort();

    drop.stop().await;
    for name in &names {
        let _ = images.delete(name, &DeleteParams::default()).await;
    }
    for name in &policy_names {
        let _ = policies.delete(name, &DeleteParams::default()).await;
    }
    std::mem::drop(nodes);
}
