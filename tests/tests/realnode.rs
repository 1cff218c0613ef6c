//! Drop on a real kubelet: images really pulled into the real node's containerd
//! (`tests/harness/realnode.sh`), read back with `ctr`, not only from Drop's status.

use drop::api::{
    CachedImage, CachedImagePhase, CachedImageSpec, PolicyReference, PullPolicy, PullPolicySpec,
};
use e2e::realnode::RealNode;
use e2e::{DropUnderTest, cluster, fixtures};
use k8s_openapi::api::core::v1::{Event, LocalObjectReference, Node, Pod, Secret};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use kube_plan::testing::{TestNamespace, eventually};
use std::time::Duration;

struct Scene {
    node: RealNode,
    ns: TestNamespace,
    drop: DropUnderTest,
    images: Api<CachedImage>,
    pods: Api<Pod>,
    client: Client,
}

async fn scene(id: &str) -> Scene {
    scene_with(id, |_| {}).await
}

async fn scene_with(id: &str, adjust: impl FnOnce(&mut drop::operator::Settings)) -> Scene {
    let (cluster, client) = cluster().await.unwrap();
    let node = RealNode::ensure(cluster);
    let ns = cluster.namespace(&client, id).await.unwrap();
    let drop = DropUnderTest::start_with(&client, ns.name(), ns.name(), adjust).await;
    Scene {
        node,
        images: Api::all(client.clone()),
        pods: Api::namespaced(client.clone(), ns.name()),
        ns,
        drop,
        client,
    }
}

impl Scene {
    /// A CachedImage of `image:tag` on the real node only.
    async fn cache(&self, suffix: &str, image: &str, tag: &str) -> String {
        self.cache_with(suffix, image, tag, |_| {}).await
    }

    /// Like [`Scene::cache`], with `adjust` changing the spec first.
    async fn cache_with(
        &self,
        suffix: &str,
        image: &str,
        tag: &str,
        adjust: impl FnOnce(&mut CachedImageSpec),
    ) -> String {
        let name = format!("{}-{suffix}", self.ns.name());
        let (node_selector, tolerations) = self.node.placement();
        let mut spec = CachedImageSpec {
            image: image.to_owned(),
            tag: Some(tag.to_owned()),
            node_selector,
            tolerations,
            ..CachedImageSpec::default()
        };
        adjust(&mut spec);
        self.drop
            .create(&self.images, CachedImage::new(&name, spec))
            .await;
        name
    }

    async fn wait_image(
        &self,
        name: &str,
        what: &str,
        ok: impl Fn(&CachedImage) -> bool,
    ) -> CachedImage {
        match e2e::try_wait_until(&self.images, name, 120, what, ok).await {
            Ok(image) => image,
            Err(e) => panic!("{e}\nthe real node at the end: {}", self.node_state().await),
        }
    }

    /// The real node's taints and conditions: what decides whether it is an image's target.
    async fn node_state(&self) -> String {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = match nodes.get(&self.node.name).await {
            Ok(node) => node,
            Err(e) => return format!("not readable: {e}"),
        };
        let spec = node.spec.unwrap_or_default();
        let taints: Vec<String> = spec
            .taints
            .unwrap_or_default()
            .into_iter()
            .map(|t| format!("{}:{}", t.key, t.effect))
            .collect();
        let conditions: Vec<String> = node
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                format!(
                    "{}={} ({})",
                    c.type_,
                    c.status,
                    c.message.unwrap_or_default()
                )
            })
            .collect();
        format!(
            "unschedulable: {}, taints: {taints:?}, conditions: {conditions:?}",
            spec.unschedulable.unwrap_or(false)
        )
    }

    /// Waits until no pull Pod is left in the namespace.
    async fn no_pull_pods_left(&self) {
        eventually(Duration::from_secs(60), "pull Pods gone", || async {
            let left = self
                .pods
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            let names: Vec<String> = left.items.iter().map(ResourceExt::name_any).collect();
            if names.is_empty() {
                Ok(())
            } else {
                Err(format!("left: {names:?}"))
            }
        })
        .await
        .unwrap();
    }

    /// Warning Events about Pods of the namespace, as `reason: message`.
    async fn pod_warnings(&self) -> Vec<String> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), self.ns.name());
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .filter(|e| e.involved_object.kind.as_deref() == Some("Pod"))
            .map(|e| {
                format!(
                    "{} x{}: {}",
                    e.reason.unwrap_or_default(),
                    e.count.unwrap_or(1),
                    e.message.unwrap_or_default()
                )
            })
            .collect()
    }

    fn show(&self, ci: &CachedImage) {
        eprintln!(
            "status of {} ({}):\n{}",
            ci.name_any(),
            ci.spec.reference(),
            serde_json::to_string_pretty(&ci.status).unwrap()
        );
    }
}

