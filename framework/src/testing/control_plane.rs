//! etcd and kube-apiserver started from Rust, from a directory of binaries: what `setup-envtest`
//! fills for Go operators (`KUBEBUILDER_ASSETS`), with no script and no other tool.
//!
//! Everything lives in a temporary directory: certificates made with rcgen (a CA, the API server's
//! serving certificate, an admin client certificate in `system:masters`), the service account
//! signing key, etcd's data and the kubeconfig. Both processes listen on loopback ports chosen
//! free. They are killed when the [`ControlPlane`] drops, and, because they are started with a
//! parent-death signal from a thread that lives as long as the test process, also when the process
//! ends without dropping it (a `static` shared cluster, a test binary that exits).

use super::TestError;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long the API server has to become ready.
const READY_WITHIN: Duration = Duration::from_secs(90);

/// The binaries a control plane needs, as `setup-envtest` lays them out.
const BINARIES: [&str; 2] = ["etcd", "kube-apiserver"];

/// The start of each control plane's directory name, in the system's temporary directory.
const DIR_PREFIX: &str = "kube-plan-cluster-";

/// The file in a control plane's directory naming the process that started it.
const OWNER_FILE: &str = "owner.pid";

/// A running etcd and kube-apiserver.
#[derive(Debug)]
pub(crate) struct ControlPlane {
    /// Temporary directory: certificates, kubeconfig, etcd data, logs (removed on drop).
    dir: tempfile::TempDir,
    apiserver: Child,
    etcd: Child,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver from `assets` (a directory holding both binaries) and waits
    /// until the API server answers `/readyz`.
    pub(crate) fn start(assets: &Path) -> Result<Self, TestError> {
        for b in BINARIES {
            if !assets.join(b).is_file() {
                return Err(TestError::Harness(format!(
                    "{} has no {b}: point KUBEBUILDER_ASSETS at a directory holding {} \
                     (setup-envtest use -p path)",
                    assets.display(),
                    BINARIES.join(" and ")
                )));
            }
        }
        remove_stale_dirs();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(|e| harness("creating a directory", e))?;
        let p = dir.path();
        std::fs::write(p.join(OWNER_FILE), std::process::id().to_string())
            .map_err(|e| harness("writing the owner's PID", e))?;
        write_pki(p)?;
        let [etcd_port, peer_port, api_port] = [free_port()?, free_port()?, free_port()?];
        let etcd = spawn(
            &assets.join("etcd"),
            &[
                "--name=test".into(),
                format!("--data-dir={}", p.join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=test=http://127.0.0.1:{peer_port}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
            &p.join("etcd.log"),
        )?;
        let pki = |f: &str| p.join(f).display().to_string();
        let apiserver = spawn(
            &assets.join("kube-apiserver"),
            &[
                format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                format!("--tls-cert-file={}", pki("serving.crt")),
                format!("--tls-private-key-file={}", pki("serving.key")),
                format!("--client-ca-file={}", pki("ca.crt")),
                "--authorization-mode=RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", pki("sa.pub")),
                format!("--service-account-signing-key-file={}", pki("sa.key")),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--allow-privileged=false".into(),
                "--profiling=false".into(),
            ],
            &p.join("kube-apiserver.log"),
        )?;
        let mut plane = Self {
            dir,
            apiserver,
            etcd,
        };
        write_kubeconfig(plane.dir.path(), api_port)?;
        plane.wait_ready()?;
        Ok(plane)
    }

    /// The admin kubeconfig.
    pub(crate) fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Polls `/readyz` with the admin credentials until it answers 200, or a process exits.
    ///
    /// One client on one runtime for the whole wait, on a thread of its own: this may be called
    /// from inside a test's runtime, which cannot be blocked on.
    fn wait_ready(&mut self) -> Result<(), TestError> {
        let kubeconfig = self.kubeconfig();
        let dir = self.dir.path().to_owned();
        let children = [
            ("etcd", &mut self.etcd),
            ("kube-apiserver", &mut self.apiserver),
        ];
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| harness("starting a runtime", e))?
                        .block_on(poll_ready(&kubeconfig, &dir, children))
                })
                .join()
                .unwrap_or_else(|_| Err(TestError::Harness("the readiness wait panicked".into())))
        })
    }
}

