//! Reconcile metrics, named as controller-runtime names them so existing dashboards and alerts apply.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `controller_runtime_reconcile_total` | counter | `controller`, `result` (`success`, `error`, `requeue_after`) |
//! | `controller_runtime_reconcile_errors_total` | counter | `controller` |
//! | `controller_runtime_reconcile_time_seconds` | histogram | `controller` |
//! | `controller_runtime_active_workers` | gauge | `controller` |
//! | `controller_runtime_max_concurrent_reconciles` | gauge | `controller` |
//! | `leader_election_master_status` | gauge | `name` |
//!
//! Operators register their own metrics on the same [`prometheus::Registry`], served at `/metrics`.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// The framework's metric families, registered once per operator.
#[derive(Clone)]
pub struct Metrics {
    pub(crate) reconcile_total: IntCounterVec,
    pub(crate) reconcile_errors: IntCounterVec,
    pub(crate) reconcile_time: HistogramVec,
    pub(crate) active_workers: IntGaugeVec,
    pub(crate) max_concurrent: IntGaugeVec,
    pub(crate) waiting: IntGaugeVec,
    pub(crate) wait_time: HistogramVec,
    pub(crate) leader: GaugeVec,
    /// Counters of the operator's own that count reconciles too (labels `controller`, `result`).
    pub(crate) also_reconciles: Vec<IntCounterVec>,
}

impl Metrics {
    /// Creates the families and registers them on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            reconcile_total: IntCounterVec::new(
                Opts::new(
                    "controller_runtime_reconcile_total",
                    "Total number of reconciliations per controller",
                ),
                &["controller", "result"],
            )?,
            reconcile_errors: IntCounterVec::new(
                Opts::new(
                    "controller_runtime_reconcile_errors_total",
                    "Total number of reconciliation errors per controller",
                ),
                &["controller"],
            )?,
            reconcile_time: HistogramVec::new(
                HistogramOpts::new(
                    "controller_runtime_reconcile_time_seconds",
                    "Length of time per reconciliation per controller",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ]),
                &["controller"],
            )?,
            active_workers: IntGaugeVec::new(
                Opts::new(
                    "controller_runtime_active_workers",
                    "Number of currently used workers per controller",
                ),
                &["controller"],
            )?,
            max_concurrent: IntGaugeVec::new(
                Opts::new(
                    "controller_runtime_max_concurrent_reconciles",
                    "Maximum number of concurrent reconciles per controller",
                ),
                &["controller"],
            )?,
            waiting: IntGaugeVec::new(
                Opts::new(
                    "workqueue_depth",
                    "Number of objects due a reconcile and waiting for a free worker",
                ),
                &["name"],
            )?,
            wait_time: HistogramVec::new(
                HistogramOpts::new(
                    "workqueue_queue_duration_seconds",
                    "How long an object due a reconcile waited for a free worker",
                )
                .buckets(vec![
                    0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                ]),
                &["name"],
            )?,
            leader: GaugeVec::new(
                Opts::new(
                    "leader_election_master_status",
                    "1 while this instance leads, 0 otherwise",
                ),
                &["name"],
            )?,
            also_reconciles: Vec::new(),
        };
        registry.register(Box::new(m.reconcile_total.clone()))?;
        registry.register(Box::new(m.reconcile_errors.clone()))?;
        registry.register(Box::new(m.reconcile_time.clone()))?;
        registry.register(Box::new(m.active_workers.clone()))?;
        registry.register(Box::new(m.max_concurrent.clone()))?;
        registry.register(Box::new(m.waiting.clone()))?;
        registry.register(Box::new(m.wait_time.clone()))?;
        registry.register(Box::new(m.leader.clone()))?;
        Ok(m)
    }
}

impl Metrics {
    /// Counts one reconcile of `controller` that ended with `result`.
    pub(crate) fn count_reconcile(&self, controller: &str, result: &str) {
        for counter in std::iter::once(&self.reconcile_total).chain(&self.also_reconciles) {
            counter.with_label_values(&[controller, result]).inc();
        }
    }
}

/// Renders every family of `registry` in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}
