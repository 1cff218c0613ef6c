//! The real node of the local control plane (`tests/harness/realnode.sh`): a kubelet with its own
//! containerd, and the loopback registry that holds the images it runs. Tests read the node's
//! containerd directly (`ctr`), not only what Drop reports.

use k8s_openapi::api::core::v1::Toleration;
use kube_plan::testing::TestCluster;
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

/// Label and `NoSchedule` taint of the real node: only what tolerates it goes there.
pub const MARK: &str = "drop.corewire.io/e2e-real-node";

/// The running real node.
#[derive(Clone, Debug)]
pub struct RealNode {
    /// Node name.
    pub name: String,
    /// `127.0.0.1:<port>` of its registry (plain HTTP), holding `pause:1`, `busybox:1` (a static
    /// busybox with `sh`, `true`, `sleep`) and `distroless:1` (one data file, nothing to run).
    pub registry: String,
    containerd: PathBuf,
    hosts_dir: PathBuf,
}

/// Runs `realnode.sh COMMAND` for `cluster`.
fn harness(cluster: &TestCluster, command: &str) -> String {
    crate::run_ok(
        Command::new("bash")
            .arg(crate::repo().join("tests/harness/realnode.sh"))
            .arg(command)
            .env("KUBE_PLAN_CLUSTER_STATE", cluster_state(cluster)),
        &format!("tests/harness/realnode.sh {command}"),
    )
}

fn cluster_state(cluster: &TestCluster) -> PathBuf {
    cluster
        .state_dir()
        .expect("a cluster started by the tests, which has a state directory")
        .to_path_buf()
}

/// Where the real node of `cluster` keeps its state (containerd's root, the kubelet's, logs).
pub fn state_dir(cluster: &TestCluster) -> PathBuf {
    cluster_state(cluster).join("realnode")
}

/// Stops the real node of `cluster` and puts the machine back as it was.
pub fn down(cluster: &TestCluster) {
    harness(cluster, "down");
}

impl RealNode {
    /// Starts the real node on `cluster` (the shared one) unless it runs already.
    pub fn ensure(cluster: &TestCluster) -> Self {
        let out = harness(cluster, "ensure");
        let vars: BTreeMap<&str, &str> = out.lines().filter_map(|l| l.split_once('=')).collect();
        let var = |k: &str| {
            (*vars
                .get(k)
                .unwrap_or_else(|| panic!("realnode.sh printed no {k}: {out}")))
            .to_owned()
        };
        Self {
            name: var("REAL_NODE"),
            registry: var("REAL_NODE_REGISTRY"),
            containerd: PathBuf::from(var("REAL_NODE_CONTAINERD")),
            hosts_dir: PathBuf::from(var("REAL_NODE_HOSTS_DIR")),
        }
    }

    /// The selector and toleration that send an image to this node and nowhere else.
    pub fn placement(&self) -> (BTreeMap<String, String>, Vec<Toleration>) {
        (
            BTreeMap::from([(MARK.to_owned(), "true".to_owned())]),
            vec![Toleration {
                key: Some(MARK.to_owned()),
                operator: Some("Exists".to_owned()),
                effect: Some("NoSchedule".to_owned()),
                ..Toleration::default()
            }],
        )
    }

