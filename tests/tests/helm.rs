//! The Helm charts: lint and render with the real helm binary, and install on the local control
//! plane, where the operator runs with the chart's ServiceAccount to prove its RBAC is enough (and no
//! wider than needed).

use drop::api::{CachedImage, CachedImagePhase, CachedImageSpec, PullPolicy, PullPolicySpec};
use e2e::{repo, tool};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, Config};
use kube_plan::testing::{TestCluster, eventually};
use std::process::Command;
use std::time::Duration;

fn helm(args: &[&str], kubeconfig: Option<&std::path::Path>) -> (bool, String) {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(args).current_dir(repo());
    if let Some(kc) = kubeconfig {
        cmd.env("KUBECONFIG", kc);
    }
    let out = cmd
        .output()
        .expect("run helm (built by framework/tools/tools.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn helm_charts_lint_cleanly_with_every_option() {
    for args in [
        vec!["lint", "deploy/charts/drop-crds"],
        vec!["lint", "deploy/charts/drop"],
        vec![
            "lint",
            "deploy/charts/drop",
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "dashboard.enabled=true",
            "--set",
            "replicaCount=2",
            "--set",
            "warmup.enabled=true",
            "--set",
            "registryBudgets.docker\\.io=4",
        ],
        vec![
            "lint",
            "deploy/charts/drop",
            "--set",
            "metrics.certSecret=drop-metrics-tls",
            "--set",
            "metrics.serviceMonitor.enabled=true",
        ],
        vec![
            "lint",
            "deploy/charts/drop",
            "--set",
            "metrics.secure=false",
            "--set",
            "metrics.serviceMonitor.enabled=true",
        ],
        vec![
            "lint",
            "deploy/charts/drop",
            "--set",
            "leaderElection.enabled=false",
            "--set",
            "podNamespace.create=false",
            "--set",
            "metrics.enabled=false",
        ],
    ] {
        let (ok, out) = helm(&args, None);
        assert!(
            ok && out.contains("0 chart(s) failed"),
            "helm {args:?}:\n{out}"
        );
    }
}

#[test]
fn helm_refuses_replicas_without_leader_election() {
    let (ok, out) = helm(
        &[
            "template",
            "r",
            "deploy/charts/drop",
            "--set",
            "replicaCount=2",
            "--set",
            "leaderElection.enabled=false",
        ],
        None,
    );
    assert!(!ok);
    assert!(
        out.contains("replicaCount > 1 needs leaderElection.enabled=true"),
        "{out}"
    );
}

#[test]
fn helm_rendered_crds_equal_the_generated_ones() {
    let (ok, out) = helm(&["template", "r", "deploy/charts/drop-crds"], None);
    assert!(ok, "{out}");
    let mut rendered: Vec<CustomResourceDefinition> =
        serde_saphyr::from_multiple::<serde_json::Value>(&out)
            .unwrap()
            .into_iter()
            .filter(|d| !d.is_null())
            .map(|d| serde_json::from_value(d).unwrap())
            .collect();
    for crd in &mut rendered {
        let ann = crd.metadata.annotations.take().unwrap_or_default();
        assert_eq!(
            ann.get("helm.sh/resource-policy").map(String::as_str),
            Some("keep"),
            "CRDs survive uninstall"
        );
    }
    rendered.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut generated = drop::api::crds();
    generated.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    assert_eq!(
        serde_json::to_value(&rendered).unwrap(),
        serde_json::to_value(&generated).unwrap()
    );
}

#[test]
fn helm_operator_pod_is_locked_down() {
    let docs = render(&["replicaCount=2"]);
    let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    let args = operator_args(&docs);
    assert!(args.contains(&"--leader-elect".to_owned()), "{args:?}");
    assert!(
        args.contains(&"--node-status-max-images=50".to_owned()),
        "{args:?}"
    );
    let unlimited = operator_args(&render(&["nodeStatusMaxImages=-1"]));
    assert!(
        unlimited.contains(&"--node-status-max-images=-1".to_owned()),
        "{unlimited:?}"
    );
    let ns = docs.iter().find(|d| d["kind"] == "Namespace").unwrap();
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
}

fn render(sets: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["template", "r", "deploy/charts/drop"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let (ok, out) = helm(&args, None);
    assert!(ok, "{out}");
    serde_saphyr::from_multiple(&out).unwrap()
}

fn operator_args(docs: &[serde_json::Value]) -> Vec<String> {
    let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    dep["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

fn cluster_role<'a>(docs: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    docs.iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == name)
}

/// What the chart renders for `/metrics`: secure by default (the flag, port 8443, the review rights
/// for the operator and a reader role for scrapers), a mounted certificate when one is named, an
/// HTTPS ServiceMonitor, and plain HTTP without any of it when turned off.
#[test]
fn helm_metrics_chart_serves_securely_by_default_and_can_turn_it_off() {
    let docs = render(&["metrics.serviceMonitor.enabled=true"]);
    let args = operator_args(&docs);
    assert!(args.contains(&"--metrics-secure".to_owned()), "{args:?}");
    assert!(
        args.contains(&"--metrics-bind-address=:8443".to_owned()),
        "{args:?}"
    );
    assert!(
        !args.iter().any(|a| a.starts_with("--metrics-cert-dir")),
        "{args:?}"
    );
    let auth = cluster_role(&docs, "r-drop-metrics-auth").expect("review rights");
    let rules = serde_json::to_string(&auth["rules"]).unwrap();
    assert!(
        rules.contains("tokenreviews") && rules.contains("subjectaccessreviews"),
        "{rules}"
    );
    let reader = cluster_role(&docs, "r-drop-metrics-reader").expect("reader role");
    assert_eq!(reader["rules"][0]["nonResourceURLs"][0], "/metrics");
    assert_eq!(reader["rules"][0]["verbs"], serde_json::json!(["get"]));
    let monitor = docs.iter().find(|d| d["kind"] == "ServiceMonitor").unwrap();
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["scheme"], "https");
    assert_eq!(endpoint["tlsConfig"]["insecureSkipVerify"], true);
    assert!(
        endpoint["bearerTokenFile"]
            .as_str()
            .unwrap()
            .ends_with("/token")
    );

    let docs = render(&["metrics.certSecret=drop-metrics-tls"]);
    let args = operator_args(&docs);
    assert!(
        args.contains(&"--metrics-cert-dir=/etc/drop/metrics-certs".to_owned()),
        "{args:?}"
    );
    let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"][0]["secret"]["secretName"],
        "drop-metrics-tls"
    );
    assert_eq!(
        pod["containers"][0]["volumeMounts"][0]["mountPath"],
        "/etc/drop/metrics-certs"
    );

    let docs = render(&[
        "metrics.secure=false",
        "metrics.port=8080",
        "metrics.serviceMonitor.enabled=true",
    ]);
    let args = operator_args(&docs);
    assert!(!args.contains(&"--metrics-secure".to_owned()), "{args:?}");
    assert!(
        args.contains(&"--metrics-bind-address=:8080".to_owned()),
        "{args:?}"
    );
    assert!(cluster_role(&docs, "r-drop-metrics-auth").is_none());
    assert!(cluster_role(&docs, "r-drop-metrics-reader").is_none());
    let monitor = docs.iter().find(|d| d["kind"] == "ServiceMonitor").unwrap();
    assert!(monitor["spec"]["endpoints"][0].get("scheme").is_none());
}

/// A client that authenticates as the ServiceAccount, with a short-lived token.
async fn client_as(admin: &Client, cluster: &TestCluster, namespace: &str, sa: &str) -> Client {
    let token = e2e::identity::token(admin, namespace, sa, 1).await.unwrap();
    let admin_kc: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(cluster.kubeconfig()).unwrap()).unwrap();
    let kc = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": admin_kc["clusters"],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": admin_kc["clusters"][0]["name"], "user": "sa"}}],
        "current-context": "sa",
    });
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&kc.to_string()).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

