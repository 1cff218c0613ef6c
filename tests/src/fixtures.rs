//! Real Prometheus and OCI registry servers (Debian's `prometheus` and `docker-registry`) on
//! loopback, in temporary directories, stopped on drop.

use sha2::{Digest, Sha256};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
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

/// What a starting server must answer before a test may use it.
#[derive(Clone, Copy)]
enum Ready {
    /// A 2xx answer (an anonymous readiness endpoint).
    Success,
    /// Any HTTP answer: a server requiring credentials says 401 once it listens.
    Answer,
}

/// Polls `url` with `http` until the server answers as `ready` asks; panics with `what` if the
/// process exits first or 30 s pass.
async fn wait_ready(
    http: &reqwest::Client,
    url: &str,
    ready: Ready,
    child: &mut Child,
    what: &str,
) {
    for _ in 0..300 {
        let answer = http.get(url).send().await;
        let ok = match ready {
            Ready::Success => answer.is_ok_and(|r| r.status().is_success()),
            Ready::Answer => answer.is_ok(),
        };
        if ok {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited during start-up: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} not ready at {url} after 30 s");
}

/// `user:<bcrypt hash>`, as htpasswd files (registry) and web configs (Prometheus) want it.
fn htpasswd(user: &str, password: &str) -> String {
    crate::run_ok(
        Command::new("htpasswd").args(["-Bbn", user, password]),
        "htpasswd (apache2-utils)",
    )
    .trim()
    .to_owned()
}

/// Uploads `data` as a blob of `repo` to the registry at `base` (`http(s)://host:port`) in one
/// piece: start an upload, then put the bytes with their digest. `req` builds each request (with the
/// registry's credentials). Returns the digest.
pub async fn upload_blob(
    base: &str,
    repo: &str,
    data: &[u8],
    req: impl Fn(reqwest::Method, String) -> reqwest::RequestBuilder,
) -> String {
    let digest = format!("sha256:{:x}", Sha256::digest(data));
    let start = req(
        reqwest::Method::POST,
        format!("{base}/v2/{repo}/blobs/uploads/"),
    )
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
        format!("{base}{location}")
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let put = req(
        reqwest::Method::PUT,
        format!("{location}{sep}digest={digest}"),
    )
    .header("content-type", "application/octet-stream")
    .body(data.to_vec())
    .send()
    .await
    .unwrap();
    assert!(put.status().is_success(), "blob put: {}", put.status());
    digest
}

/// A running docker-registry (distribution 2.8), anonymous access.
pub struct Registry {
    child: Child,
    _dir: tempfile::TempDir,
    /// `http://127.0.0.1:<port>` (or `https://` when secured).
    pub url: String,
    /// The client seeding a secured registry (trusting its CA, with a client certificate).
    client: Option<reqwest::Client>,
    /// Basic auth of a secured registry.
    auth: Option<(String, String)>,
}

impl Registry {
    /// Starts an empty registry.
    pub async fn start() -> Self {
        Self::launch(None).await
    }

    /// Starts a registry behind TLS (certificate from `pki`), requiring client certificates signed by
    /// the same CA, and basic auth for `user`/`password` (htpasswd, bcrypt).
    pub async fn start_secured(pki: &Pki, user: &str, password: &str) -> Self {
        Self::launch(Some((pki, user, password))).await
    }

    async fn launch(secured: Option<(&Pki, &str, &str)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((pki, user, password)) = secured {
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, htpasswd(user, password)).unwrap();
            config.push_str(&format!(
                "  tls:\n    certificate: {crt}\n    key: {key}\n    clientcas:\n      - {ca}\n\
                 auth:\n  htpasswd:\n    realm: drop-test\n    path: {file}\n",
                crt = pki.path("server.crt").display(),
                key = pki.path("server.key").display(),
                ca = pki.path("ca.crt").display(),
                file = file.display(),
            ));
        }
        let path = dir.path().join("config.yml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (Debian package docker-registry; make test installs it)");
        let (url, http, ready) = match secured {
            None => (
                format!("http://127.0.0.1:{port}"),
                reqwest::Client::new(),
                Ready::Success,
            ),
            // A 401 without credentials means the TLS listener is up.
            Some((pki, _, _)) => (
                format!("https://127.0.0.1:{port}"),
                pki.client(),
                Ready::Answer,
            ),
        };
        wait_ready(
            &http,
            &format!("{url}/v2/"),
            ready,
            &mut child,
            "docker-registry",
        )
        .await;
        Self {
            child,
            _dir: dir,
            url,
            auth: secured.map(|(_, u, p)| (u.to_owned(), p.to_owned())),
            client: secured.map(|_| http),
        }
    }

    /// Host and port, as image references name it.
    pub fn host(&self) -> &str {
        self.url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
    }

    fn req(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let http = self.client.clone().unwrap_or_default();
        let req = http.request(method, url);
        match &self.auth {
            Some((u, p)) => req.basic_auth(u, Some(p)),
            None => req,
        }
    }

    async fn blob(&self, repo: &str, data: &[u8]) -> String {
        upload_blob(&self.url, repo, data, |method, url| self.req(method, url)).await
    }

    /// Puts a real image under `repo:tag`: its blobs (config and layers), then its OCI manifest.
    pub async fn put_image(&self, repo: &str, tag: &str, image: &crate::realnode::OciImage) {
        for blob in &image.blobs {
            self.blob(repo, blob).await;
        }
        let resp = self
            .req(
                reqwest::Method::PUT,
                format!("{}/v2/{repo}/manifests/{tag}", self.url),
            )
            .header("content-type", crate::realnode::OCI_MANIFEST)
            .body(image.manifest.clone())
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "manifest put: {}",
            resp.status()
        );
    }

    /// Pushes a tiny image `repo:tag` through the registry's HTTP API.
    pub async fn push(&self, repo: &str, tag: &str) {
        let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"tag\":\"{tag}\"}}");
        let layer = format!("layer of {repo}:{tag}");
        let config_digest = self.blob(repo, config.as_bytes()).await;
        let layer_digest = self.blob(repo, layer.as_bytes()).await;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": config.len(), "digest": config_digest},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": layer.len(), "digest": layer_digest}],
        });
        let resp = self
            .req(
                reqwest::Method::PUT,
                format!("{}/v2/{repo}/manifests/{tag}", self.url),
            )
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
        Self::start_with(series, anchor, None).await
    }

    /// Like [`Prometheus::start`], behind TLS (certificate from `pki`), requiring client certificates
    /// signed by the same CA, and basic auth for `user`/`password`.
    pub async fn start_secured(
        series: &[(&str, f64)],
        anchor: i64,
        pki: &Pki,
        user: &str,
        password: &str,
    ) -> Self {
        Self::start_with(series, anchor, Some((pki, user, password))).await
    }

    async fn start_with(
        series: &[(&str, f64)],
        anchor: i64,
        secured: Option<(&Pki, &str, &str)>,
    ) -> Self {
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
        crate::run_ok(
            Command::new("promtool")
                .args(["tsdb", "create-blocks-from", "openmetrics"])
                .arg(&metrics)
                .arg(&data),
            "promtool (Debian package prometheus)",
        );
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, "global:\n  scrape_interval: 1h\n").unwrap();
        let port = free_port();
        let scheme = if secured.is_some() { "https" } else { "http" };
        let mut cmd = Command::new("prometheus");
        if let Some((pki, user, password)) = secured {
            let line = htpasswd(user, password);
            let hash = line.split_once(':').map_or("", |(_, h)| h);
            let web = dir.path().join("web.yml");
            std::fs::write(
                &web,
                format!(
                    "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\nbasic_auth_users:\n  {user}: {hash}\n",
                    pki.path("server.crt").display(),
                    pki.path("server.key").display(),
                    pki.path("ca.crt").display(),
                ),
            )
            .unwrap();
            cmd.arg(format!("--web.config.file={}", web.display()));
        }
        let mut child = cmd
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!(
                "--web.external-url={scheme}://127.0.0.1:{port}/prom/"
            ))
            .arg("--web.route-prefix=/prom")
            .arg("--storage.tsdb.retention.time=30d")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus; make test installs it)");
        let url = format!("{scheme}://127.0.0.1:{port}/prom");
        let (http, ready) = match secured {
            None => (reqwest::Client::new(), Ready::Success),
            Some((pki, _, _)) => (pki.client(), Ready::Answer),
        };
        wait_ready(
            &http,
            &format!("{url}/-/ready"),
            ready,
            &mut child,
            "prometheus",
        )
        .await;
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

