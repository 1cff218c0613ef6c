//! The DiscoveryPolicy controller: queries the sources every `syncInterval` (and when the spec
//! changes), merges and ranks what they find, and publishes it in the status.
//!
//! It syncs on its own schedule, not on every reconcile: its own status writes (and anything else that
//! triggers a reconcile) do not re-query the sources. A source that fails keeps the images it found
//! last time, so a passing outage does not delete the children of the sets that use the policy; when
//! every source fails, the last good list stays.

use crate::api::{
    DiscoveryPolicy, DiscoveryPolicyStatus, DiscoverySource, MAX_MAX_IMAGES, SourceType,
};
use crate::discovery::client::{Credentials, redact};
use crate::discovery::{self, FailureKind, Found, SourceError, prometheus, registry};
use crate::metrics::Metrics;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Api, ResourceExt};
use kube_plan::conditions::{self, Cond};
use kube_plan::{Context, Plan, Reconciler};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The condition type saying whether every source answered.
pub const SOURCES_HEALTHY: &str = "SourcesHealthy";
/// Longest wait before retrying after a failed sync (or `syncInterval`, if shorter).
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// Longest a source may take within one sync (its requests have their own, shorter bounds; this
/// caps a source that keeps answering slowly, page after page). Sources are queried concurrently.
pub const SOURCE_DEADLINE: Duration = Duration::from_secs(120);

/// A sync this process made: the spec generation, when, whether a source failed, and the status it
/// produced. The status is kept so that a sync whose status write was lost is written again on the
/// next reconcile, instead of the policy showing the previous sync until the interval ends.
#[derive(Clone)]
struct Attempt {
    generation: Option<i64>,
    at: Timestamp,
    any_failed: bool,
    status: DiscoveryPolicyStatus,
}

impl Attempt {
    /// When the next sync is due: after a failure, within a minute.
    fn due(&self, interval: Duration) -> Timestamp {
        let every = if self.any_failed {
            interval.min(RETRY_AFTER_FAILURE)
        } else {
            interval
        };
        crate::pacing::after(self.at, every)
    }

    /// Whether `status` shows this sync's outcome (its write reached the API server).
    fn written_in(&self, status: Option<&DiscoveryPolicyStatus>) -> bool {
        let ready = |s: &DiscoveryPolicyStatus| {
            conditions::get(&s.conditions, conditions::READY)
                .map(|c| (c.reason.clone(), c.message.clone()))
        };
        status.is_some_and(|s| {
            s.last_sync_time == self.status.last_sync_time
                && s.discovered_images == self.status.discovered_images
                && ready(s) == ready(&self.status)
        })
    }
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

