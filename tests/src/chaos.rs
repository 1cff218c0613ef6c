//! What the fault suite needs: Drop in processes of its own (to kill, freeze and restart), and the
//! invariants a rollout must keep, checked on every event of a watch rather than at the end.

use drop::api::CachedImage;
use drop::podbuilder::{PullOutcome, PullPodView};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// One Drop process.
pub struct DropProcess {
    child: Child,
    /// Its `/metrics` and `/healthz` address.
    pub http: String,
    /// Its log file.
    pub log: PathBuf,
}

/// How to start Drop processes for one test.
#[derive(Clone)]
pub struct DropCommand {
    /// The program (`drop-process`, the `drop` binary's program built with the tests).
    pub program: PathBuf,
    /// The cluster's kubeconfig.
    pub kubeconfig: PathBuf,
    /// Pull-Pod (and Lease) namespace.
    pub namespace: String,
    /// Watch selector value of `TEST_LABEL`.
    pub id: String,
    /// Where logs go.
    pub dir: PathBuf,
    /// Extra arguments (leader election, ...).
    pub extra: Vec<String>,
    /// The log filter (`RUST_LOG`).
    pub log_filter: String,
}

impl DropCommand {
    /// Starts process number `n` (its identity and log file are named after it).
    pub fn spawn(&self, n: usize) -> DropProcess {
        let http = format!("127.0.0.1:{}", crate::fixtures::free_port());
        let log = self.dir.join(format!("drop-{n}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(&self.program)
            .args([
                "run",
                "--pod-namespace",
                &self.namespace,
                "--watch-selector",
                &format!("{}={}", crate::TEST_LABEL, self.id),
                "--metrics-bind-address",
                &http,
                "--health-probe-bind-address",
                "0",
                "--pull-timeout",
                "2m",
            ])
            .args(&self.extra)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("POD_NAME", format!("drop-{n}"))
            .env("RUST_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start drop-process");
        DropProcess { child, http, log }
    }
}

impl DropProcess {
    /// The process id.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(i32::MAX)
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`, `TERM`) to the process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} {}", self.pid());
    }

    /// SIGKILL, and reap it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The value of a metric without labels (or the sum over its series), from `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let body = reqwest::get(format!("http://{}/metrics", self.http))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let values: Vec<f64> = body
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// The last lines of its log, for a failure message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for DropProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the watches saw break.
#[derive(Clone, Debug, Default)]
pub struct Violations {
    /// Two live pull Pods for the same (image, node) at once.
    pub duplicates: Vec<String>,
    /// Most pull Pods pulling at once (to compare with the policy's limit).
    pub most_in_flight: usize,
    /// An image's ready count went down while its nodes stayed.
    pub regressions: Vec<String>,
    /// Pull Pods seen in all.
    pub pods_seen: usize,
}

/// Watches the pull Pods of `namespace` and the CachedImages labelled for `id`, checking the
/// invariants on every event.
#[derive(Clone, Default)]
pub struct InvariantWatch {
    seen: Arc<Mutex<Violations>>,
}

impl InvariantWatch {
    /// Starts both watches.
    pub fn start(client: &Client, namespace: &str, id: &str) -> Self {
        let me = Self::default();
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let seen = me.seen.clone();
        tokio::spawn(async move {
            // Pulls in flight: (image, node) -> live Pod names.
            let mut live: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
            let mut all: BTreeSet<String> = BTreeSet::new();
            let mut events = std::pin::pin!(crate::changes(pods));
            while let Some((pod, gone)) = events.next().await {
                let Some(view) = PullPodView::of(&pod) else {
                    continue;
                };
                all.insert(view.name.clone());
                let key = (view.image.clone(), view.node.clone());
                let pulling = !gone
                    && pod.metadata.deletion_timestamp.is_none()
                    && matches!(view.outcome, PullOutcome::Pulling);
                let set = live.entry(key.clone()).or_default();
                if pulling {
                    set.insert(view.name.clone());
                } else {
                    set.remove(&view.name);
                }
                let mut v = seen.lock().unwrap();
                if set.len() > 1 {
                    v.duplicates.push(format!("{key:?}: {set:?}"));
                }
                let now: usize = live.values().map(BTreeSet::len).sum();
                v.most_in_flight = v.most_in_flight.max(now);
                v.pods_seen = all.len();
            }
        });
        let images: Api<CachedImage> = Api::all(client.clone());
        let selector = format!("{}={id}", crate::TEST_LABEL);
        let seen = me.seen.clone();
        tokio::spawn(async move {
            let mut best: BTreeMap<String, (i32, i32)> = BTreeMap::new();
            let config = watcher::Config::default().labels(&selector);
            let mut events = std::pin::pin!(watcher(images, config).default_backoff());
            while let Some(event) = events.next().await {
                let Ok(event) = event else { continue };
                let (watcher::Event::Apply(ci) | watcher::Event::InitApply(ci)) = event else {
                    continue;
                };
                let Some(st) = ci.status.as_ref() else {
                    continue;
                };
                let (ready, targeted) = (st.nodes_ready, st.nodes_targeted);
                let entry = best.entry(ci.name_any()).or_insert((ready, targeted));
                if targeted == entry.1 && ready < entry.0 {
                    seen.lock().unwrap().regressions.push(format!(
                        "{}: {} ready after {}",
                        ci.name_any(),
                        ready,
                        entry.0
                    ));
                }
                if targeted == entry.1 {
                    entry.0 = entry.0.max(ready);
                } else {
                    *entry = (ready, targeted);
                }
            }
        });
        me
    }

    /// What was seen so far.
    pub fn violations(&self) -> Violations {
        self.seen.lock().unwrap().clone()
    }
}

/// The directory for a test's logs, kept after the test for inspection.
pub fn log_dir(test: &str) -> PathBuf {
    let dir = crate::repo().join("target/chaos").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("log directory");
    dir
}
