//! The `drop` command line: what the binary does, as a function, so that test harnesses can run
//! the very same program in a process of their own.

use clap::{Parser, Subcommand};
use kube_plan::logging::LogFormat;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

/// Drop keeps container images cached on Kubernetes nodes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator against the cluster of the current kubeconfig (or in-cluster config).
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions as YAML, or write one file per CRD into a directory.
    Crd {
        /// Write `<plural>.yaml` files into this directory instead of printing.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of the /metrics endpoint ("0" disables it).
    #[arg(long, default_value = ":8080")]
    metrics_bind_address: String,
    /// Serve /metrics over HTTPS, only to callers whose bearer token the API server accepts
    /// (TokenReview) and who may `get` the non-resource URL /metrics (SubjectAccessReview).
    #[arg(long)]
    metrics_secure: bool,
    /// Directory with `tls.crt` and `tls.key` for the secure /metrics endpoint (e.g. a mounted
    /// cert-manager Secret); without it a self-signed certificate is made at start.
    #[arg(long, requires = "metrics_secure")]
    metrics_cert_dir: Option<std::path::PathBuf>,
    /// Address of /healthz and /readyz ("0" disables them).
    #[arg(long, default_value = ":8081")]
    health_probe_bind_address: String,
    /// Reconcile only while holding the leader Lease (run several replicas safely).
    #[arg(long)]
    leader_elect: bool,
    /// Namespace of the leader Lease (default: the pod namespace).
    #[arg(long)]
    leader_election_namespace: Option<String>,
    /// How long the Lease is valid without renewal: a standby takes over this long after the
    /// leader stopped renewing.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    leader_elect_lease_duration: Duration,
    /// How long the leader keeps trying to renew before it stops (and writes nothing more).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    leader_elect_renew_deadline: Duration,
    /// Interval between attempts to take or renew the Lease.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    leader_elect_retry_period: Duration,
    /// Namespace where pull Pods run and discovery Secrets live.
    #[arg(long, default_value = "drop-system")]
    pod_namespace: String,
    /// How long a pull may take before it counts as failed.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pull_timeout: Duration,
    /// During a rollout, write an image's or a set's progress to its status at most this often
    /// (condition changes are written at once).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    status_interval: Duration,
    /// The kubelets' nodeStatusMaxImages (-1: no limit). An image a node stops listing counts as
    /// gone, and is pulled again, only while the node's list is shorter than this.
    #[arg(long, default_value_t = crate::operator::NODE_STATUS_MAX_IMAGES, allow_negative_numbers = true)]
    node_status_max_images: i32,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    /// Apply the CRDs at start instead of requiring them installed (the chart installs them).
    #[arg(long)]
    install_crds: bool,
    /// Only reconcile Drop objects whose labels match this selector (e.g. to shard, or to test).
    #[arg(long)]
    watch_selector: Option<String>,
    /// Warm-up: nodes carrying a taint with this key (e.g. drop.corewire.io/warming, set by the
    /// node pool or the kubelet's --register-with-taints) keep it until every image targeting them
    /// is cached, then Drop removes it. Pull Pods tolerate it. Off unless given.
    #[arg(long)]
    warmup_taint: Option<String>,
    /// Warm-up: remove the taint this long after the node's creation even if images are missing
    /// (a Warning Event on the Node names them).
    #[arg(long, default_value = "10m", value_parser = parse_duration, requires = "warmup_taint")]
    warmup_deadline: Duration,
    /// At most N pulls in flight from registry HOST, across every PullPolicy and image
    /// (HOST=N, e.g. docker.io=4; repeat for several registries). Docker Hub is docker.io.
    #[arg(long = "registry-budget", value_parser = parse_budget)]
    registry_budgets: Vec<(String, u32)>,
}

fn parse_budget(s: &str) -> Result<(String, u32), String> {
    let (host, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not HOST=N, e.g. docker.io=4"))?;
    let n: u32 = n
        .parse()
        .map_err(|e| format!("{s:?}: the budget {n:?} is not a whole number: {e}"))?;
    if host.is_empty() || host.contains('/') {
        return Err(format!(
            "{s:?}: {host:?} is not a registry host like docker.io or registry.example.com:5000"
        ));
    }
    if n == 0 {
        return Err(format!(
            "{s:?}: a budget of 0 would stop every pull from {host}"
        ));
    }
    Ok((host.to_owned(), n))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<kube::core::Duration>()
        .map(Into::into)
        .map_err(|e| format!("{s:?} is not a duration like 30s or 15m: {e}"))
}

/// Parses controller-runtime style addresses: ":8080", "0.0.0.0:8080", "0" (disabled).
fn parse_addr(flag: &str, s: &str) -> Result<Option<SocketAddr>, String> {
    if s == "0" || s.is_empty() {
        return Ok(None);
    }
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_owned()
    };
    full.parse()
        .map(Some)
        .map_err(|e| format!("--{flag}={s:?} is not an address like :8080 or 127.0.0.1:8080: {e}"))
}

