//! GitOps tools read Drop's objects right: `helm install --wait` (helm 4 waits with kstatus),
//! `kubectl wait --for=condition=Ready`, and the Argo CD health check shipped in `deploy/argocd`, run
//! by a real Lua interpreter against objects the operator wrote.

use drop::api::{
    CachedImage, CachedImageSet, CachedImageSetSpec, CachedImageSpec, DiscoveryPolicy,
    DiscoveryPolicySpec, DiscoverySource, ImageEntry, PolicyReference, PrometheusSource,
    PullPolicy, PullPolicySpec, SourceType,
};
use e2e::fixtures::closed_port;
use e2e::{DropUnderTest, TEST_LABEL, cluster, repo, tool, wait_until};
use kube::api::{Api, PostParams};
use kube::{Client, Resource};
use kube_plan::testing::{TestCluster, TestNamespace, TestNodes};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const POOL: &str = "e2e.drop/pool";

struct Scene {
    cluster: &'static TestCluster,
    client: Client,
    drop: DropUnderTest,
    ns: TestNamespace,
    _nodes: TestNodes,
    policy: String,
}

/// Two nodes of their own, Drop for this test, and a fast PullPolicy.
async fn scene(id: &str) -> Scene {
    let (cluster, client) = cluster().await.unwrap();
    let ns = cluster.namespace(&client, id).await.unwrap();
    let pool = BTreeMap::from([(POOL.to_owned(), ns.name().to_owned())]);
    let nodes = cluster
        .add_nodes(&client, ns.name(), 2, &pool)
        .await
        .unwrap();
    let drop = DropUnderTest::start(&client, ns.name(), ns.name()).await;
    let policy = format!("{}-fast", ns.name());
    let spec = PullPolicySpec {
        max_concurrent_nodes: 4,
        min_delay_between_pulls: Some(Duration::ZERO.into()),
        ..PullPolicySpec::default()
    };
    drop.create(&Api::all(client.clone()), PullPolicy::new(&policy, spec))
        .await;
    Scene {
        cluster,
        client,
        drop,
        ns,
        _nodes: nodes,
        policy,
    }
}

impl Scene {
    fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.ns.name())
    }

    /// A CachedImage of `image:tag` on this scene's nodes.
    fn image(&self, suffix: &str, image: &str, tag: &str) -> CachedImage {
        let mut ci = CachedImage::new(
            &self.name(suffix),
            CachedImageSpec {
                image: image.into(),
                tag: Some(tag.into()),
                node_selector: BTreeMap::from([(POOL.to_owned(), self.ns.name().to_owned())]),
                policy_ref: Some(PolicyReference {
                    name: self.policy.clone(),
                }),
                ..CachedImageSpec::default()
            },
        );
        ci.metadata.labels = Some(self.drop.labels());
        ci
    }

    /// Runs `program` with this cluster's kubeconfig, off the test's runtime (the operator under
    /// test runs on it): whether it succeeded, and what it printed.
    async fn run(&self, program: PathBuf, args: &[&str]) -> (bool, String) {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let kubeconfig = self.cluster.kubeconfig().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(&program)
                .args(&args)
                .current_dir(repo())
                .env("KUBECONFIG", kubeconfig)
                .output()
                .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.success(), text)
        })
        .await
        .expect("the command ran")
    }

    /// `helm install` of `chart` into this scene's namespace, waiting as `--wait` does (kstatus).
    async fn helm_install(
        &self,
        chart: &Path,
        release: &str,
        sets: &[String],
        timeout: &str,
    ) -> (bool, String) {
        let chart = chart.to_string_lossy();
        let mut args = vec!["install", release, &chart, "-n", self.ns.name()];
        args.extend(["--wait", "--timeout", timeout]);
        for s in sets {
            args.extend(["--set", s]);
        }
        self.run(tool("helm"), &args).await
    }
}

/// A chart with one CachedImage, named and labelled from its values.
fn chart(dir: &Path) {
    std::fs::create_dir_all(dir.join("templates")).unwrap();
    std::fs::write(
        dir.join("Chart.yaml"),
        "apiVersion: v2\nname: gitops-image\nversion: 0.1.0\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("templates/image.yaml"),
        r#"apiVersion: drop.corewire.io/v1alpha1
kind: CachedImage
metadata:
  name: {{ .Values.name }}
  labels:
    e2e.drop/test: {{ .Values.test | quote }}
spec:
  image: {{ .Values.image }}
  tag: {{ .Values.tag | quote }}
  nodeSelector:
    e2e.drop/pool: {{ .Values.pool | quote }}
  policyRef:
    name: {{ .Values.policy }}
"#,
    )
    .unwrap();
}