async fn allowed(
    client: &Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                namespace: namespace.map(Into::into),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    api.create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap()
        .allowed
}

#[tokio::test]
async fn helm_install_gives_the_operator_exactly_the_rights_it_uses() {
    kube_plan::install_crypto_provider();
    kube_plan::testing::init_logging();
    // A cluster of its own: the shared one has CRDs that Helm does not own.
    let cluster = TestCluster::start(1).unwrap();
    let kc = cluster.kubeconfig().to_path_buf();
    let admin = cluster.client().await.unwrap();

    let (ok, out) = helm(
        &["install", "drop-crds", "deploy/charts/drop-crds", "--wait"],
        Some(&kc),
    );
    assert!(ok, "{out}");
    let (ok, out) = helm(
        &[
            "install",
            "drop",
            "deploy/charts/drop",
            "-n",
            "drop-operator",
            "--create-namespace",
            "--wait",
            "--timeout",
            "90s",
        ],
        Some(&kc),
    );
    assert!(ok, "{out}");

    // The operator, out of cluster, as the chart's ServiceAccount, configured as the chart runs it.
    let sa_client = client_as(&admin, &cluster, "drop-operator", "drop").await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = drop::operator::Settings {
        pull_timeout: Duration::from_secs(120),
        leader_election: Some(kube_plan::LeaderElection::new(
            "drop-leader",
            "drop-operator",
            "e2e-operator",
        )),
        ..drop::operator::Settings::default()
    };
    let running = tokio::spawn(drop::operator::run(
        sa_client.clone(),
        settings,
        async move {
            let _ = stopped.await;
        },
    ));

    let policies: Api<PullPolicy> = Api::all(admin.clone());
    policies
        .create(
            &PostParams::default(),
            &PullPolicy::new("helm", PullPolicySpec::default()),
        )
        .await
        .unwrap();
    let images: Api<CachedImage> = Api::all(admin.clone());
    let spec = CachedImageSpec {
        image: "docker.io/library/nginx".into(),
        tag: Some("1.27".into()),
        policy_ref: Some(drop::api::PolicyReference {
            name: "helm".into(),
        }),
        ..CachedImageSpec::default()
    };
    images
        .create(
            &PostParams::default(),
            &CachedImage::new("helm-basic", spec),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "Ready with the chart's RBAC",
        || async {
            let ci = images.get("helm-basic").await.map_err(|e| e.to_string())?;
            let status = ci.status.unwrap_or_default();
            let recon =
                kube_plan::conditions::get(&status.conditions, kube_plan::controller::RECONCILED)
                    .map(|c| c.message.clone());
            if status.phase == Some(CachedImagePhase::Ready) {
                Ok(())
            } else {
                Err(format!("{:?} {recon:?}", status.phase))
            }
        },
    )
    .await
    .unwrap();

    // Exactly what it uses: the needed rights are there, wider ones are not.
    for (verb, group, resource, ns) in [
        ("create", "", "pods", Some("drop-system")),
        ("delete", "", "pods", Some("drop-system")),
        ("patch", "drop.corewire.io", "cachedimages/status", None),
        ("patch", "drop.corewire.io", "cachedimagesets/status", None),
        ("create", "drop.corewire.io", "cachedimages", None),
        ("watch", "drop.corewire.io", "discoverypolicies", None),
        (
            "patch",
            "drop.corewire.io",
            "discoverypolicies/status",
            None,
        ),
        ("get", "", "secrets", Some("drop-system")),
        ("watch", "", "nodes", None),
        ("create", "events.k8s.io", "events", Some("default")),
        (
            "update",
            "coordination.k8s.io",
            "leases",
            Some("drop-operator"),
        ),
    ] {
        assert!(
            allowed(&sa_client, verb, group, resource, ns).await,
            "needs {verb} {resource} in {ns:?}"
        );
    }
    for (verb, group, resource, ns) in [
        ("create", "", "pods", Some("default")),
        ("list", "", "pods", None),
        ("get", "", "secrets", Some("kube-system")),
        ("delete", "", "nodes", None),
        ("update", "drop.corewire.io", "cachedimages", None),
        ("delete", "drop.corewire.io", "cachedimagesets", None),
        ("list", "", "secrets", Some("drop-system")),
        (
            "create",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            None,
        ),
        ("create", "events.k8s.io", "events", Some("kube-system")),
        (
            "update",
            "coordination.k8s.io",
            "leases",
            Some("kube-system"),
        ),
    ] {
        assert!(
            !allowed(&sa_client, verb, group, resource, ns).await,
            "must not {verb} {resource} in {ns:?}"
        );
    }

    // Warm-up adds exactly one right: patching Nodes (to remove the taint).
    assert!(!allowed(&sa_client, "patch", "", "nodes", None).await);
    let (ok, out) = helm(
        &[
            "upgrade",
            "drop",
            "deploy/charts/drop",
            "-n",
            "drop-operator",
            "--reuse-values",
            "--set",
            "warmup.enabled=true",
            "--wait",
            "--timeout",
            "90s",
        ],
        Some(&kc),
    );
    assert!(ok, "{out}");
    assert!(allowed(&sa_client, "patch", "", "nodes", None).await);
    for verb in ["update", "delete", "create"] {
        assert!(
            !allowed(&sa_client, verb, "", "nodes", None).await,
            "{verb} nodes"
        );
    }

    let _ = stop.send(());
    running.await.unwrap().unwrap();

    // Uninstall: nothing of the release is left; the CRDs (and so users' objects) stay.
    let (ok, out) = helm(
        &["uninstall", "drop", "-n", "drop-operator", "--wait"],
        Some(&kc),
    );
    assert!(ok, "{out}");
    let (ok, out) = helm(&["uninstall", "drop-crds", "--wait"], Some(&kc));
    assert!(ok, "{out}");
    let release = ListParams::default().labels("app.kubernetes.io/instance=drop");
    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(admin.clone());
    assert!(roles.list(&release).await.unwrap().items.is_empty());
    let bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> = Api::all(admin.clone());
    assert!(bindings.list(&release).await.unwrap().items.is_empty());
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::all(admin.clone());
    assert!(deployments.list(&release).await.unwrap().items.is_empty());
    let sas: Api<ServiceAccount> = Api::all(admin.clone());
    assert!(sas.list(&release).await.unwrap().items.is_empty());
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    assert!(
        crds.get_opt("cachedimages.drop.corewire.io")
            .await
            .unwrap()
            .is_some(),
        "CRDs stay"
    );
    assert!(
        images.get_opt("helm-basic").await.unwrap().is_some(),
        "and so do users' objects"
    );
}

