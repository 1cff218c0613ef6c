//! The DiscoveryPolicy controller: queries the sources every `syncInterval` (and when the spec
//! changes), merges and ranks what they find, and publishes it in the status.
//!
//! It syncs on its own schedule, not on every reconcile: its own status writes (and anything else that
//! triggers a reconcile) do not re-query the sources. A source that fails keeps the images it found
//! last time, so a passing outage does not delete the children of the sets that use the policy; when
//! every source fails, the last good list stays.

use crate::api::{DiscoveryPolicy, DiscoveryPolicyStatus, DiscoverySource, SourceType};
use crate::discovery::client::Credentials;
use crate::discovery::{self, FailureKind, Found, SourceError, prometheus, registry};
use crate::metrics::Metrics;
use framework::conditions::{self, Cond};
use framework::{Context, Plan, Reconciler};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Api, ResourceExt};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The condition type saying whether every source answered.
pub const SOURCES_HEALTHY: &str = "SourcesHealthy";
/// Longest wait before retrying after a failed sync (or `syncInterval`, if shorter).
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// A sync this process made: the spec generation, when, and whether every source failed.
#[derive(Clone, Copy)]
struct Attempt {
    generation: Option<i64>,
    at: Timestamp,
    all_failed: bool,
}

/// Reconciles DiscoveryPolicies.
pub struct DiscoveryPolicyReconciler {
    /// Where source Secrets live (the pull-Pod namespace).
    pub namespace: String,
    /// Drop's metrics.
    pub metrics: Metrics,
    /// Per policy: its last sync by this process.
    attempts: Mutex<HashMap<String, Attempt>>,
}

impl DiscoveryPolicyReconciler {
    /// A reconciler reading Secrets from `namespace`.
    pub fn new(namespace: &str, metrics: Metrics) -> Self {
        Self {
            namespace: namespace.to_owned(),
            metrics,
            attempts: Mutex::new(HashMap::new()),
        }
    }
}

/// How a source is named in `discoveredImages[].source`: stable across reorderings of the list.
pub fn source_id(src: &DiscoverySource) -> String {
    match (src.type_, &src.prometheus, &src.registry) {
        (SourceType::Prometheus, Some(p), _) => format!("prometheus {}", p.endpoint),
        (SourceType::Registry, _, Some(r)) => format!("registry {}", r.url),
        (t, _, _) => format!("{t:?}").to_lowercase(),
    }
}

async fn credentials(
    ctx: &Context,
    namespace: &str,
    src: &DiscoverySource,
) -> Result<Credentials, SourceError> {
    let Some(r) = &src.secret_ref else {
        return Ok(Credentials::default());
    };
    let api: Api<Secret> = Api::namespaced(ctx.client().clone(), namespace);
    match api.get_opt(&r.name).await {
        Ok(Some(s)) => Credentials::from_secret(&r.name, &s.data.unwrap_or_default()),
        Ok(None) => Err(SourceError::new(
            FailureKind::InvalidConfig,
            format!("Secret {:?} not found in namespace {namespace:?}", r.name),
        )),
        Err(e) => Err(SourceError::new(
            FailureKind::SourceError,
            format!("reading Secret {:?}: {e}", r.name),
        )),
    }
}

async fn query(
    src: &DiscoverySource,
    creds: &Credentials,
    now: Timestamp,
) -> Result<Found, SourceError> {
    match (src.type_, &src.prometheus, &src.registry) {
        (SourceType::Prometheus, Some(p), _) => prometheus::query(p, creds, now).await,
        (SourceType::Registry, _, Some(r)) => registry::list(r, creds).await,
        _ => Err(SourceError::new(
            FailureKind::InvalidConfig,
            "the source's block does not match its type",
        )),
    }
}

impl Reconciler for DiscoveryPolicyReconciler {
    type Resource = DiscoveryPolicy;
    type Error = std::convert::Infallible;

