//! One process running Drop's controllers.

use crate::api::{self, CachedImage, DiscoveryPolicy, PullPolicy};
use crate::cachedimage::{self, CachedImageReconciler, pacer::Pacer};
use crate::cachedimageset::{self, CachedImageSetReconciler};
use crate::discoverypolicy::DiscoveryPolicyReconciler;
use crate::metrics::Metrics;
use crate::podbuilder::{self, PullPodView};
use crate::warmup::{Warden, Warmup};
use k8s_openapi::api::core::v1::{Node, Pod, Toleration};
use kube_plan::{Controller, LeaderElection, Operator, OperatorError};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How to run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespace of the pull Pods (and of the Secrets discovery reads).
    pub pod_namespace: String,
    /// How long a pull may take before it counts as failed.
    pub pull_timeout: Duration,
    /// Where to serve `/metrics`.
    pub metrics_addr: Option<SocketAddr>,
    /// Serve `/metrics` over TLS to authorised callers only, with this certificate (`None`: plain
    /// HTTP to anyone who can reach the port).
    pub metrics_tls: Option<kube_plan::metrics_auth::Certificate>,
    /// Where to serve `/healthz` and `/readyz`.
    pub health_addr: Option<SocketAddr>,
    /// Reconcile only while holding this Lease.
    pub leader_election: Option<LeaderElection>,
    /// Apply the CRDs at start (otherwise: fail clearly if they are missing).
    pub install_crds: bool,
    /// Only reconcile objects whose labels match this selector (sharding; test isolation).
    pub watch_selector: Option<String>,
    /// During a rollout, progress reaches an image's or a set's status at most this often
    /// (condition transitions are written at once).
    pub status_interval: Duration,
    /// The kubelets' `nodeStatusMaxImages` (negative: no limit): an image missing from a node's
    /// image list counts as gone only while the list is shorter than this.
    pub node_status_max_images: i32,
    /// Keep the warm-up taint on new nodes until their images are cached (`None`: off).
    pub warmup: Option<Warmup>,
    /// The most pulls in flight per registry host, across every policy and image.
    pub registry_budgets: BTreeMap<String, u32>,
}

impl Default for Settings {
    /// The command line's defaults: pull Pods in `drop-system`, no endpoints, no election.
    fn default() -> Self {
        Self {
            pod_namespace: "drop-system".into(),
            pull_timeout: Duration::from_secs(15 * 60),
            metrics_addr: None,
            metrics_tls: None,
            health_addr: None,
            leader_election: None,
            install_crds: false,
            watch_selector: None,
            status_interval: STATUS_INTERVAL,
            node_status_max_images: NODE_STATUS_MAX_IMAGES,
            warmup: None,
            registry_budgets: BTreeMap::new(),
        }
    }
}

/// The default of [`Settings::node_status_max_images`]: the kubelet's default.
pub const NODE_STATUS_MAX_IMAGES: i32 = cachedimage::presence::KUBELET_MAX_IMAGES;

fn primary_watch(selector: Option<&str>) -> kube::runtime::watcher::Config {
    let config = kube::runtime::watcher::Config::default();
    match selector {
        Some(s) => config.labels(s),
        None => config,
    }
}

/// The field manager and Event reporter name.
pub const NAME: &str = "drop";

/// The default of [`Settings::status_interval`].
pub const STATUS_INTERVAL: Duration = Duration::from_secs(2);

/// Runs Drop with `client` until `shutdown` resolves.
pub async fn run(
    client: kube::Client,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), OperatorError> {
    run_operator(Operator::new(NAME, client), settings, shutdown).await
}

/// Runs Drop on the cluster `config` describes until `shutdown` resolves. Under leader election
/// this fences writes more tightly than [`run`] can (see [`Operator::from_config`]).
pub async fn run_from_config(
    config: kube::Config,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), OperatorError> {
    run_operator(Operator::from_config(NAME, config)?, settings, shutdown).await
}

