//! Drop's CRDs on a real API server: every invalid object of the table is refused with its message,
//! and every seed sample is accepted (server-side dry runs, so nothing is stored).

use e2e::{cluster, install_drop_crds};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    case: String,
    expect: String,
    object: serde_json::Value,
}

fn api_for(client: &kube::Client, obj: &serde_json::Value) -> Api<DynamicObject> {
    let kind = obj["kind"].as_str().unwrap();
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("drop.corewire.io", "v1alpha1", kind));
    Api::all_with(client.clone(), &ar)
}

fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        ..PostParams::default()
    }
}

#[tokio::test]
async fn api_server_rejects_each_invalid_object_with_its_message() {
    let (_, client) = cluster().await.unwrap();
    install_drop_crds(&client).await.unwrap();
    let table: Vec<Case> =
        serde_saphyr::from_str(include_str!("../../drop/tests/data/invalid-objects.yaml")).unwrap();
    let mut failures = Vec::new();
    for c in &table {
        let obj: DynamicObject = serde_json::from_value(c.object.clone()).unwrap();
        match api_for(&client, &c.object).create(&dry_run(), &obj).await {
            Ok(_) => failures.push(format!("{}: accepted", c.case)),
            Err(kube::Error::Api(s)) if s.code == 422 => {
                if !s.message.contains(&c.expect) {
                    failures.push(format!(
                        "{}: expected {:?} in {:?}",
                        c.case, c.expect, s.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: unexpected error {e}", c.case)),
        }
    }
    println!(
        "{} invalid objects refused with their messages",
        table.len() - failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn api_server_accepts_the_seed_samples_with_defaults_applied() {
    let (_, client) = cluster().await.unwrap();
    install_drop_crds(&client).await.unwrap();
    let samples = include_str!("../../drop/tests/data/samples.yaml");
    for doc in serde_saphyr::from_multiple::<serde_json::Value>(samples).unwrap() {
        if doc.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
        let created = api_for(&client, &doc)
            .create(&dry_run(), &obj)
            .await
            .unwrap_or_else(|e| panic!("sample {} refused: {e}", doc["metadata"]["name"]));
        let spec = &created.data["spec"];
        match doc["kind"].as_str().unwrap() {
            "CachedImage" | "CachedImageSet" => assert_eq!(spec["imagePullPolicy"], "Always"),
            "DiscoveryPolicy" => assert!(spec["maxImages"].is_i64()),
            "PullPolicy" => assert_eq!(spec["maxConcurrentNodes"], 1),
            other => panic!("unexpected kind {other}"),
        }
    }
}

#[tokio::test]
async fn api_server_applies_every_seed_default() {
    let (_, client) = cluster().await.unwrap();
    install_drop_crds(&client).await.unwrap();
    let minimal = [
        serde_json::json!({"apiVersion": "drop.corewire.io/v1alpha1", "kind": "PullPolicy",
            "metadata": {"name": "d"}, "spec": {"failureBackoff": {}}}),
        serde_json::json!({"apiVersion": "drop.corewire.io/v1alpha1", "kind": "DiscoveryPolicy",
            "metadata": {"name": "d"}, "spec": {"sources": [{"type": "prometheus",
            "prometheus": {"endpoint": "http://p:9090", "query": "up"}}]}}),
        serde_json::json!({"apiVersion": "drop.corewire.io/v1alpha1", "kind": "CachedImage",
            "metadata": {"name": "d"}, "spec": {"image": "docker.io/library/nginx"}}),
        serde_json::json!({"apiVersion": "drop.corewire.io/v1alpha1", "kind": "CachedImageSet",
            "metadata": {"name": "d"}, "spec": {}}),
    ];
    let mut specs = Vec::new();
    for doc in minimal {
        let obj: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
        specs.push(
            api_for(&client, &doc)
                .create(&dry_run(), &obj)
                .await
                .unwrap()
                .data["spec"]
                .clone(),
        );
    }
    assert_eq!(specs[0]["maxConcurrentNodes"], 1);
    assert_eq!(specs[0]["minDelayBetweenPulls"], "10s");
    assert_eq!(specs[0]["failureBackoff"]["initial"], "30s");
    assert_eq!(specs[0]["failureBackoff"]["max"], "5m");
    assert_eq!(specs[1]["syncInterval"], "30m");
    assert_eq!(specs[1]["maxImages"], 50);
    assert_eq!(specs[1]["sources"][0]["prometheus"]["step"], "5m");
    assert_eq!(specs[2]["imagePullPolicy"], "Always");
    assert_eq!(specs[3]["imagePullPolicy"], "Always");
}