/// The chart's default: `/metrics` over HTTPS, for callers allowed to read it. The operator runs
/// out of cluster as the chart's ServiceAccount with the chart's metrics flags, so the chart's RBAC
/// must let it review callers; a ServiceAccount bound to the chart's metrics-reader role gets the
/// metrics, one without it is refused, and so are callers without a (valid) token.
#[tokio::test]
async fn helm_metrics_are_served_over_tls_only_to_allowed_callers() {
    kube_plan::install_crypto_provider();
    kube_plan::testing::init_logging();
    let (cluster, admin) = e2e::cluster().await.unwrap();
    e2e::install_drop_crds(&admin).await.unwrap();
    let kc = cluster.kubeconfig().to_path_buf();
    let ns = "helm-metrics";
    let (ok, out) = helm(
        &[
            "upgrade",
            "--install",
            "metrics",
            "deploy/charts/drop",
            "-n",
            ns,
            "--create-namespace",
            "--set",
            "podNamespace.name=helm-metrics-pods",
            "--set",
            "leaderElection.enabled=false",
        ],
        Some(&kc),
    );
    assert!(ok, "{out}");
    let sa = "metrics-drop";
    let operator = client_as(&admin, cluster, ns, sa).await;

    // Drop as the chart runs it: its flags for metrics (the default values), nothing to reconcile.
    let port = e2e::fixtures::free_port();
    let health_port = e2e::fixtures::free_port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = drop::operator::Settings {
        pod_namespace: "helm-metrics-pods".into(),
        pull_timeout: Duration::from_secs(120),
        metrics_addr: Some(format!("127.0.0.1:{port}").parse().unwrap()),
        metrics_tls: Some(kube_plan::metrics_auth::Certificate::SelfSigned),
        health_addr: Some(format!("127.0.0.1:{health_port}").parse().unwrap()),
        watch_selector: Some("e2e.drop.corewire.io/none=none".into()),
        ..drop::operator::Settings::default()
    };
    let running = tokio::spawn(drop::operator::run(operator, settings, async move {
        let _ = stopped.await;
    }));

    // A scraper bound to the chart's reader role, and a stranger who is not.
    use e2e::identity::{service_account, token};
    let reader = Some("metrics-drop-metrics-reader");
    service_account(&admin, ns, "scraper", reader)
        .await
        .unwrap();
    service_account(&admin, ns, "stranger", None).await.unwrap();
    let scraper = token(&admin, ns, "scraper", 1).await.unwrap();
    let stranger = token(&admin, ns, "stranger", 1).await.unwrap();

    // The chart's default certificate is self-signed: a scraper skips verifying it.
    let https = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}/metrics");
    let get = |token: Option<String>, url: String| {
        let https = https.clone();
        async move {
            let mut req = https.get(&url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            Ok::<_, String>((status, resp.text().await.unwrap_or_default()))
        }
    };
    // Served once the operator is up; the reader gets the metrics.
    let body = eventually(Duration::from_secs(60), "metrics for the reader", || {
        let (token, url) = (scraper.clone(), url.clone());
        async move {
            match get(Some(token), url).await? {
                (200, body) => Ok(body),
                (status, body) => Err(format!("{status}: {body}")),
            }
        }
    })
    .await
    .unwrap();
    assert!(body.contains("drop_active_pulls"), "{body}");

    let (status, body) = get(Some(stranger.clone()), url.clone()).await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("system:serviceaccount:helm-metrics:stranger"),
        "{body}"
    );
    let (status, _) = get(None, url.clone()).await.unwrap();
    assert_eq!(status, 401);
    let (status, _) = get(Some("not-a-token".into()), url.clone()).await.unwrap();
    assert_eq!(status, 401);
    // Only /metrics is there; the probes stay on their own port.
    let (status, _) = get(
        Some(scraper.clone()),
        format!("https://127.0.0.1:{port}/healthz"),
    )
    .await
    .unwrap();
    assert_eq!(status, 404);
    // The probes' port serves the probes in clear text, and not the metrics.
    let plain = |path: &str| {
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{health_port}{path}"))
            .send()
    };
    assert_eq!(plain("/healthz").await.unwrap().status().as_u16(), 200);
    assert_eq!(plain("/metrics").await.unwrap().status().as_u16(), 404);
    // Nothing is served in clear text on the metrics port.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .bearer_auth(&scraper)
        .send()
        .await;
    assert!(
        plain.as_ref().map_or(true, |r| !r.status().is_success()),
        "{plain:?}"
    );

    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let bindings: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(admin.clone());
    let _ = bindings
        .delete("helm-metrics-scraper", &Default::default())
        .await;
    let (ok, out) = helm(&["uninstall", "metrics", "-n", ns, "--wait"], Some(&kc));
    assert!(ok, "{out}");
}
