//! One process running several controllers, with metrics, probes, leader election and graceful shutdown.

use crate::ObjectStatus;
use crate::controller::Controller;
use crate::crd::{self, CrdError};
use crate::fence::Fence;
use crate::http::{self, Probes, SecureBindError};
use crate::leader::{Candidate, LeaderElection, LeaderError};
use crate::metrics::Metrics;
use crate::metrics_auth::Certificate;
use crate::reconciler::Reconciler;
use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::core::object::HasStatus;
use kube::runtime::events::{Recorder, Reporter};
use prometheus::Registry;
use serde::Serialize;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::watch;

/// Errors that stop an operator.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// A probe or metrics address could not be bound.
    #[error("binding {what} address {addr}: {source}")]
    Bind {
        /// Which endpoint.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The secure metrics endpoint's certificate could not be loaded or made.
    #[error("metrics TLS: {0}")]
    MetricsTls(#[from] crate::metrics_auth::TlsError),
    /// CRDs are missing or could not be installed.
    #[error(transparent)]
    Crd(#[from] CrdError),
    /// Leadership was lost; the process should exit so a fresh one can campaign.
    #[error(transparent)]
    Leader(#[from] LeaderError),
    /// No client could be built from the given configuration.
    #[error("building a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// Metrics could not be registered.
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A controller stopped on its own (it panicked, or its watches ended): the process can no
    /// longer do that controller's work and should exit so that it is restarted.
    #[error("controller {controller} stopped: {reason}")]
    ControllerStopped {
        /// The controller's name.
        controller: String,
        /// Why: the panic message, or that it ended.
        reason: String,
    },
}

type StartFn = (
    String,
    Box<
        dyn FnOnce(
                Client,
                Recorder,
                Metrics,
                watch::Receiver<bool>,
            ) -> (BoxFuture<'static, ()>, BoxFuture<'static, ()>)
            + Send,
    >,
);

enum CrdMode {
    None,
    Install(Vec<CustomResourceDefinition>),
    Require(Vec<CustomResourceDefinition>),
}

/// Runs controllers until SIGTERM/SIGINT (or a given shutdown future).
///
/// ```no_run
/// # use kube_plan::{Operator, Controller};
/// # async fn run(client: kube::Client) -> Result<(), kube_plan::OperatorError> {
/// Operator::new("my-operator", client)
///     .metrics_addr("0.0.0.0:8080".parse().unwrap())
///     .health_addr("0.0.0.0:8081".parse().unwrap())
///     // .controller(Controller::new("widget", WidgetReconciler))
///     .run()
///     .await
/// # }
/// ```
pub struct Operator {
    name: String,
    client: Client,
    /// Where `client` came from, when known: with it, a leader's writes are fenced at the last
    /// moment (see [`Operator::from_config`]).
    config: Option<kube::Config>,
    /// Open while this replica may write: while it leads, with an election; once it runs, without.
    pub(crate) fence: Fence,
    /// The client fenced by it, made once: the controllers and [`Operator::leader_client`] share
    /// its connections.
    fenced: std::sync::OnceLock<Client>,
    registry: Registry,
    starts: Vec<StartFn>,
    metrics_addr: Option<SocketAddr>,
    metrics_tls: Option<Certificate>,
    health_addr: Option<SocketAddr>,
    leader: Option<LeaderElection>,
    crds: CrdMode,
    identity: Option<String>,
    reconcile_counters: Vec<prometheus::IntCounterVec>,
    graceful_shutdown_timeout: Duration,
}

/// A client whose writes pass only while `fence` is open: checked as a write goes out when the
/// `config` is known, as it enters `client` otherwise.
fn fenced_client(
    fence: &Fence,
    config: Option<&kube::Config>,
    client: &Client,
) -> Result<Client, OperatorError> {
    match config {
        Some(config) => fence
            .client_from_config(config)
            .map_err(OperatorError::Client),
        None => Ok(fence.client(client.clone())),
    }
}

/// The default of [`Operator::graceful_shutdown_timeout`] (controller-runtime's too).
pub const GRACEFUL_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

impl Operator {
    /// An operator named `name` (the Event reporter and default field-manager prefix).
    ///
    /// With [leader election](Operator::leader_election), prefer [`Operator::from_config`]: a
    /// finished `client` can only be fenced when a write enters it, not when it goes out.
    pub fn new(name: &str, client: Client) -> Self {
        Self {
            name: name.to_owned(),
            client,
            config: None,
            fence: Fence::default(),
            fenced: std::sync::OnceLock::new(),
            registry: Registry::new(),
            starts: Vec::new(),
            metrics_addr: None,
            metrics_tls: None,
            health_addr: None,
            leader: None,
            crds: CrdMode::None,
            identity: None,
            reconcile_counters: Vec::new(),
            graceful_shutdown_timeout: GRACEFUL_SHUTDOWN_TIMEOUT,
        }
    }

    /// An operator named `name` that talks to the cluster `config` describes.
    ///
    /// Under [leader election](Operator::leader_election) the controllers' client is then built
    /// here too, so that a write is refused at the moment it would be written to its connection
    /// once the leadership has lapsed. A replica frozen (a long pause, SIGSTOP, a stalled VM) while
    /// a write waited for a connection cannot send it after a standby took over.
    ///
    /// ```no_run
    /// # use kube_plan::{LeaderElection, Operator};
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = kube::Config::infer().await?;
    /// Operator::from_config("my-operator", config)?
    ///     .leader_election(LeaderElection::new("my-operator", "my-namespace", "pod-0"))
    ///     // .controller(Controller::new("widget", WidgetReconciler))
    ///     .run()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_config(name: &str, config: kube::Config) -> Result<Self, OperatorError> {
        let client = Client::try_from(config.clone()).map_err(OperatorError::Client)?;
        let mut operator = Self::new(name, client);
        operator.config = Some(config);
        Ok(operator)
    }

    /// The client the operator was made with (unfenced: for work outside its controllers).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A client for the operator's own writes beside its controllers' (a task it starts, a
    /// callback of a watch), held to the same rule as theirs. With [leader
    /// election](Operator::leader_election), its writes go out only while this replica can be sure
    /// it holds the Lease, so a replica resumed after a pause cannot write over the new leader's
    /// work; without, once the operator runs. Before [`Operator::run`] it refuses every write.
    /// Reads always pass.
    ///
    /// ```no_run
    /// # async fn example(config: kube::Config) -> Result<(), kube_plan::OperatorError> {
    /// use kube_plan::{LeaderElection, Operator};
    ///
    /// let operator = Operator::from_config("my-operator", config)?
    ///     .leader_election(LeaderElection::new("my-operator", "my-namespace", "pod-0"));
    /// let writer = operator.leader_client()?;
    /// // Give `writer` to whatever part of the operator writes outside a reconcile.
    /// # drop(writer);
    /// operator.run().await
    /// # }
    /// ```
    pub fn leader_client(&self) -> Result<Client, OperatorError> {
        if let Some(fenced) = self.fenced.get() {
            return Ok(fenced.clone());
        }
        let fenced = fenced_client(&self.fence, self.config.as_ref(), &self.client)?;
        Ok(self.fenced.get_or_init(|| fenced).clone())
    }

    /// The registry served at `/metrics`; register the operator's own metrics here.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts every reconcile in `counter` too, beside `controller_runtime_reconcile_total`, for an
    /// operator that publishes the count under its own name. The counter needs the labels
    /// `controller` and `result` (`success`, `requeue_after`, `error`); register it yourself.
    pub fn count_reconciles_in(mut self, counter: prometheus::IntCounterVec) -> Self {
        self.reconcile_counters.push(counter);
        self
    }

    /// Uses `registry` for `/metrics` instead of a fresh one.
    pub fn with_registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    /// Adds a controller.
    pub fn controller<R>(mut self, controller: Controller<R>) -> Self
    where
        R: Reconciler,
        <R::Resource as HasStatus>::Status:
            ObjectStatus + Serialize + Clone + Default + Send + Sync,
    {
        let name = controller.name().to_owned();
        self.starts.push((
            name,
            Box::new(move |client, recorder, metrics, shutdown| {
                controller.start(client, recorder, metrics, shutdown)
            }),
        ));
        self
    }

    /// Serves `/metrics` on `addr`.
    pub fn metrics_addr(mut self, addr: SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
    }

    /// Serves `/metrics` over TLS, only to callers the API server authenticates (TokenReview) and
    /// allows to `get` the non-resource URL `/metrics` (SubjectAccessReview); the health probes stay
    /// on [`Operator::health_addr`]. The operator's identity needs `create` on `tokenreviews` and
    /// `subjectaccessreviews`. See [`crate::metrics_auth`].
    ///
    /// ```no_run
    /// # use kube_plan::{Operator, metrics_auth::Certificate};
    /// # async fn run(client: kube::Client) -> Result<(), kube_plan::OperatorError> {
    /// Operator::new("my-operator", client)
    ///     .metrics_addr("0.0.0.0:8443".parse().unwrap())
    ///     .secure_metrics(Certificate::SelfSigned)
    ///     .health_addr("0.0.0.0:8081".parse().unwrap())
    ///     .run()
    ///     .await
    /// # }
    /// ```
    pub fn secure_metrics(mut self, certificate: Certificate) -> Self {
        self.metrics_tls = Some(certificate);
        self
    }

    /// Serves `/healthz` and `/readyz` on `addr`.
    pub fn health_addr(mut self, addr: SocketAddr) -> Self {
        self.health_addr = Some(addr);
        self
    }

    /// Reconciles only while holding the Lease described by `election`.
    pub fn leader_election(mut self, election: LeaderElection) -> Self {
        self.identity = Some(election.identity.clone());
        self.leader = Some(election);
        self
    }

    /// How long a graceful stop waits for running reconciles before it cuts them (default
    /// [`GRACEFUL_SHUTDOWN_TIMEOUT`]). A reconcile stuck on a request that never answers then cannot
    /// keep the process, and the Lease it holds, from going.
    pub fn graceful_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.graceful_shutdown_timeout = timeout;
        self
    }

    /// Applies these CRDs at start and waits until they are established.
    pub fn install_crds(mut self, crds: Vec<CustomResourceDefinition>) -> Self {
        self.crds = CrdMode::Install(crds);
        self
    }

    /// Fails at start, with a clear message, if these CRDs are not installed.
    pub fn require_crds(mut self, crds: Vec<CustomResourceDefinition>) -> Self {
        self.crds = CrdMode::Require(crds);
        self
    }

    /// Runs until SIGTERM or SIGINT.
    pub async fn run(self) -> Result<(), OperatorError> {
        self.run_until(shutdown_signal()).await
    }

    /// Runs until `shutdown` resolves: then stops taking new work, lets running reconciles finish, and
    /// releases leadership.
    pub async fn run_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), OperatorError> {
        let mut metrics = Metrics::register(&self.registry)?;
        metrics.also_reconciles = std::mem::take(&mut self.reconcile_counters);
        let probes = Probes::new(self.registry.clone());
        if let (Some(addr), Some(certificate)) = (self.metrics_addr, &self.metrics_tls) {
            let (bound, serve) =
                http::bind_secure(addr, probes.clone(), self.client.clone(), certificate)
                    .await
                    .map_err(|e| match e {
                        SecureBindError::Tls(e) => OperatorError::MetricsTls(e),
                        SecureBindError::Io(source) => OperatorError::Bind {
                            what: "metrics",
                            addr,
                            source,
                        },
                    })?;
            tracing::info!(%bound, "serving metrics over TLS to authorised callers");
            tokio::spawn(serve);
        }
        // In clear text: the probes everywhere, and `/metrics` unless they are served securely.
        let plain = self.metrics_tls.is_none();
        let plain_metrics = self.metrics_addr.filter(|_| plain);
        for (what, addr) in [
            ("metrics", plain_metrics),
            ("health probe", self.health_addr),
        ] {
            let Some(addr) = addr else { continue };
            let (bound, serve) = http::bind(addr, probes.clone(), plain)
                .await
                .map_err(|source| OperatorError::Bind { what, addr, source })?;
            tracing::info!(%bound, "serving {what}");
            tokio::spawn(serve);
        }
        match &self.crds {
            CrdMode::None => {}
            CrdMode::Install(crds) => {
                crd::install(&self.client, crds, &self.name, Duration::from_secs(60)).await?
            }
            CrdMode::Require(crds) => crd::check_installed(&self.client, crds).await?,
        }

        let (stop_tx, stop_rx) = watch::channel(false);
        let mut shutdown = shutdown.boxed().shared();
        let mut candidate = self
            .leader
            .clone()
            .map(|cfg| Candidate::new(self.client.clone(), cfg, self.fence.clone()));
        if let Some(c) = candidate.as_mut() {
            tracing::info!(lease = %c_name(&self.leader), "waiting for leadership");
            // A standby that knows who leads is ready (it is healthy and waiting); the leader becomes
            // ready once its caches have synced.
            tokio::select! {
                _ = c.acquire(|| probes.set_ready(true)) => {}
                _ = shutdown.clone() => return Ok(()),
            }
            probes.set_ready(false);
            metrics.leader.with_label_values(&[&self.name]).set(1.0);
            tracing::info!("became leader");
        }

        // With an election, controllers write through the leader's fence; the election itself (and
        // the CRD install above) uses the plain client.
        let client = match candidate.as_ref() {
            Some(_) => self.leader_client()?,
            None => {
                self.fence.open_always();
                self.client.clone()
            }
        };
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: self.name.clone(),
                instance: self.identity.clone(),
            },
        );
        let mut runs = Vec::new();
        let mut readies = Vec::new();
        let mut names = Vec::new();
        for (name, start) in self.starts {
            let (run, ready) = start(
                client.clone(),
                recorder.clone(),
                metrics.clone(),
                stop_rx.clone(),
            );
            runs.push(tokio::spawn(run));
            readies.push(ready);
            names.push(name);
        }
        let ready_probes = probes.clone();
        tokio::spawn(async move {
            futures::future::join_all(readies).await;
            ready_probes.set_ready(true);
            tracing::info!("caches synced; ready");
        });

        let lost = async {
            match candidate.as_mut() {
                Some(c) => c.keep().await,
                None => futures::future::pending().await,
            }
        };
        // A controller task ends only at shutdown; one that ends before has panicked (or its watches
        // stopped for good), and a process that runs on without it looks healthy while doing nothing.
        let stopped = async {
            if runs.is_empty() {
                return futures::future::pending().await;
            }
            let (result, index, _) = futures::future::select_all(runs.iter_mut()).await;
            OperatorError::ControllerStopped {
                controller: names.get(index).cloned().unwrap_or_default(),
                reason: match result {
                    Ok(()) => "it ended before shutdown".to_owned(),
                    Err(e) if e.is_panic() => format!("it panicked: {}", panic_message(e)),
                    Err(e) => e.to_string(),
                },
            }
        };
        let outcome = tokio::select! {
            _ = &mut shutdown => Ok(()),
            e = lost => Err(OperatorError::from(e)),
            e = stopped => Err(e),
        };
        probes.set_ready(false);
        match &outcome {
            Ok(()) => {
                // Graceful: no new work, running reconciles finish, then leadership is released.
                tracing::info!("stopping controllers");
                let _ = stop_tx.send(true);
                let drained = futures::future::join_all(runs.iter_mut());
                if tokio::time::timeout(self.graceful_shutdown_timeout, drained)
                    .await
                    .is_err()
                {
                    let running: Vec<&str> = runs
                        .iter()
                        .zip(&names)
                        .filter(|(r, _)| !r.is_finished())
                        .map(|(_, n)| n.as_str())
                        .collect();
                    tracing::warn!(
                        controllers = ?running,
                        timeout = ?self.graceful_shutdown_timeout,
                        "reconciles still running after the graceful shutdown timeout; cutting them"
                    );
                    for r in &runs {
                        r.abort();
                    }
                }
            }
            Err(e) => {
                // Leadership lost or a controller gone: another replica may already be reconciling,
                // so nothing of this process may write any more. Running work is cut, not awaited.
                tracing::error!(error = %e, "stopping controllers at once");
                probes.set_failed(&e.to_string());
                let _ = stop_tx.send(true);
                for r in &runs {
                    r.abort();
                }
            }
        }
        if let Some(c) = candidate.as_mut() {
            metrics.leader.with_label_values(&[&self.name]).set(0.0);
            if outcome.is_ok() {
                c.release().await;
            }
        }
        outcome
    }
}

/// The message a panic carried, when it is a string.
fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

fn c_name(cfg: &Option<LeaderElection>) -> String {
    cfg.as_ref()
        .map(|c| format!("{}/{}", c.namespace, c.lease_name))
        .unwrap_or_default()
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