/// A Pod that runs `image` on the real node without pulling it (`imagePullPolicy: Never`), meeting
/// the restricted Pod Security profile of the namespace.
fn run_without_pull(node: &RealNode, name: &str, image: &str) -> Pod {
    let (_, tolerations) = node.placement();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeName": node.name,
            "restartPolicy": "Never",
            "tolerations": tolerations,
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65534, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "run", "image": image, "imagePullPolicy": "Never", "command": ["/bin/true"],
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }))
    .unwrap()
}

#[tokio::test]
async fn realnode_images_land_in_containerd_and_then_run_without_a_pull() {
    let s = scene("realnode-cache").await;
    let ns = s.ns.name();
    let busybox = s
        .node
        .copy_image("busybox:1", &format!("{ns}/busybox:1"))
        .await;
    let distroless = s
        .node
        .copy_image("distroless:1", &format!("{ns}/distroless:1"))
        .await;
    let registry = &s.node.registry;
    let cases = [
        ("busybox", format!("{registry}/{ns}/busybox"), busybox),
        (
            "distroless",
            format!("{registry}/{ns}/distroless"),
            distroless,
        ),
    ];
    for (suffix, image, _) in &cases {
        s.cache(suffix, image, "1").await;
    }
    for (suffix, image, digest) in &cases {
        let name = format!("{ns}-{suffix}");
        let ci = s
            .wait_image(&name, "cached on the real node", |ci| {
                ci.status.as_ref().is_some_and(|st| {
                    st.phase == Some(CachedImagePhase::Ready)
                        && st.cached_nodes.iter().eq([s.node.name.as_str()])
                })
            })
            .await;
        s.show(&ci);
        let status = ci.status.unwrap();
        assert_eq!(
            status.resolved_digest.as_ref(),
            Some(digest),
            "{suffix}: the digest the registry serves"
        );
        // The node's containerd holds it under its name, with that digest.
        let held = s.node.images();
        assert_eq!(
            held.get(&format!("{image}:1")),
            Some(digest),
            "containerd's images: {held:?}"
        );
    }
    s.no_pull_pods_left().await;

    // A workload now starts from the cache: `Never` would fail with ErrImageNeverPull otherwise.
    let run = run_without_pull(&s.node, "from-cache", &format!("{registry}/{ns}/busybox:1"));
    s.pods.create(&PostParams::default(), &run).await.unwrap();
    let pod = eventually(Duration::from_secs(60), "Pod ran", || async {
        let p = s.pods.get("from-cache").await.map_err(|e| e.to_string())?;
        match p.status.as_ref().and_then(|st| st.phase.as_deref()) {
            Some("Succeeded") | Some("Failed") => Ok(p),
            _ => Err(format!("{:?}", p.status)),
        }
    })
    .await
    .unwrap();
    let phase = pod.status.as_ref().and_then(|st| st.phase.clone());
    assert_eq!(phase.as_deref(), Some("Succeeded"), "{:?}", pod.status);

    // What the pulls cost in Warning Events: the pull container never runs (its command does not
    // exist), so each pull leaves one `Failed` start error; no pull error.
    let warnings = s.pod_warnings().await;
    eprintln!("Warning Events of the 2 pulls: {warnings:#?}");
    assert!(
        warnings
            .iter()
            .all(|w| w.starts_with("Failed") && !w.contains("ErrImagePull")),
        "{warnings:#?}"
    );
}