/// Asks `/readyz` every 200 ms until it answers, a process exits (its log's tail is the error), or
/// [`READY_WITHIN`] passes.
async fn poll_ready(
    kubeconfig: &Path,
    dir: &Path,
    mut children: [(&str, &mut Child); 2],
) -> Result<(), TestError> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| harness("reading the kubeconfig", e))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| harness("reading the kubeconfig", e))?;
    let client = kube::Client::try_from(config).map_err(|e| harness("making a client", e))?;
    let deadline = Instant::now() + READY_WITHIN;
    let mut last = String::from("not asked yet");
    while Instant::now() < deadline {
        for (name, child) in &mut children {
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                return Err(TestError::Harness(format!(
                    "{name} exited ({status}) at start; its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )));
            }
        }
        let asked = match http::Request::get("/readyz").body(Vec::new()) {
            Ok(request) => client
                .request_text(request)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match asked {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(TestError::Harness(format!(
        "kube-apiserver not ready within {READY_WITHIN:?}: {last}"
    )))
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Removes the directories of control planes whose process has ended. A shared cluster lives in a
/// `static`, which is never dropped: its processes die with the test process (parent-death
/// signal), but its directory (certificates, etcd's data, logs) would stay behind. A directory
/// without an owner file, or whose owner runs, is left alone.
fn remove_stale_dirs() {
    let proc = Path::new("/proc");
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    if !proc.is_dir() {
        return;
    }
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let owner = std::fs::read_to_string(entry.path().join(OWNER_FILE))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        if let Some(pid) = owner
            && !proc.join(pid.to_string()).exists()
            && let Err(e) = std::fs::remove_dir_all(entry.path())
        {
            tracing::debug!(dir = %entry.path().display(), error = %e, "could not remove a stale control plane's directory");
        }
    }
}

fn harness(what: &str, e: impl std::fmt::Display) -> TestError {
    TestError::Harness(format!("{what}: {e}"))
}

fn free_port() -> Result<u16, TestError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| harness("finding a free port", e))
}

/// Starts `bin` with its output in `log`, through the spawner thread.
fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child, TestError> {
    let out = std::fs::File::create(log).map_err(|e| harness("creating a log", e))?;
    let err = out.try_clone().map_err(|e| harness("creating a log", e))?;
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    spawner(cmd).map_err(|e| harness(&format!("starting {}", bin.display()), e))
}

type Spawn = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from one thread that lives as long as the process, with a parent-death signal:
/// Linux sends it when the thread that spawned the child ends, so a child of a test's own thread
/// would die with that test, and one of this thread dies only with the process.
fn spawner(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Spawn>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Spawn>();
        std::thread::Builder::new()
            .name("kube-plan-test-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(spawn_with_parent_death(&mut cmd));
                }
                // The sender lives in a static: the loop ends only with the process.
            })
            .map(|_| ())
            .unwrap_or_default();
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    sender
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

#[cfg(target_os = "linux")]
fn spawn_with_parent_death(cmd: &mut Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl, which is
    // async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    cmd.spawn()
}

#[cfg(not(target_os = "linux"))]
fn spawn_with_parent_death(cmd: &mut Command) -> std::io::Result<Child> {
    cmd.spawn()
}

/// Writes the certificates and keys of a control plane into `dir`: `ca.crt`, `serving.crt`/`.key`
/// (127.0.0.1, localhost), `admin.crt`/`.key` (`system:masters`) and the service account key pair
/// `sa.key`/`sa.pub`.
fn write_pki(dir: &Path) -> Result<(), TestError> {
    let cert = |e: rcgen::Error| harness("making certificates", e);
    let ca_key = KeyPair::generate().map_err(cert)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(cert)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "kube-plan test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(cert)?;
    let issuer = Issuer::new(ca, &ca_key);
    // A certificate the CA signs, with its key.
    let leaf = |names: &[&str], subject: &[(DnType, &str)], usage| {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        for (kind, value) in subject {
            params.distinguished_name.push(kind.clone(), *value);
        }
        params.extended_key_usages = vec![usage];
        Ok::<_, rcgen::Error>((params.signed_by(&key, &issuer)?, key))
    };
    let (serving_cert, serving_key) = leaf(
        &["127.0.0.1", "localhost"],
        &[(DnType::CommonName, "kube-apiserver")],
        ExtendedKeyUsagePurpose::ServerAuth,
    )
    .map_err(cert)?;
    let (admin_cert, admin_key) = leaf(
        &[],
        &[
            (DnType::CommonName, "admin"),
            (DnType::OrganizationName, "system:masters"),
        ],
        ExtendedKeyUsagePurpose::ClientAuth,
    )
    .map_err(cert)?;
    let sa_key = KeyPair::generate().map_err(cert)?;
    for (file, pem) in [
        ("ca.crt", ca_cert.pem()),
        ("serving.crt", serving_cert.pem()),
        ("serving.key", serving_key.serialize_pem()),
        ("admin.crt", admin_cert.pem()),
        ("admin.key", admin_key.serialize_pem()),
        ("sa.key", sa_key.serialize_pem()),
        ("sa.pub", sa_key.public_key_pem()),
    ] {
        std::fs::write(dir.join(file), pem).map_err(|e| harness("writing certificates", e))?;
    }
    Ok(())
}

/// Writes `kubeconfig` for the admin user, certificates embedded by path.
fn write_kubeconfig(dir: &Path, port: u16) -> Result<(), TestError> {
    let path = |f: &str| dir.join(f).display().to_string();
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": format!("https://127.0.0.1:{port}"),
            "certificate-authority": path("ca.crt"),
        }}],
        "users": [{"name": "admin", "user": {
            "client-certificate": path("admin.crt"),
            "client-key": path("admin.key"),
        }}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
        "current-context": "test",
    });
    // JSON is YAML: kubectl and kube read it as a kubeconfig.
    std::fs::write(dir.join("kubeconfig"), config.to_string())
        .map_err(|e| harness("writing the kubeconfig", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoke_stale_control_plane_directories_are_removed_and_live_ones_kept() {
        let make = |owner: Option<u32>| {
            let dir = tempfile::Builder::new()
                .prefix(DIR_PREFIX)
                .tempdir()
                .unwrap()
                .keep();
            if let Some(pid) = owner {
                std::fs::write(dir.join(OWNER_FILE), pid.to_string()).unwrap();
            }
            dir
        };
        // A process that has ended: its PID names no process any more.
        let mut ended = Command::new("true").spawn().unwrap();
        ended.wait().unwrap();
        let stale = make(Some(ended.id()));
        let live = make(Some(std::process::id()));
        let unowned = make(None);
        remove_stale_dirs();
        assert!(!stale.exists(), "the ended process's directory went");
        assert!(live.exists() && unowned.exists(), "the others stay");
        for dir in [live, unowned] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