async fn run_operator(
    mut operator: Operator,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), OperatorError> {
    // The warm-up warden removes Node taints from inside the Node watch: through the leader's
    // fence, as the controllers write.
    let fenced = operator.leader_client()?;
    let metrics = Metrics::register(operator.registry())?;
    let (wake_tx, wake_rx) = tokio::sync::mpsc::unbounded_channel();
    let wake =
        futures::stream::unfold(
            wake_rx,
            |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
        );
    let budgets = settings
        .registry_budgets
        .iter()
        .map(|(registry, n)| (registry.as_str().into(), *n))
        .collect();
    let pacer = Arc::new(Pacer::new(wake_tx, settings.pull_timeout).with_registry_budgets(budgets));
    let retargeting = pacer.clone();
    let max_images = settings.node_status_max_images;
    let warden = settings
        .warmup
        .clone()
        .map(|w| Warden::new(fenced.clone(), w, metrics.clone(), NAME));
    // What every pull Pod tolerates besides its image's and policy's tolerations.
    let tolerations: Vec<Toleration> = warden.iter().map(|w| w.warmup().toleration()).collect();
    let reconciler = CachedImageReconciler {
        pacer,
        namespace: settings.pod_namespace.clone(),
        metrics: metrics.clone(),
        tolerations: tolerations.clone(),
        warden: warden.clone(),
        targets: cachedimage::targets::TargetMemo::default(),
    };
    let cachedimages = Controller::new("cachedimage", reconciler)
        .primary_watch(primary_watch(settings.watch_selector.as_deref()))
        .coalesce_status(settings.status_interval)
        .owns_in::<Pod>(&settings.pod_namespace)
        .trim_cached::<Pod>(podbuilder::trim)
        // A pull Pod matters when its pull ends (or it goes before that), not at each of its
        // status updates, nor when it appears or a finished one goes.
        .reconcile_on_transition::<Pod, _>(
            |pod| PullPodView::of(pod).map(|v| v.outcome),
            cachedimage::pull_pod_news,
        )
        .watches_on::<Node, _, _, _>(cachedimage::targets::relevance, move |node, images| {
            if let Some(warden) = &warden {
                warden.node_changed(node, || {
                    retargeting.missing_on(node, images, warden.judging())
                });
            }
            let mut wake = retargeting.retargeted_by(node, images, &tolerations);
            wake.extend(retargeting.node_images_changed(node, max_images));
            wake
        })
        .trim_cached::<Node>(cachedimage::targets::trim)
        .watches::<PullPolicy, _>(cachedimage::images_using)
        .trigger(wake);
    let sets = Controller::new("cachedimageset", CachedImageSetReconciler)
        .primary_watch(primary_watch(settings.watch_selector.as_deref()))
        .coalesce_status(settings.status_interval)
        .owns::<CachedImage>()
        .watches::<DiscoveryPolicy, _>(cachedimageset::sets_using);
    let discovery = Controller::new(
        "discoverypolicy",
        DiscoveryPolicyReconciler::new(&settings.pod_namespace, metrics.clone()),
    )
    .primary_watch(primary_watch(settings.watch_selector.as_deref()));
    operator = operator
        .count_reconciles_in(metrics.reconcile.clone())
        .controller(cachedimages)
        .controller(sets)
        .controller(discovery);
    if let Some(addr) = settings.metrics_addr {
        operator = operator.metrics_addr(addr);
    }
    if let Some(certificate) = settings.metrics_tls {
        operator = operator.secure_metrics(certificate);
    }
    if let Some(addr) = settings.health_addr {
        operator = operator.health_addr(addr);
    }
    if let Some(le) = settings.leader_election {
        operator = operator.leader_election(le);
    }
    operator = if settings.install_crds {
        operator.install_crds(api::crds())
    } else {
        operator.require_crds(api::crds())
    };
    operator.run_until(shutdown).await
}
