//! The `drop_*` metrics. Labels are bounded: by CachedImage or DiscoveryPolicy (objects users create),
//! by a small set of reasons, never by node (node pools autoscale; a per-node label would grow without
//! bound). Series of a deleted object are removed with it.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// `reason` label of `drop_pull_errors_total` for a pull that outlived its timeout.
const PULL_TIMEOUT: &str = "PullTimeout";
/// `reason` label of `drop_pull_errors_total` for any failure that is not a kubelet pull error.
const POD_FAILED: &str = "PodFailed";

/// Drop's metric families.
#[derive(Clone)]
pub struct Metrics {
    /// `drop_images_cached_total{cachedimage}`.
    pub images_cached: IntCounterVec,
    /// `drop_pull_duration_seconds`.
    pub pull_duration: Histogram,
    /// `drop_pull_errors_total{cachedimage,reason}`.
    pub pull_errors: IntCounterVec,
    /// `drop_active_pulls`.
    pub active_pulls: IntGauge,
    /// `drop_reconcile_total{controller,result}`.
    pub reconcile: IntCounterVec,
    /// `drop_nodes_targeted{cachedimage}`.
    pub nodes_targeted: IntGaugeVec,
    /// `drop_nodes_cached{cachedimage}`.
    pub nodes_cached: IntGaugeVec,
    /// `drop_consecutive_failures{cachedimage}`.
    pub consecutive_failures: IntGaugeVec,
    /// `drop_discovery_images_found{policy}`.
    pub discovery_images_found: IntGaugeVec,
    /// `drop_discovery_source_health{policy,source}`.
    pub discovery_source_health: IntGaugeVec,
    /// `drop_discovery_source_latency_seconds{policy,source_type}`.
    pub discovery_source_latency: HistogramVec,
    /// `drop_warmup_taints_removed_total{reason}`: `Cached` or `Deadline`.
    pub warmup_released: IntCounterVec,
    /// `drop_warmup_duration_seconds`: from a node's creation to the removal of its warm-up taint.
    pub warmup_duration: Histogram,
    /// `drop_nodes_warming`: nodes carrying the warm-up taint.
    pub nodes_warming: IntGauge,
    /// `drop_registry_pulls_in_flight{registry}`, for registries with a budget.
    pub registry_in_flight: IntGaugeVec,
    /// `drop_registry_waiting_images{registry}`: images whose due pulls the budget holds back.
    pub registry_waiting: IntGaugeVec,
}

