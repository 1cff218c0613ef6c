//! The effectful half of warm-up: keeps the warming nodes, removes their taint when they are warm or
//! their deadline passes, and reports it.
//!
//! It learns of nodes from the CachedImage controller's Node watch ([`Warden::node_changed`]) and of
//! images cached from its reconciles ([`Warden::checked`]); both hand in the images still missing on
//! the node, as the pacer knows them. Between those, one timer per node fires at its deadline.

use super::{CACHED, DEADLINE, Verdict, Warmup};
use crate::metrics::Metrics;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Toleration};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long to wait before trying a removal again after the API server failed it (not refused it).
const RETRY: Duration = Duration::from_secs(5);
/// The most missing images an Event names.
const NAMED: usize = 5;

/// What is kept of a warming node.
struct Warming {
    /// The node as last seen (its taints are what a removal tests against).
    node: Node,
    /// The images that target it and were not cached there at the last look.
    missing: Vec<String>,
    /// A removal is under way.
    releasing: bool,
}

/// Removes the warm-up taint from nodes that are warm or out of time.
pub struct Warden {
    warmup: Warmup,
    /// [`Warmup::judging_tolerations`], computed once.
    judging: Vec<Toleration>,
    api: Api<Node>,
    recorder: Recorder,
    metrics: Metrics,
    nodes: Mutex<BTreeMap<String, Warming>>,
}

