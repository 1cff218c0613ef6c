//! The pull Pod on a real API server: admitted where Pod Security "restricted" is enforced, pulled on
//! a simulated node, and garbage-collected with its CachedImage.

use drop::api::{CachedImage, CachedImageSpec};
use drop::podbuilder::{self, PullOutcome, PullPod};
use e2e::{cluster, install_drop_crds};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube_plan::testing::eventually;
use std::time::Duration;

#[tokio::test]
async fn podbuilder_pod_is_admitted_under_restricted_and_collected_with_its_owner() {
    let (cluster, client) = cluster().await.unwrap();
    install_drop_crds(&client).await.unwrap();
    let ns = cluster.namespace(&client, "podbuilder").await.unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let label = serde_json::json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
    namespaces
        .patch(ns.name(), &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();

    let images: Api<CachedImage> = Api::all(client.clone());
    let name = format!("pb-{}", ns.name());
    let ci = images
        .create(
            &PostParams::default(),
            &CachedImage::new(
                &name,
                CachedImageSpec {
                    image: "gcr.io/distroless/static-debian12".into(),
                    tag: Some("nonroot".into()),
                    ..CachedImageSpec::default()
                },
            ),
        )
        .await
        .unwrap();
    let pod = podbuilder::build(&PullPod {
        image: &ci,
        node: "kwok-node-0",
        namespace: ns.name(),
        policy: None,
        attempt: 1,
        tolerations: &[],
    })
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("admitted under restricted");
    let pod_name = created.metadata.name.unwrap();

    let digest = eventually(Duration::from_secs(30), "pull outcome", || async {
        match podbuilder::outcome(&pods.get(&pod_name).await.map_err(|e| e.to_string())?) {
            PullOutcome::Pulled { digest } => Ok(digest),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
    assert!(digest.is_some_and(|d| d.starts_with("sha256:")));

    // A privileged variant is refused by the same namespace: the label is really enforced.
    let mut bad = pod.clone();
    bad.metadata.name = Some(format!("{pod_name}-bad"));
    bad.spec.as_mut().unwrap().containers[0]
        .security_context
        .as_mut()
        .unwrap()
        .allow_privilege_escalation = Some(true);
    let err = pods.create(&PostParams::default(), &bad).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("violates PodSecurity \"restricted"),
        "{err}"
    );

    images
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "pull Pod garbage-collected",
        || async {
            match pods.get_opt(&pod_name).await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(_) => Err("still there".to_owned()),
            }
        },
    )
    .await
    .unwrap();
}