#[tokio::test]
async fn realnode_unreachable_registry_and_missing_tag_are_reported_and_leave_no_pod() {
    let s = scene("realnode-fail").await;
    let ns = s.ns.name();
    s.node
        .copy_image("busybox:1", &format!("{ns}/busybox:1"))
        .await;
    let closed = format!("127.0.0.1:{}", fixtures::closed_port());
    let cases = [
        ("unreachable", format!("{closed}/{ns}/x"), "1"),
        (
            "missing-tag",
            format!("{}/{ns}/busybox", s.node.registry),
            "nope",
        ),
    ];
    for (suffix, image, tag) in &cases {
        s.cache(suffix, image, tag).await;
    }
    for (suffix, _, _) in &cases {
        let name = format!("{ns}-{suffix}");
        let ci = s
            .wait_image(&name, "the pull failure reported", |ci| {
                ci.status.as_ref().is_some_and(|st| {
                    st.consecutive_failures >= 1
                        && st.failed_nodes.iter().any(|f| f.node == s.node.name)
                })
            })
            .await;
        s.show(&ci);
        let status = ci.status.unwrap();
        let failure = &status.failed_nodes[0];
        assert!(
            ["ErrImagePull", "ImagePullBackOff"].contains(&failure.reason.as_str()),
            "{suffix}: {failure:?}"
        );
        let expected = match *suffix {
            "unreachable" => "connection refused",
            _ => "not found",
        };
        assert!(
            failure.message.contains(expected),
            "{suffix}: {}",
            failure.message
        );
        assert!(status.cached_nodes.is_empty());
        assert_ne!(status.phase, Some(CachedImagePhase::Ready));
    }
    // Failed pulls give their Pods up; the retries wait out the backoff (30 s at first).
    s.no_pull_pods_left().await;
    assert!(
        s.node
            .images()
            .keys()
            .all(|r| !r.contains(&format!("/{ns}/"))),
        "nothing of this test reached containerd"
    );
}

#[tokio::test]
async fn realnode_a_private_registry_needs_the_image_pull_secret() {
    let s = scene("realnode-private").await;
    // TLS with the test's own CA, client certificates required, and basic auth.
    let pki = fixtures::Pki::generate();
    let registry = fixtures::Registry::start_secured(&pki, "ci-bot", "pull-only-token").await;
    let host = registry.host().to_owned();
    let busybox = s.node.export("busybox:1").await;
    registry.put_image("team/app", "1", &busybox).await;
    registry.put_image("team/other", "1", &busybox).await;
    // The node trusts the CA and presents the client certificate (what a platform team sets up in
    // containerd's hosts directory); the credentials come from the Pod's imagePullSecrets.
    s.node.configure_registry(
        &host,
        &format!(
            "server = \"https://{host}\"\n[host.\"https://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  \
             ca = \"{ca}\"\n  client = [[\"{crt}\", \"{key}\"]]\n",
            ca = pki.path("ca.crt").display(),
            crt = pki.path("client.crt").display(),
            key = pki.path("client.key").display(),
        ),
    );
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        "ci-bot:pull-only-token",
    );
    let config = serde_json::json!({"auths": {host.clone(): {"auth": auth}}});
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "registry-login"},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": config.to_string()},
    }))
    .unwrap();
    Api::<Secret>::namespaced(s.client.clone(), s.ns.name())
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    let with = s
        .cache_with("with-secret", &format!("{host}/team/app"), "1", |spec| {
            spec.image_pull_secrets = vec![LocalObjectReference {
                name: "registry-login".into(),
            }];
        })
        .await;
    let without = s
        .cache("without-secret", &format!("{host}/team/other"), "1")
        .await;
    let ci = s
        .wait_image(&with, "cached with the secret", |ci| {
            ci.status
                .as_ref()
                .is_some_and(|st| st.phase == Some(CachedImagePhase::Ready))
        })
        .await;
    s.show(&ci);
    assert_eq!(
        ci.status.unwrap().resolved_digest.as_ref(),
        Some(&busybox.digest)
    );
    assert!(
        s.node.images().contains_key(&format!("{host}/team/app:1")),
        "in containerd"
    );
    let ci = s
        .wait_image(&without, "refused without the secret", |ci| {
            ci.status
                .as_ref()
                .is_some_and(|st| st.failed_nodes.iter().any(|f| f.node == s.node.name))
        })
        .await;
    s.show(&ci);
    let failure = ci.status.unwrap().failed_nodes[0].clone();
    assert!(
        ["ErrImagePull", "ImagePullBackOff"].contains(&failure.reason.as_str()),
        "{failure:?}"
    );
    assert!(
        failure.message.contains("401") || failure.message.contains("nauthorized"),
        "the message says the registry refused: {}",
        failure.message
    );
}