/// A throw-away PKI made with openssl: a CA, a server certificate for 127.0.0.1, a client certificate.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Generates the keys and certificates.
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sh = |script: &str| {
            crate::run_ok(
                Command::new("bash")
                    .arg("-ec")
                    .arg(script)
                    .current_dir(dir.path()),
                "openssl",
            );
        };
        sh(
            "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=drop-test-ca 2>/dev/null",
        );
        for (name, eku, san) in [
            (
                "server",
                "serverAuth",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
            ),
            ("client", "clientAuth", "subjectAltName=DNS:drop-client"),
        ] {
            sh(&format!(
                "openssl req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name} 2>/dev/null
                 printf 'basicConstraints=CA:FALSE\\nkeyUsage=critical,digitalSignature,keyEncipherment\\nextendedKeyUsage={eku}\\n{san}\\n' > {name}.ext
                 openssl x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile {name}.ext -out {name}.crt 2>/dev/null"
            ));
        }
        Self { dir }
    }

    /// A file of the PKI (`ca.crt`, `server.crt`, `server.key`, `client.crt`, `client.key`).
    pub fn path(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join(file)
    }

    /// The contents of a file of the PKI.
    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }

    /// An HTTP client trusting the CA and presenting the client certificate.
    pub fn client(&self) -> reqwest::Client {
        let mut pem = self.read("client.crt");
        pem.extend_from_slice(&self.read("client.key"));
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&self.read("ca.crt")).unwrap())
            .identity(reqwest::Identity::from_pem(&pem).unwrap())
            .build()
            .unwrap()
    }
}