impl Warden {
    /// A warden writing through `client` (it patches Nodes and records Events on them).
    pub fn new(client: Client, warmup: Warmup, metrics: Metrics, reporter: &str) -> Arc<Self> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: reporter.to_owned(),
                instance: None,
            },
        );
        Arc::new(Self {
            judging: warmup.judging_tolerations(),
            warmup,
            api: Api::all(client),
            recorder,
            metrics,
            nodes: Mutex::new(BTreeMap::new()),
        })
    }

    /// The settings.
    pub fn warmup(&self) -> &Warmup {
        &self.warmup
    }

    /// The tolerations a warming node's images are judged with
    /// ([`Warmup::judging_tolerations`]).
    pub fn judging(&self) -> &[Toleration] {
        &self.judging
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Warming>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The warming nodes among `names`.
    pub fn warming_among<'a>(&self, names: impl IntoIterator<Item = &'a String>) -> Vec<String> {
        let nodes = self.lock();
        if nodes.is_empty() {
            return Vec::new();
        }
        names
            .into_iter()
            .filter(|n| nodes.contains_key(n.as_str()))
            .cloned()
            .collect()
    }

    /// `node` was created or changed. `missing` names the images that target it and are not cached
    /// there; it is only called for a warming node.
    pub fn node_changed(self: &Arc<Self>, node: &Node, missing: impl FnOnce() -> Vec<String>) {
        let name = node.name_any();
        if !self.warmup.is_warming(node) {
            if self.lock().remove(&name).is_some() {
                self.publish_count();
            }
            return;
        }
        let missing = missing();
        let verdict = self.warmup.verdict(node, &missing, Timestamp::now());
        let first_sight = {
            let mut nodes = self.lock();
            let first = !nodes.contains_key(&name);
            let w = nodes.entry(name.clone()).or_insert_with(|| Warming {
                node: node.clone(),
                missing: Vec::new(),
                releasing: false,
            });
            w.node = node.clone();
            w.missing = missing;
            first
        };
        if first_sight {
            self.publish_count();
            let deadline = self.warmup.deadline_of(node);
            tracing::info!(node = %name, %deadline, "node is warming");
            self.expire_at(name.clone(), deadline);
        }
        self.act(&name, &verdict);
    }

    /// The images missing on the warming node `name` were counted again (an image's pull there
    /// ended).
    pub fn checked(self: &Arc<Self>, name: &str, missing: Vec<String>) {
        let verdict = {
            let mut nodes = self.lock();
            let Some(w) = nodes.get_mut(name) else { return };
            w.missing = missing;
            self.warmup.verdict(&w.node, &w.missing, Timestamp::now())
        };
        self.act(name, &verdict);
    }

    fn act(self: &Arc<Self>, name: &str, verdict: &Verdict) {
        match verdict {
            Verdict::Warm => self.release(name, CACHED),
            Verdict::Expired => self.release(name, DEADLINE),
            Verdict::Waiting(_) => {}
        }
    }

    /// At `deadline`, removes the taint if it is still there.
    fn expire_at(self: &Arc<Self>, name: String, deadline: Timestamp) {
        let now = Timestamp::now();
        let wait = if deadline > now {
            deadline.duration_since(now).unsigned_abs()
        } else {
            Duration::ZERO
        };
        let warden = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            warden.release(&name, DEADLINE);
        });
    }

    /// Removes the taint from `name` (in the background), for `reason`.
    fn release(self: &Arc<Self>, name: &str, reason: &'static str) {
        let (node, missing) = {
            let mut nodes = self.lock();
            let Some(w) = nodes.get_mut(name) else { return };
            if w.releasing {
                return;
            }
            w.releasing = true;
            (w.node.clone(), w.missing.clone())
        };
        let warden = Arc::clone(self);
        tokio::spawn(async move { warden.remove_taint(node, missing, reason).await });
    }

    async fn remove_taint(self: Arc<Self>, node: Node, missing: Vec<String>, reason: &'static str) {
        let name = node.name_any();
        let patch = match serde_json::from_value(self.warmup.release_patch(&node)) {
            Ok(p) => Patch::<()>::Json(p),
            Err(e) => {
                tracing::error!(node = %name, error = %e, "building the taint removal");
                return;
            }
        };
        match self.api.patch(&name, &PatchParams::default(), &patch).await {
            Ok(_) => {
                self.released(&node, &missing, reason).await;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                if self.lock().remove(&name).is_some() {
                    self.publish_count();
                }
            }
            // Its taints changed since it was cached: the Node watch brings the new ones, and with
            // them a new look.
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 409 => {
                tracing::debug!(node = %name, error = %e.message, "taint removal not applied");
                self.unmark(&name);
                // The watch may have brought them while the patch was on its way.
                let newer = self.lock().get(&name).map(|w| w.node.spec != node.spec);
                if newer == Some(true) {
                    self.release(&name, reason);
                }
            }
            Err(e) => {
                tracing::warn!(node = %name, error = %e, "removing the warm-up taint failed; retrying");
                self.unmark(&name);
                tokio::time::sleep(RETRY).await;
                self.release(&name, reason);
            }
        }
    }

    fn unmark(&self, name: &str) {
        if let Some(w) = self.lock().get_mut(name) {
            w.releasing = false;
        }
    }

    async fn released(&self, node: &Node, missing: &[String], reason: &'static str) {
        let name = node.name_any();
        let created = node.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let took = created.map(|c| Timestamp::now().duration_since(c).as_secs_f64());
        self.metrics
            .warmup_released
            .with_label_values(&[reason])
            .inc();
        if let Some(took) = took {
            self.metrics.warmup_duration.observe(took.max(0.0));
        }
        let (type_, note) = if reason == CACHED {
            (
                EventType::Normal,
                format!(
                    "every image that targets this node is cached; removed the {} taint",
                    self.warmup.taint
                ),
            )
        } else {
            let mut named = missing.iter().take(NAMED).cloned().collect::<Vec<_>>();
            if missing.len() > NAMED {
                named.push(format!("and {} more", missing.len() - NAMED));
            }
            (
                EventType::Warning,
                format!(
                    "removed the {} taint after the {}s warm-up deadline; not cached yet: {}",
                    self.warmup.taint,
                    self.warmup.deadline.as_secs(),
                    named.join(", ")
                ),
            )
        };
        tracing::info!(node = %name, reason, seconds = ?took, "warm-up taint removed");
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: "RemoveTaint".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &node.object_ref(&())).await {
            tracing::warn!(node = %name, error = %e, "recording the warm-up Event");
        }
    }

    fn publish_count(&self) {
        let n = self.lock().len();
        self.metrics
            .nodes_warming
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