/// Caches `busybox:1` (a copy of its own) under `policy`, removes it from the node's containerd
/// behind Drop's back, and returns how long it took to be back.
async fn removed_and_back(s: &Scene, policy: PullPolicySpec) -> Duration {
    let ns = s.ns.name();
    s.node
        .copy_image("busybox:1", &format!("{ns}/busybox:1"))
        .await;
    let name = format!("{ns}-policy");
    s.drop
        .create(&Api::all(s.client.clone()), PullPolicy::new(&name, policy))
        .await;
    let image = format!("{}/{ns}/busybox", s.node.registry);
    let ci = s
        .cache_with("busybox", &image, "1", |spec| {
            spec.policy_ref = Some(PolicyReference { name: name.clone() });
        })
        .await;
    s.wait_image(&ci, "cached", |ci| {
        ci.status
            .as_ref()
            .is_some_and(|st| st.phase == Some(CachedImagePhase::Ready))
    })
    .await;
    let reference = format!("{image}:1");
    assert!(s.node.images().contains_key(&reference));
    // Let the kubelet list it in the Node's status first (Drop only trusts a disappearance).
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(s.client.clone());
    eventually(
        Duration::from_secs(120),
        "listed by the kubelet",
        || async {
            let node = nodes.get(&s.node.name).await.map_err(|e| e.to_string())?;
            let listed = node
                .status
                .and_then(|st| st.images)
                .unwrap_or_default()
                .iter()
                .any(|i| i.names.iter().flatten().any(|n| *n == reference));
            if listed {
                Ok(())
            } else {
                Err("not listed yet".to_owned())
            }
        },
    )
    .await
    .unwrap();

    // Someone removes it from the node (crictl rmi, a disk clean-up, image GC).
    s.node.remove_image(&reference);
    let removed = std::time::Instant::now();
    assert!(!s.node.images().contains_key(&reference));
    eventually(Duration::from_secs(150), "pulled again", || async {
        if s.node.images().contains_key(&reference) {
            Ok(())
        } else {
            Err("not in containerd".to_owned())
        }
    })
    .await
    .unwrap();
    let took = removed.elapsed();
    let ci = s
        .wait_image(&ci, "cached again", |ci| {
            ci.status.as_ref().is_some_and(|st| {
                st.phase == Some(CachedImagePhase::Ready)
                    && st.cached_nodes.iter().eq([s.node.name.as_str()])
            })
        })
        .await;
    s.show(&ci);
    took
}

#[tokio::test]
async fn realnode_an_image_the_node_stops_listing_is_pulled_again() {
    let s = scene("realnode-gone").await;
    // No refresh: only the node's own image list can tell.
    let took = removed_and_back(&s, PullPolicySpec::default()).await;
    eprintln!(
        "back in containerd {:.1} s after its removal (from the node's image list)",
        took.as_secs_f64()
    );
}

#[tokio::test]
async fn realnode_with_a_full_image_list_a_removed_image_returns_at_its_repull() {
    // A kubelet listing at most one image always has a full list here (the sandbox image alone
    // fills it): absence proves nothing, and the refresh is what brings the image back.
    let s = scene_with("realnode-full", |settings| {
        settings.node_status_max_images = 1
    })
    .await;
    let took = removed_and_back(
        &s,
        PullPolicySpec {
            // The shortest refresh the API accepts.
            repull_interval: Some(Duration::from_secs(60).into()),
            min_delay_between_pulls: Some(Duration::ZERO.into()),
            ..PullPolicySpec::default()
        },
    )
    .await;
    eprintln!(
        "back in containerd {:.1} s after its removal (repullInterval 60 s, full image list)",
        took.as_secs_f64()
    );
}