    fn attempts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Attempt>> {
        self.attempts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queries one source (its Secret, then the source), bounded by [`SOURCE_DEADLINE`], and records
    /// its latency and health.
    async fn sync_source(
        &self,
        policy: &str,
        src: &DiscoverySource,
        ctx: &Context,
    ) -> (String, Result<Found, SourceError>) {
        let id = source_id(src);
        let started = Instant::now();
        let work = async {
            let creds = credentials(ctx, &self.namespace, src).await?;
            query(src, &creds, ctx.now()).await
        };
        let result = tokio::time::timeout(SOURCE_DEADLINE, work)
            .await
            .unwrap_or_else(|_| {
                Err(SourceError::new(
                    FailureKind::Timeout,
                    format!("no complete answer within {}s", SOURCE_DEADLINE.as_secs()),
                ))
            });
        let kind = format!("{:?}", src.type_).to_lowercase();
        self.metrics
            .discovery_source_latency
            .with_label_values(&[policy, &kind])
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .discovery_source_health
            .with_label_values(&[policy, &id])
            .set(i64::from(result.is_ok()));
        if let Err(e) = &result {
            tracing::info!(%policy, source = %id, reason = e.kind.reason(), error = %e, "discovery source failed");
        }
        (id, result)
    }
}

/// The `Ready` condition of a sync: `Synced`; `PartiallyFailed` when some sources answered; when none
/// did, the failure class itself (`DNSError`, `ConnectionRefused`, ...) if they all failed alike, else
/// `SourceError`.
fn ready_condition(answered: usize, failed: &[(String, SourceError)], count: i32) -> Cond {
    if failed.is_empty() {
        return Cond::ready(true, "Synced", format!("Discovered {count} images"));
    }
    let detail = failed
        .iter()
        .map(|(id, e)| format!("{id}: {}", e.message))
        .collect::<Vec<_>>()
        .join("; ");
    if answered > 0 {
        return Cond::ready(
            false,
            "PartiallyFailed",
            format!(
                "Discovered {count} images, but some sources failed: {}",
                failed.len()
            ),
        );
    }
    let first = failed[0].1.kind;
    let reason = if failed.iter().all(|(_, e)| e.kind == first) {
        first.reason()
    } else {
        FailureKind::SourceError.reason()
    };
    let kept = match count {
        0 => "no images discovered yet".to_owned(),
        1 => "keeping the 1 image found before".to_owned(),
        n => format!("keeping the {n} images found before"),
    };
    let message = match failed.len() {
        1 => format!("{detail} ({kept})"),
        n => format!("All {n} sources failed: {detail} ({kept})"),
    };
    Cond::ready(false, reason, message)
}

/// How a source is named in `discoveredImages[].source`: stable across reorderings of the list.
pub fn source_id(src: &DiscoverySource) -> String {
    match (src.type_, &src.prometheus, &src.registry) {
        (SourceType::Prometheus, Some(p), _) => {
            format!("prometheus {}", redact(&p.endpoint).trim_end_matches('/'))
        }
        (SourceType::Registry, _, Some(r)) => {
            format!("registry {}", redact(&r.url).trim_end_matches('/'))
        }
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
            format!("reading Secret {:?}: {}", r.name, kube_plan::describe(&e)),
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

        // Due? After this process's last sync of this generation; else (after a start, or a spec
        // change) after the last successful sync any process recorded for this generation.
        let last = self
            .attempts()
            .get(&name)
            .filter(|a| a.generation == generation)
            .cloned();
        let due = match &last {
            Some(a) => Some(a.due(interval)),
            None => status
                .last_sync_time
                .as_ref()
                .filter(|_| status.observed_generation == generation)
                .map(|t| crate::pacing::after(t.0, interval)),
        };
        if let Some(due) = due.filter(|due| *due > now) {
            let plan = Plan::new().requeue_after(due.duration_since(now).unsigned_abs());
            // The last sync's status write did not land (it failed, or the write was lost in a
            // restart of the API server): write it again rather than query the sources again.
            return Ok(match last {
                Some(a) if !a.written_in(dp.status.as_ref()) => plan.status(a.status),
                _ => plan,
            });
        }

        let results = futures::future::join_all(
            dp.spec
                .sources
                .iter()
                .map(|src| self.sync_source(&name, src, ctx)),
        )
        .await;
        let mut ok: Vec<(String, Found)> = Vec::new();
        let mut failed: Vec<(String, SourceError)> = Vec::new();
        for (id, result) in results {
            match result {
                Ok(found) => ok.push((id, found)),
                Err(e) => failed.push((id, e)),
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
        let max = usize::try_from(dp.spec.max_images.clamp(1, MAX_MAX_IMAGES)).unwrap_or(1);
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
        let health = match failed.first() {
            None => Cond::new(
                SOURCES_HEALTHY,
                true,
                "AllSourcesHealthy",
                "All discovery sources responded successfully",
            ),
            Some((_, first)) => Cond::new(
                SOURCES_HEALTHY,
                false,
                first.kind.reason(),
                failed
                    .iter()
                    .map(|(id, e)| format!("{id}: {}", e.message))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        };
        let ready = ready_condition(ok.len(), &failed, count);
        let was = conditions::get(&status.conditions, conditions::READY).map(|c| c.reason.clone());
        let mut plan = Plan::new();
        // An Event when the outcome changes (not every retry): a failure, and the recovery.
        if was.as_deref() != Some(ready.reason.as_str()) {
            if failed.is_empty() {
                if was.is_some() {
                    plan = plan.event("Synced", ready.message.clone());
                }
            } else {
                plan = plan.warning(&ready.reason, ready.message.clone());
            }
        }
        conditions::set(&mut new.conditions, health, None, now);
        conditions::set(&mut new.conditions, ready, None, now);
        self.metrics
            .discovery_images_found
            .with_label_values(&[&name])
            .set(i64::from(count));

        let attempt = Attempt {
            generation,
            at: now,
            any_failed: !failed.is_empty(),
            status: new.clone(),
        };
        let next = attempt.due(interval).duration_since(now).unsigned_abs();
        self.attempts().insert(name, attempt);
        Ok(plan.status(new).requeue_after(next))
    }

    fn deleted(&self, dp: &DiscoveryPolicy) {
        let name = dp.name_any();
        self.attempts().remove(&name);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: FailureKind, message: &str) -> SourceError {
        SourceError::new(kind, message)
    }

    #[test]
    fn discovery_ready_reason_is_the_failure_class_when_every_source_fails() {
        let dns = (
            "registry http://x.invalid".to_owned(),
            err(FailureKind::DnsError, "lookup x.invalid: no such host"),
        );
        let c = ready_condition(0, std::slice::from_ref(&dns), 0);
        assert_eq!(c.reason, "DNSError");
        assert_eq!(
            c.message,
            "registry http://x.invalid: lookup x.invalid: no such host (no images discovered yet)"
        );
        let refused = (
            "prometheus http://p".to_owned(),
            err(FailureKind::ConnectionRefused, "connection refused"),
        );
        let c = ready_condition(0, &[dns.clone(), refused.clone()], 3);
        assert_eq!(c.reason, "SourceError", "different classes");
        assert!(
            c.message.starts_with("All 2 sources failed: "),
            "{}",
            c.message
        );
        assert!(
            c.message.ends_with("(keeping the 3 images found before)"),
            "{}",
            c.message
        );
        let c = ready_condition(1, &[refused], 2);
        assert_eq!(c.reason, "PartiallyFailed");
        assert_eq!(c.message, "Discovered 2 images, but some sources failed: 1");
        assert_eq!(ready_condition(2, &[], 2).reason, "Synced");
    }

    fn attempt(any_failed: bool, images: usize) -> Attempt {
        let mut status = DiscoveryPolicyStatus {
            discovered_images: (0..images)
                .map(|i| crate::api::DiscoveredImage {
                    image: format!("r/i:{i}"),
                    score: 1,
                    source: "s".into(),
                })
                .collect(),
            ..DiscoveryPolicyStatus::default()
        };
        conditions::set(
            &mut status.conditions,
            ready_condition(1, &[], 1),
            None,
            Timestamp::UNIX_EPOCH,
        );
        Attempt {
            generation: Some(1),
            at: Timestamp::UNIX_EPOCH,
            any_failed,
            status,
        }
    }

    #[test]
    fn discovery_a_sync_with_a_failed_source_is_retried_within_a_minute() {
        let hour = Duration::from_secs(3600);
        let at = |secs| Timestamp::from_second(secs).unwrap();
        assert_eq!(
            attempt(true, 1).due(hour),
            at(60),
            "partial or total failure"
        );
        assert_eq!(attempt(false, 1).due(hour), at(3600));
        assert_eq!(attempt(true, 1).due(Duration::from_secs(20)), at(20));
    }

    #[test]
    fn discovery_a_sync_whose_status_write_was_lost_is_written_again() {
        let a = attempt(false, 2);
        assert!(a.written_in(Some(&a.status)));
        assert!(!a.written_in(None));
        let stale = attempt(false, 1).status;
        assert!(!a.written_in(Some(&stale)), "the previous sync's status");
    }
}