    async fn reconcile(
        &self,
        dp: &DiscoveryPolicy,
        ctx: &Context,
    ) -> Result<Plan<DiscoveryPolicy>, Self::Error> {
        let name = dp.name_any();
        let now = ctx.now();
        let interval = dp.spec.sync_interval();
        let generation = dp.metadata.generation;
        let status = dp.status.clone().unwrap_or_default();

        // Due? After the last attempt (this process) or the last successful sync (any process), for
        // this generation of the spec.
        let last = self
            .attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .cloned();
        let last_attempt = last.filter(|a| a.generation == generation).map(|a| {
            let every = if a.all_failed {
                interval.min(RETRY_AFTER_FAILURE)
            } else {
                interval
            };
            (a.at, every)
        });
        let last_sync = status
            .last_sync_time
            .as_ref()
            .filter(|_| status.observed_generation == generation)
            .map(|t| (t.0, interval));
        if let Some(due) = [last_attempt, last_sync]
            .into_iter()
            .flatten()
            .map(|(at, every)| crate::pacing::after(at, every))
            .max()
            && due > now
        {
            return Ok(Plan::new().requeue_after(due.duration_since(now).unsigned_abs()));
        }

        let mut ok: Vec<(String, Found)> = Vec::new();
        let mut failed: Vec<(String, SourceError)> = Vec::new();
        for src in &dp.spec.sources {
            let id = source_id(src);
            let started = Instant::now();
            let result = match credentials(ctx, &self.namespace, src).await {
                Ok(creds) => query(src, &creds, now).await,
                Err(e) => Err(e),
            };
            let kind = format!("{:?}", src.type_).to_lowercase();
            self.metrics
                .discovery_source_latency
                .with_label_values(&[&name, &kind])
                .observe(started.elapsed().as_secs_f64());
            self.metrics
                .discovery_source_health
                .with_label_values(&[&name, &id])
                .set(i64::from(result.is_ok()));
            match result {
                Ok(found) => ok.push((id, found)),
                Err(e) => {
                    tracing::info!(policy = %name, source = %id, reason = e.kind.reason(), error = %e, "discovery source failed");
                    failed.push((id, e));
                }
            }
        }
        // A failed source keeps what it found last time.
        let mut all = ok.clone();
        for (id, _) in &failed {
            let previous: Found = status
                .discovered_images
                .iter()
                .filter(|d| &d.source == id)
                .map(|d| (d.image.clone(), d.score))
                .collect();
            all.push((id.clone(), previous));
        }
        let filter = dp
            .spec
            .image_filter
            .as_deref()
            .map(regex::Regex::new)
            .transpose();
        let mut new = DiscoveryPolicyStatus {
            source_count: i32::try_from(dp.spec.sources.len()).unwrap_or(i32::MAX),
            ..status.clone()
        };
        let max = usize::try_from(dp.spec.max_images.max(1)).unwrap_or(1);
        match &filter {
            Ok(f) => new.discovered_images = discovery::rank(&all, f.as_ref(), max),
            Err(e) => failed.push((
                "imageFilter".into(),
                SourceError::new(FailureKind::InvalidConfig, format!("imageFilter: {e}")),
            )),
        }
        new.image_count = i32::try_from(new.discovered_images.len()).unwrap_or(i32::MAX);
        if !ok.is_empty() {
            new.last_sync_time = Some(Time(now));
        }
        let count = new.image_count;
        let (health, ready) = if failed.is_empty() {
            (
                Cond::new(
                    SOURCES_HEALTHY,
                    true,
                    "AllSourcesHealthy",
                    "All discovery sources responded successfully",
                ),
                Cond::ready(true, "Synced", format!("Discovered {count} images")),
            )
        } else {
            let detail = failed
                .iter()
                .map(|(id, e)| format!("{id}: {}", e.message))
                .collect::<Vec<_>>()
                .join("; ");
            let health = Cond::new(
                SOURCES_HEALTHY,
                false,
                failed[0].1.kind.reason(),
                detail.clone(),
            );
            let ready = if ok.is_empty() {
                Cond::ready(
                    false,
                    "SyncFailed",
                    format!(
                        "all {} sources failed, keeping the last {count} discovered images: {detail}",
                        failed.len()
                    ),
                )
            } else {
                Cond::ready(
                    false,
                    "PartiallyFailed",
                    format!(
                        "Discovered {count} images, but some sources failed: {}",
                        failed.len()
                    ),
                )
            };
            (health, ready)
        };
        conditions::set(&mut new.conditions, health, None, now);
        conditions::set(&mut new.conditions, ready, None, now);
        self.metrics
            .discovery_images_found
            .with_label_values(&[&name])
            .set(i64::from(count));

        let all_failed = ok.is_empty();
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                name,
                Attempt {
                    generation,
                    at: now,
                    all_failed,
                },
            );
        let next = if failed.is_empty() {
            interval
        } else {
            interval.min(RETRY_AFTER_FAILURE)
        };
        Ok(Plan::new().status(new).requeue_after(next))
    }

    fn deleted(&self, dp: &DiscoveryPolicy) {
        let name = dp.name_any();
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
        let _ = self
            .metrics
            .discovery_images_found
            .remove_label_values(&[&name]);
        for src in &dp.spec.sources {
            let _ = self
                .metrics
                .discovery_source_health
                .remove_label_values(&[&name, &source_id(src)]);
        }
    }
}