/// The pull Pod's container never runs (its command exists in no image), which costs one Warning
/// Event per pull. The known way around it, a static helper copied in by an init container, is
/// measured here beside Drop's design on the real kubelet: Events, and time until the pull is
/// known. Figures are printed (docs/pull-pods.md), not asserted.
#[tokio::test]
async fn realnode_pull_pod_designs_compared() {
    let s = scene("realnode-designs").await;
    let ns = s.ns.name().to_owned();
    let registry = s.node.registry.clone();
    let (node_selector, tolerations) = s.node.placement();
    let mut rows = Vec::new();
    for (i, kind) in ["busybox", "distroless", "busybox", "distroless"]
        .iter()
        .enumerate()
    {
        for helper in [false, true] {
            let repo = format!("{ns}/{kind}-{i}-{}", if helper { "helper" } else { "drop" });
            s.node
                .copy_image(&format!("{kind}:1"), &format!("{repo}:1"))
                .await;
            let mut image = CachedImage::new(
                &format!("d{i}{}", u8::from(helper)),
                CachedImageSpec {
                    image: format!("{registry}/{repo}"),
                    tag: Some("1".into()),
                    node_selector: node_selector.clone(),
                    tolerations: tolerations.clone(),
                    ..CachedImageSpec::default()
                },
            );
            // Never created: the Pods stand alone (no owner to collect them).
            image.metadata.uid = Some(format!("uid-{i}"));
            let mut pod = drop::podbuilder::build(&drop::podbuilder::PullPod {
                image: &image,
                node: &s.node.name,
                namespace: &ns,
                policy: None,
                attempt: 1,
                tolerations: &[],
            })
            .unwrap();
            pod.metadata.owner_references = None;
            if helper {
                with_helper(&mut pod, &format!("{registry}/busybox:1"));
            }
            let name = pod.name_any();
            let created = std::time::Instant::now();
            s.pods.create(&PostParams::default(), &pod).await.unwrap();
            let done = e2e::wait_until(&s.pods, &name, 60, "pull Pod settled", |p| {
                matches!(
                    p.status.as_ref().and_then(|st| st.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
            })
            .await;
            let took = created.elapsed().as_secs_f64();
            let status = done.status.unwrap();
            let pulled = status
                .container_statuses
                .iter()
                .flatten()
                .any(|c| c.name == drop::podbuilder::CONTAINER && !c.image_id.is_empty());
            assert!(pulled, "{name}: the image was pulled");
            rows.push((helper, *kind, name, status.phase.unwrap_or_default(), took));
        }
    }
    let events: Api<Event> = Api::namespaced(s.client.clone(), &ns);
    let all = events.list(&Default::default()).await.unwrap().items;
    let warnings = |pod: &str| {
        all.iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(pod))
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .map(|e| e.count.unwrap_or(1))
            .sum::<i32>()
    };
    eprintln!("design      image       phase      seconds  warnings");
    for (helper, kind, name, phase, took) in &rows {
        let design = if *helper { "helper" } else { "drop" };
        eprintln!(
            "{design:<11} {kind:<11} {phase:<10} {took:>7.2}  {}",
            warnings(name)
        );
        if *helper {
            assert_eq!(phase, "Succeeded", "{name}");
            assert_eq!(warnings(name), 0, "{name}");
        } else {
            assert_eq!(warnings(name), 1, "{name}: the start error");
        }
    }
}

/// Turns a pull Pod into the helper design: an init container copies a static `true` (busybox,
/// dispatching on its name) from `helper` into a volume, and the pull container runs it.
fn with_helper(pod: &mut Pod, helper: &str) {
    let spec = pod.spec.as_mut().unwrap();
    let pull = spec.containers[0].clone();
    let mut copy = pull.clone();
    copy.name = "helper".into();
    copy.image = Some(helper.into());
    copy.command = Some(vec![
        "/bin/cp".into(),
        "/bin/busybox".into(),
        "/drop-helper/true".into(),
    ]);
    let mount =
        serde_json::from_value(serde_json::json!({"name": "helper", "mountPath": "/drop-helper"}))
            .unwrap();
    copy.volume_mounts = Some(vec![mount]);
    spec.init_containers = Some(vec![copy]);
    spec.volumes = Some(vec![
        serde_json::from_value(
            serde_json::json!({"name": "helper", "emptyDir": {"sizeLimit": "4Mi"}}),
        )
        .unwrap(),
    ]);
    let c = &mut spec.containers[0];
    c.command = Some(vec!["/drop-helper/true".into()]);
    c.volume_mounts = Some(vec![
        serde_json::from_value(
            serde_json::json!({"name": "helper", "mountPath": "/drop-helper", "readOnly": true}),
        )
        .unwrap(),
    ]);
}