fn ready(ci: &CachedImage) -> Option<(String, String)> {
    let c = kube_plan::conditions::get(&ci.status.as_ref()?.conditions, "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn gitops_helm_wait_returns_once_cached_and_fails_for_a_broken_image() {
    let s = scene("gitops-helm").await;
    let images: Api<CachedImage> = Api::all(s.client.clone());
    let dir = tempfile::tempdir().unwrap();
    chart(dir.path());
    let values = |name: &str, image: &str, tag: &str, test: &str| {
        vec![
            format!("name={name}"),
            format!("image={image}"),
            format!("tag={tag}"),
            format!("test={test}"),
            format!("pool={}", s.ns.name()),
            format!("policy={}", s.policy),
        ]
    };

    // A pull of 3 s on each node: helm may return only once both nodes hold the image.
    let ok = s.name("ok");
    let (done, out) = s
        .helm_install(
            dir.path(),
            "ok",
            &values(&ok, "docker.io/library/busybox", "slow-3s", &s.drop.id),
            "120s",
        )
        .await;
    assert!(done, "helm install --wait of a cacheable image: {out}");
    let ci = images.get(&ok).await.unwrap();
    assert_eq!(
        ready(&ci),
        Some(("True".into(), "Cached".into())),
        "helm returned before the image was cached: {ci:?}"
    );

    // An image no registry has: helm gives up at its timeout.
    let broken = s.name("broken");
    let (done, out) = s
        .helm_install(
            dir.path(),
            "broken",
            &values(&broken, "registry.invalid/team/app", "1", &s.drop.id),
            "15s",
        )
        .await;
    assert!(
        !done,
        "helm install --wait of a broken image succeeded: {out}"
    );
    let ci = images.get(&broken).await.unwrap();
    assert_eq!(ready(&ci).map(|r| r.0), Some("False".into()), "{ci:?}");

    // An image no operator looks at (labelled for none): before any controller writes its status,
    // it reads as generation 1 with generation 0 observed, so helm waits instead of taking the
    // missing status for "current".
    let unseen = s.name("unseen");
    let (done, out) = s
        .helm_install(
            dir.path(),
            "unseen",
            &values(&unseen, "docker.io/library/busybox", "1.36", "nobody"),
            "8s",
        )
        .await;
    assert!(
        !done,
        "helm took an object nobody reconciled for ready: {out}"
    );
    let ci = images.get(&unseen).await.unwrap();
    assert_eq!(ci.metadata.generation, Some(1));
    assert_eq!(ci.status.and_then(|s| s.observed_generation), Some(0));
    s.drop.stop().await;
}

/// A JSON value as a Lua table constructor (as Argo CD hands the object to its health scripts).
fn lua(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut out = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' | '\\' => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\{:03}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(lua).collect();
            format!("{{{}}}", items.join(","))
        }
        Value::Object(fields) => {
            let fields: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("[{}]={}", lua(&Value::String(k.clone())), lua(v)))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
    }
}

/// What `deploy/argocd/health.lua` says of `object`: its status and message.
fn argocd_health(object: &impl serde::Serialize) -> (String, String) {
    let script = std::fs::read_to_string(repo().join("deploy/argocd/health.lua")).unwrap();
    let object = serde_json::to_value(object).unwrap();
    let chunk = format!(
        "local function check(obj)\n{script}\nend\nlocal hs = check({})\nio.write(hs.status, '\\t', hs.message or '')\n",
        lua(&object)
    );
    let out = Command::new("lua5.4")
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(chunk.as_bytes())?;
            child.wait_with_output()
        })
        .expect("run lua5.4 (installed by tests/harness/deps.sh)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, message) = text.split_once('\t').unwrap_or((&text, ""));
    (status.to_owned(), message.to_owned())
}

