//! Real Prometheus and OCI registry servers (Debian's `prometheus` and `docker-registry`) on
//! loopback, in temporary directories, stopped on drop.

use sha2::{Digest, Sha256};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    free_port()
}

async fn wait_http(url: &str, child: &mut Child, what: &str) {
    let http = reqwest::Client::new();
    for _ in 0..300 {
        if http
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited during start-up: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} not ready at {url} after 30 s");
}

/// A running docker-registry (distribution 2.8), anonymous access.
pub struct Registry {
    child: Child,
    _dir: tempfile::TempDir,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
}

impl Registry {
    /// Starts an empty registry.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (Debian package docker-registry; make test installs it)");
        let url = format!("http://127.0.0.1:{port}");
        wait_http(&format!("{url}/v2/"), &mut child, "docker-registry").await;
        Self {
            child,
            _dir: dir,
            url,
        }
    }

    /// Host and port, as image references name it.
    pub fn host(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    async fn blob(&self, http: &reqwest::Client, repo: &str, data: &[u8]) -> String {
        let digest = format!("sha256:{:x}", Sha256::digest(data));
        let start = http
            .post(format!("{}/v2/{repo}/blobs/uploads/", self.url))
            .send()
            .await
            .unwrap();
        assert!(
            start.status().is_success(),
            "upload start: {}",
            start.status()
        );
        let location = start.headers()["location"].to_str().unwrap().to_owned();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("{}{location}", self.url)
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = http
            .put(format!("{location}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert!(put.status().is_success(), "blob put: {}", put.status());
        digest
    }

    /// Pushes a tiny image `repo:tag` through the registry's HTTP API.
    pub async fn push(&self, repo: &str, tag: &str) {
        let http = reqwest::Client::new();
        let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"tag\":\"{tag}\"}}");
        let layer = format!("layer of {repo}:{tag}");
        let config_digest = self.blob(&http, repo, config.as_bytes()).await;
        let layer_digest = self.blob(&http, repo, layer.as_bytes()).await;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": config.len(), "digest": config_digest},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": layer.len(), "digest": layer_digest}],
        });
        let resp = http
            .put(format!("{}/v2/{repo}/manifests/{tag}", self.url))
            .header(
                "content-type",
                "application/vnd.docker.distribution.manifest.v2+json",
            )
            .body(manifest.to_string())
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "manifest put: {}",
            resp.status()
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running Prometheus, backfilled with `drop_test_image_runs{image=…}` series of constant values
/// from 26 hours before `anchor` to 6 hours after it, one sample a minute, served under `/prom`.
pub struct Prometheus {
    child: Child,
    _dir: tempfile::TempDir,
    /// Base URL, including the `/prom` route prefix.
    pub url: String,
}

impl Prometheus {
    /// Starts Prometheus with `series` (image, value), sampled around `anchor` (unix seconds).
    pub async fn start(series: &[(&str, f64)], anchor: i64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let metrics = dir.path().join("samples.om");
        {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&metrics).unwrap());
            writeln!(f, "# HELP drop_test_image_runs Runs per image.").unwrap();
            writeln!(f, "# TYPE drop_test_image_runs gauge").unwrap();
            for (image, value) in series {
                let mut t = anchor - 26 * 3600;
                while t <= anchor + 6 * 3600 {
                    writeln!(f, "drop_test_image_runs{{image=\"{image}\"}} {value} {t}").unwrap();
                    t += 60;
                }
            }
            writeln!(f, "# EOF").unwrap();
        }
        let out = Command::new("promtool")
            .args(["tsdb", "create-blocks-from", "openmetrics"])
            .arg(&metrics)
            .arg(&data)
            .output()
            .expect("promtool (Debian package prometheus)");
        assert!(
            out.status.success(),
            "promtool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, "global:\n  scrape_interval: 1h\n").unwrap();
        let port = free_port();
        let mut child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--web.external-url=http://127.0.0.1:{port}/prom/"))
            .arg("--web.route-prefix=/prom")
            .arg("--storage.tsdb.retention.time=30d")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus; make test installs it)");
        let url = format!("http://127.0.0.1:{port}/prom");
        wait_http(&format!("{url}/-/ready"), &mut child, "prometheus").await;
        Self {
            child,
            _dir: dir,
            url,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