/// Parses the arguments and runs the command; the binary's `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { dir } => report(print_crds(dir.as_deref())),
        Command::Run(args) => {
            crate::memory::one_arena();
            kube_plan::logging::init(args.log_format);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return report(Err(format!("starting the async runtime: {e}").into())),
            };
            report(rt.block_on(run(*args)))
        }
    }
}

fn report(result: Result<(), Box<dyn std::error::Error>>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            tracing::error!(error = %e, "exiting");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    kube_plan::install_crypto_provider();
    let metrics_addr = parse_addr("metrics-bind-address", &args.metrics_bind_address)?;
    let health_addr = parse_addr("health-probe-bind-address", &args.health_probe_bind_address)?;
    let config = kube::Config::infer().await.map_err(|e| {
        format!("no usable Kubernetes configuration (kubeconfig or in-cluster): {e}")
    })?;
    let client = kube::Client::try_from(config.clone())
        .map_err(|e| format!("cannot build a Kubernetes client from the configuration: {e}"))?;
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| format!("cannot reach the Kubernetes API server: {e}"))?;
    tracing::info!(server = %version.git_version, namespace = %args.pod_namespace, "starting");
    let leader_election = args.leader_elect.then(|| {
        let identity = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| format!("drop-{}", std::process::id()));
        let ns = args
            .leader_election_namespace
            .clone()
            .unwrap_or_else(|| args.pod_namespace.clone());
        let mut election = kube_plan::LeaderElection::new("drop-leader", &ns, &identity);
        election.lease_duration = args.leader_elect_lease_duration;
        election.renew_deadline = args.leader_elect_renew_deadline;
        election.retry_period = args.leader_elect_retry_period;
        election
    });
    if let Some(e) = &leader_election
        && !(e.retry_period < e.renew_deadline && e.renew_deadline < e.lease_duration)
    {
        return Err("leader election needs retry period < renew deadline < lease duration".into());
    }
    let settings = crate::operator::Settings {
        pod_namespace: args.pod_namespace,
        pull_timeout: args.pull_timeout,
        metrics_addr,
        metrics_tls: args.metrics_secure.then(|| match args.metrics_cert_dir {
            Some(dir) => kube_plan::metrics_auth::Certificate::in_dir(dir),
            None => kube_plan::metrics_auth::Certificate::SelfSigned,
        }),
        health_addr,
        leader_election,
        install_crds: args.install_crds,
        watch_selector: args.watch_selector,
        status_interval: args.status_interval,
        node_status_max_images: args.node_status_max_images,
        warmup: args
            .warmup_taint
            .filter(|t| !t.is_empty())
            .map(|taint| crate::warmup::Warmup {
                taint,
                deadline: args.warmup_deadline,
            }),
        registry_budgets: args.registry_budgets.into_iter().collect(),
    };
    tokio::spawn(crate::memory::trim_every(crate::memory::TRIM_PERIOD));
    crate::operator::run_from_config(config, settings, kube_plan::operator::shutdown_signal())
        .await?;
    Ok(())
}

fn print_crds(dir: Option<&std::path::Path>) -> Result<(), Box<dyn std::error::Error>> {
    match dir {
        None => print!("{}", kube_plan::crd::to_yaml_stream(&crate::api::crds())?),
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            for (file, yaml) in crate::api::crd_files()? {
                let path = dir.join(file);
                std::fs::write(&path, yaml)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["drop", "run"].iter().chain(args)).expect("parses");
        match cli.command {
            Command::Run(args) => *args,
            _ => panic!("not run"),
        }
    }

    #[test]
    fn cli_node_status_max_images_defaults_to_the_kubelets_and_takes_no_limit() {
        assert_eq!(run_args(&[]).node_status_max_images, 50);
        assert_eq!(
            run_args(&["--node-status-max-images=-1"]).node_status_max_images,
            -1
        );
        assert_eq!(
            run_args(&["--node-status-max-images", "-1"]).node_status_max_images,
            -1
        );
    }

    #[test]
    fn cli_registry_budgets_are_host_equals_number() {
        assert!(run_args(&[]).registry_budgets.is_empty());
        let args = run_args(&[
            "--registry-budget",
            "docker.io=2",
            "--registry-budget=registry.example.com:5000=8",
        ]);
        assert_eq!(
            args.registry_budgets,
            [
                ("docker.io".to_owned(), 2),
                ("registry.example.com:5000".to_owned(), 8)
            ]
        );
        for bad in [
            "docker.io",
            "docker.io=none",
            "docker.io=0",
            "=3",
            "ghcr.io/org=2",
        ] {
            assert!(
                Cli::try_parse_from(["drop", "run", "--registry-budget", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn cli_warmup_is_off_by_default_and_takes_a_taint_and_deadline() {
        assert_eq!(run_args(&[]).warmup_taint, None);
        let args = run_args(&[
            "--warmup-taint",
            "drop.corewire.io/warming",
            "--warmup-deadline",
            "5m",
        ]);
        assert_eq!(
            args.warmup_taint.as_deref(),
            Some("drop.corewire.io/warming")
        );
        assert_eq!(args.warmup_deadline, Duration::from_secs(300));
        assert_eq!(
            run_args(&["--warmup-taint", "k"]).warmup_deadline,
            crate::warmup::DEFAULT_DEADLINE
        );
    }
}