impl Metrics {
    /// Creates the families and registers them.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            images_cached: IntCounterVec::new(
                Opts::new(
                    "drop_images_cached_total",
                    "Total number of images successfully cached on nodes.",
                ),
                &["cachedimage"],
            )?,
            pull_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "drop_pull_duration_seconds",
                    "Duration of image pull operations in seconds.",
                )
                .buckets(prometheus::exponential_buckets(1.0, 2.0, 12)?),
            )?,
            pull_errors: IntCounterVec::new(
                Opts::new(
                    "drop_pull_errors_total",
                    "Total number of failed image pull attempts.",
                ),
                &["cachedimage", "reason"],
            )?,
            active_pulls: IntGauge::new(
                "drop_active_pulls",
                "Current number of active image pull Pods.",
            )?,
            reconcile: IntCounterVec::new(
                Opts::new(
                    "drop_reconcile_total",
                    "Total number of reconciliation attempts.",
                ),
                &["controller", "result"],
            )?,
            nodes_targeted: IntGaugeVec::new(
                Opts::new(
                    "drop_nodes_targeted",
                    "Number of nodes targeted by each CachedImage resource.",
                ),
                &["cachedimage"],
            )?,
            nodes_cached: IntGaugeVec::new(
                Opts::new(
                    "drop_nodes_cached",
                    "Number of nodes where the image is successfully cached.",
                ),
                &["cachedimage"],
            )?,
            consecutive_failures: IntGaugeVec::new(
                Opts::new(
                    "drop_consecutive_failures",
                    "Current number of consecutive pull failures for a CachedImage.",
                ),
                &["cachedimage"],
            )?,
            discovery_images_found: IntGaugeVec::new(
                Opts::new(
                    "drop_discovery_images_found",
                    "Number of images found by a discovery policy.",
                ),
                &["policy"],
            )?,
            discovery_source_health: IntGaugeVec::new(
                Opts::new(
                    "drop_discovery_source_health",
                    "Whether a discovery source is reachable and queryable (1=healthy, 0=unhealthy).",
                ),
                &["policy", "source"],
            )?,
            discovery_source_latency: HistogramVec::new(
                HistogramOpts::new(
                    "drop_discovery_source_latency_seconds",
                    "Latency of discovery source queries in seconds.",
                ),
                &["policy", "source_type"],
            )?,
            warmup_released: IntCounterVec::new(
                Opts::new(
                    "drop_warmup_taints_removed_total",
                    "Warm-up taints removed from nodes, by why: every image cached, or the deadline passed.",
                ),
                &["reason"],
            )?,
            warmup_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "drop_warmup_duration_seconds",
                    "Time from a node's creation until Drop removed its warm-up taint.",
                )
                .buckets(prometheus::exponential_buckets(1.0, 2.0, 12)?),
            )?,
            nodes_warming: IntGauge::new(
                "drop_nodes_warming",
                "Nodes that carry the warm-up taint, waiting for their images.",
            )?,
            registry_in_flight: IntGaugeVec::new(
                Opts::new(
                    "drop_registry_pulls_in_flight",
                    "Pulls in flight from a registry that has a pull budget.",
                ),
                &["registry"],
            )?,
            registry_waiting: IntGaugeVec::new(
                Opts::new(
                    "drop_registry_waiting_images",
                    "Images with pulls due that wait for their registry's pull budget.",
                ),
                &["registry"],
            )?,
        };
        registry.register(Box::new(m.registry_in_flight.clone()))?;
        registry.register(Box::new(m.registry_waiting.clone()))?;
        registry.register(Box::new(m.warmup_released.clone()))?;
        registry.register(Box::new(m.warmup_duration.clone()))?;
        registry.register(Box::new(m.nodes_warming.clone()))?;
        registry.register(Box::new(m.images_cached.clone()))?;
        registry.register(Box::new(m.pull_duration.clone()))?;
        registry.register(Box::new(m.pull_errors.clone()))?;
        registry.register(Box::new(m.active_pulls.clone()))?;
        registry.register(Box::new(m.reconcile.clone()))?;
        registry.register(Box::new(m.nodes_targeted.clone()))?;
        registry.register(Box::new(m.nodes_cached.clone()))?;
        registry.register(Box::new(m.consecutive_failures.clone()))?;
        registry.register(Box::new(m.discovery_images_found.clone()))?;
        registry.register(Box::new(m.discovery_source_health.clone()))?;
        registry.register(Box::new(m.discovery_source_latency.clone()))?;
        Ok(m)
    }

    /// Counts a failed pull. The `reason` label stays a small set: a kubelet pull-error reason,
    /// `PullTimeout`, or `PodFailed` for anything else (node rejections carry open-ended reasons).
    pub fn count_pull_error(&self, image: &str, reason: &str) {
        let label = if crate::podbuilder::PULL_ERRORS.contains(&reason) || reason == PULL_TIMEOUT {
            reason
        } else {
            POD_FAILED
        };
        self.pull_errors.with_label_values(&[image, label]).inc();
    }

    /// Sets an image's per-image gauges from the status it is about to record.
    pub fn record_image(&self, name: &str, status: &crate::api::CachedImageStatus) {
        self.nodes_targeted
            .with_label_values(&[name])
            .set(i64::from(status.nodes_targeted));
        self.nodes_cached
            .with_label_values(&[name])
            .set(i64::from(status.nodes_ready));
        self.consecutive_failures
            .with_label_values(&[name])
            .set(i64::from(status.consecutive_failures));
    }

    /// Removes every series of a deleted image (the gauges [`Metrics::record_image`] sets, its pull
    /// counters and errors).
    pub fn forget_image(&self, name: &str) {
        let _ = self.images_cached.remove_label_values(&[name]);
        let _ = self.nodes_targeted.remove_label_values(&[name]);
        let _ = self.nodes_cached.remove_label_values(&[name]);
        let _ = self.consecutive_failures.remove_label_values(&[name]);
        for reason in crate::podbuilder::PULL_ERRORS
            .iter()
            .chain([PULL_TIMEOUT, POD_FAILED].iter())
        {
            let _ = self.pull_errors.remove_label_values(&[name, reason]);
        }
    }
}