/// How the in-process fake registry behaves.
#[derive(Clone, Default)]
pub struct FakeRegistryConfig {
    /// Tags of every repository (`huge` answers 9 MiB instead; `slow` answers after 30 s).
    pub tags: Vec<String>,
    /// At most this many tags per page (0: no limit), with `Link` headers to the next page.
    pub page_size: usize,
    /// Require a bearer token, issued by `/token` to these basic credentials.
    pub token_for: Option<(String, String)>,
    /// Require this header (name, value) on tag listings.
    pub required_header: Option<(String, String)>,
    /// The bearer challenge's realm (default: this server's `/token`).
    pub realm: Option<String>,
    /// Pagination `Link`s are absolute, to this origin (default: relative, this server).
    pub link_origin: Option<String>,
    /// Answer tag listings with a 307 redirect to the same path on this origin.
    pub redirect_to: Option<String>,
}

/// Requests a fake server received: (path, headers as `name: value`).
pub type SeenRequests = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<String>)>>>;

/// A small HTTP server speaking the parts of the distribution API Debian's registry does not:
/// tag-list pagination and the bearer-token challenge. Stops when dropped.
pub struct FakeRegistry {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Every request it received: the path and the headers (name: value), to see what reached it.
    pub seen: SeenRequests,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const TOKEN: &str = "fake-token-123";

fn respond(
    cfg: &FakeRegistryConfig,
    base: &str,
    req: &hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use base64::Engine as _;
    let reply = |code: u16, body: String, headers: Vec<(&str, String)>| {
        let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
        *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
        for (k, v) in headers {
            r.headers_mut().insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        r
    };
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let path = req.uri().path().to_owned();
    let query: std::collections::HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    if path == "/token" {
        let Some((u, p)) = &cfg.token_for else {
            return reply(404, String::new(), vec![]);
        };
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        );
        return if header("authorization").as_deref() == Some(expected.as_str()) {
            reply(200, format!("{{\"token\":\"{TOKEN}\"}}"), vec![])
        } else {
            reply(
                401,
                "{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}".into(),
                vec![],
            )
        };
    }
    let Some(repo) = path
        .strip_prefix("/v2/")
        .and_then(|p| p.strip_suffix("/tags/list"))
    else {
        return reply(404, String::new(), vec![]);
    };
    if let Some(target) = &cfg.redirect_to {
        let to = format!("{target}{}", req.uri());
        return reply(307, String::new(), vec![("location", to)]);
    }
    if cfg.token_for.is_some()
        && header("authorization").as_deref() != Some(&format!("Bearer {TOKEN}"))
    {
        let realm = cfg.realm.clone().unwrap_or_else(|| format!("{base}/token"));
        let challenge = format!(
            "Bearer realm=\"{realm}\",service=\"fake\",scope=\"repository:{repo}:pull,push\""
        );
        return reply(401, "{}".into(), vec![("www-authenticate", challenge)]);
    }
    if let Some((name, value)) = &cfg.required_header
        && header(name).as_deref() != Some(value.as_str())
    {
        return reply(403, "{\"errors\":[{\"code\":\"DENIED\"}]}".into(), vec![]);
    }
    if repo == "huge" {
        let tags: Vec<String> = (0..400_000).map(|i| format!("tag-{i:020}")).collect();
        return reply(
            200,
            serde_json::json!({"name": repo, "tags": tags}).to_string(),
            vec![],
        );
    }
    let start = match query.get("last") {
        Some(last) => cfg
            .tags
            .iter()
            .position(|t| t == last)
            .map_or(cfg.tags.len(), |i| i + 1),
        None => 0,
    };
    let n = if cfg.page_size == 0 {
        usize::MAX
    } else {
        cfg.page_size
    };
    let page: Vec<&String> = cfg.tags.iter().skip(start).take(n).collect();
    let mut headers = vec![];
    if start + page.len() < cfg.tags.len()
        && let Some(last) = page.last()
    {
        let origin = cfg.link_origin.as_deref().unwrap_or_default();
        headers.push((
            "link",
            format!("<{origin}/v2/{repo}/tags/list?n={n}&last={last}>; rel=\"next\""),
        ));
    }
    reply(
        200,
        serde_json::json!({"name": repo, "tags": page}).to_string(),
        headers,
    )
}

impl FakeRegistry {
    /// Starts the fake on a free loopback port.
    pub async fn start(cfg: FakeRegistryConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let base = url.clone();
        let seen = SeenRequests::default();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (cfg, base, record) = (cfg.clone(), base.clone(), record.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let headers = req
                            .headers()
                            .iter()
                            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or_default()))
                            .collect();
                        record
                            .lock()
                            .unwrap()
                            .push((req.uri().path().to_owned(), headers));
                        let slow = req.uri().path().starts_with("/v2/slow/");
                        let resp = respond(&cfg, &base, &req);
                        async move {
                            if slow {
                                // Longer than Drop's request timeout.
                                tokio::time::sleep(Duration::from_secs(30)).await;
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { url, seen, task }
    }
}