#[tokio::test]
async fn gitops_kubectl_wait_and_argocd_health_read_real_objects() {
    let s = scene("gitops-health").await;
    let images: Api<CachedImage> = Api::all(s.client.clone());
    let sets: Api<CachedImageSet> = Api::all(s.client.clone());
    let discovery: Api<DiscoveryPolicy> = Api::all(s.client.clone());
    let kubectl = tool("kubectl");

    // No operator looks at this one: Progressing, from its creation on.
    let mut unseen = s.image("unseen", "docker.io/library/busybox", "1.36");
    unseen.metadata.labels = Some(BTreeMap::from([(
        TEST_LABEL.to_owned(),
        "nobody".to_owned(),
    )]));
    let unseen = images
        .create(&PostParams::default(), &unseen)
        .await
        .unwrap();
    assert_eq!(argocd_health(&unseen).0, "Progressing");

    let ok = s
        .drop
        .create(
            &images,
            s.image("ok", "docker.io/library/busybox", "slow-1s"),
        )
        .await;
    let broken = s
        .drop
        .create(&images, s.image("broken", "registry.invalid/team/app", "1"))
        .await;
    let mut set = CachedImageSet::new(
        &s.name("set"),
        CachedImageSetSpec {
            images: vec![
                ImageEntry {
                    image: "docker.io/library/redis".into(),
                    tag: Some("7".into()),
                    ..ImageEntry::default()
                },
                ImageEntry {
                    image: "docker.io/library/nginx".into(),
                    tag: Some("1.27".into()),
                    ..ImageEntry::default()
                },
            ],
            node_selector: BTreeMap::from([(POOL.to_owned(), s.ns.name().to_owned())]),
            policy_ref: Some(PolicyReference {
                name: s.policy.clone(),
            }),
            ..CachedImageSetSpec::default()
        },
    );
    set.metadata.labels = Some(s.drop.labels());
    let set = s.drop.create(&sets, set).await;
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let mut dp = DiscoveryPolicy::new(
        &s.name("refused"),
        DiscoveryPolicySpec {
            sources: vec![DiscoverySource {
                type_: SourceType::Prometheus,
                prometheus: Some(PrometheusSource {
                    endpoint,
                    query: "drop_test_image_runs".into(),
                    ..PrometheusSource::default()
                }),
                registry: None,
                secret_ref: None,
            }],
            ..DiscoveryPolicySpec::default()
        },
    );
    dp.metadata.labels = Some(s.drop.labels());
    let dp = s.drop.create(&discovery, dp).await;

    // kubectl waits for Ready on each kind with a status.
    let ok_ref = format!(
        "cachedimage/{}",
        ok.meta().name.as_deref().unwrap_or_default()
    );
    let set_ref = format!(
        "cachedimageset/{}",
        set.meta().name.as_deref().unwrap_or_default()
    );
    let wait = ["wait", "--for=condition=Ready", &ok_ref, &set_ref];
    let (done, out) = s
        .run(kubectl.clone(), &[&wait[..], &["--timeout=120s"]].concat())
        .await;
    if !done {
        let ok = images.get(&s.name("ok")).await;
        let set = sets.get(&s.name("set")).await;
        panic!("kubectl wait: {out}\n{ok:?}\n{set:?}");
    }
    let broken_ref = format!(
        "cachedimage/{}",
        broken.meta().name.as_deref().unwrap_or_default()
    );
    let (done, out) = s
        .run(
            kubectl,
            &["wait", "--for=condition=Ready", &broken_ref, "--timeout=5s"],
        )
        .await;
    assert!(!done, "kubectl wait took a broken image for ready: {out}");

    // Argo CD's view of the same objects.
    let ok = images.get(&s.name("ok")).await.unwrap();
    assert_eq!(argocd_health(&ok).0, "Healthy", "{ok:?}");
    let set = sets.get(&s.name("set")).await.unwrap();
    assert_eq!(argocd_health(&set).0, "Healthy", "{set:?}");
    let broken = wait_until(&images, &s.name("broken"), 60, "a failed pull", |ci| {
        ready(ci).is_some_and(|r| r.1 == "PullFailed")
    })
    .await;
    let (health, message) = argocd_health(&broken);
    assert_eq!(health, "Degraded", "{broken:?}");
    assert!(!message.is_empty(), "the condition's message goes along");
    let dp = wait_until(
        &discovery,
        &dp.metadata.name.clone().unwrap_or_default(),
        60,
        "a refused source",
        |d| {
            d.status.as_ref().is_some_and(|st| {
                st.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "False")
            })
        },
    )
    .await;
    assert_eq!(argocd_health(&dp).0, "Degraded", "{dp:?}");
    s.drop.stop().await;
}