    fn ctr(&self, args: &[&str]) -> String {
        crate::run_ok(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.containerd)
                .args(["--namespace", "k8s.io"])
                .args(args),
            "ctr (Debian package containerd)",
        )
    }

    /// The image references the node's containerd holds, with their digests.
    pub fn images(&self) -> BTreeMap<String, String> {
        // `ctr images ls` columns: REF TYPE DIGEST SIZE PLATFORMS LABELS.
        self.ctr(&["images", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                let reference = cols.next()?;
                let digest = cols.nth(1)?;
                Some((reference.to_owned(), digest.to_owned()))
            })
            .collect()
    }

    /// Removes the image `reference` names from the node's containerd, under every name it has
    /// there (its tag and its digest form), as `crictl rmi` or the kubelet's image GC would: behind
    /// the kubelet's and Drop's back.
    pub fn remove_image(&self, reference: &str) {
        let held = self.images();
        let digest = held.get(reference).expect("the image is on the node");
        let names: Vec<&str> = held
            .iter()
            .filter(|(_, d)| *d == digest)
            .map(|(r, _)| r.as_str())
            .collect();
        let mut args = vec!["images", "rm", "--sync"];
        args.extend(names);
        self.ctr(&args);
    }

    /// Tells the node's containerd how to reach a registry: `hosts_toml` is the body of its
    /// `hosts.toml` (CA, client certificate, scheme). Files it names can live in `dir()`.
    pub fn configure_registry(&self, host: &str, hosts_toml: &str) -> PathBuf {
        let dir = self.hosts_dir.join(host);
        std::fs::create_dir_all(&dir).expect("containerd hosts directory");
        std::fs::write(dir.join("hosts.toml"), hosts_toml).expect("hosts.toml");
        dir
    }

    fn registry_url(&self, path: &str) -> String {
        format!("http://{}/v2/{path}", self.registry)
    }

    /// The manifest of `repository:tag` in the node's registry, and its digest.
    async fn manifest(&self, reference: &str) -> (Vec<u8>, String) {
        let (repo, tag) = reference.rsplit_once(':').expect("repository:tag");
        let got = reqwest::Client::new()
            .get(self.registry_url(&format!("{repo}/manifests/{tag}")))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .expect("manifest");
        let digest = got.headers()["docker-content-digest"]
            .to_str()
            .expect("digest header")
            .to_owned();
        (got.bytes().await.expect("manifest body").to_vec(), digest)
    }

    /// `repository:tag` of the node's registry, whole, to put into another registry.
    pub async fn export(&self, reference: &str) -> OciImage {
        let (manifest, digest) = self.manifest(reference).await;
        let (repo, _) = reference.rsplit_once(':').expect("repository:tag");
        let mut blobs = Vec::new();
        for d in blob_digests(&manifest) {
            let blob = reqwest::get(self.registry_url(&format!("{repo}/blobs/{d}")))
                .await
                .and_then(reqwest::Response::error_for_status)
                .expect("blob");
            blobs.push(blob.bytes().await.expect("blob body").to_vec());
        }
        OciImage {
            manifest,
            blobs,
            digest,
        }
    }

    /// Copies `from` (`repository:tag` in the node's registry) to `to` in the same registry, as an
    /// image of its own: the same layers (mounted, not uploaded again) under a config labelled with
    /// `to`, so each test's image has its own digest and its own life on the one node. Returns the
    /// new manifest digest.
    pub async fn copy_image(&self, from: &str, to: &str) -> String {
        let (manifest, _) = self.manifest(from).await;
        let (from_repo, _) = from.rsplit_once(':').expect("repository:tag");
        let (to_repo, to_tag) = to.rsplit_once(':').expect("repository:tag");
        let http = reqwest::Client::new();
        let mut parsed: serde_json::Value =
            serde_json::from_slice(&manifest).expect("manifest JSON");
        for d in blob_digests(&manifest).iter().skip(1) {
            let mounted = http
                .post(self.registry_url(&format!(
                    "{to_repo}/blobs/uploads/?mount={d}&from={from_repo}"
                )))
                .send()
                .await
                .expect("blob mount");
            assert_eq!(mounted.status(), 201, "mounting {d} into {to_repo}");
        }
        let config_digest = parsed["config"]["digest"].as_str().expect("config digest");
        let mut config: serde_json::Value =
            reqwest::get(self.registry_url(&format!("{from_repo}/blobs/{config_digest}")))
                .await
                .and_then(reqwest::Response::error_for_status)
                .expect("config blob")
                .json()
                .await
                .expect("config JSON");
        config["config"]["Labels"] = serde_json::json!({"e2e.drop/copy": to});
        let config = serde_json::to_vec(&config).expect("config");
        let digest = crate::fixtures::upload_blob(
            &format!("http://{}", self.registry),
            to_repo,
            &config,
            |method, url| http.request(method, url),
        )
        .await;
        parsed["config"]["digest"] = digest.into();
        parsed["config"]["size"] = config.len().into();
        let manifest = serde_json::to_vec(&parsed).expect("manifest");
        http.put(self.registry_url(&format!("{to_repo}/manifests/{to_tag}")))
            .header("content-type", OCI_MANIFEST)
            .body(manifest.clone())
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .expect("manifest put");
        format!("sha256:{:x}", sha2::Sha256::digest(&manifest))
    }
}

/// Media type of the images the harness builds.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A whole image: its OCI manifest, the blobs it names (config, then layers), and its digest.
#[derive(Clone, Debug)]
pub struct OciImage {
    /// The manifest, byte for byte (its digest is the image's).
    pub manifest: Vec<u8>,
    /// Config and layer blobs.
    pub blobs: Vec<Vec<u8>>,
    /// `sha256:` digest of the manifest.
    pub digest: String,
}

/// The digests of the blobs a manifest names: config, then layers.
fn blob_digests(manifest: &[u8]) -> Vec<String> {
    let parsed: serde_json::Value = serde_json::from_slice(manifest).expect("manifest JSON");
    let layers = parsed["layers"].as_array().cloned().unwrap_or_default();
    [parsed["config"].clone()]
        .iter()
        .chain(&layers)
        .filter_map(|b| b["digest"].as_str().map(str::to_owned))
        .collect()
}
