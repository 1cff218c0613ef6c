//! Fleet benchmark: Drop on a fresh local control plane with many simulated nodes.
//!
//! It starts a private cluster (KWOK nodes, the kube-apiserver's audit log on for the operator's
//! identity only), runs the release `drop` binary as a ServiceAccount so its requests can be told
//! apart, creates one PullPolicy and the images, and reports what the rollout cost: makespan against
//! the pacing ideal, pacing violations seen on a watch of pull Pods, pull Pods thrown away before
//! they pulled, the operator's API requests and writes per (node, image) pair, its memory and CPU,
//! the largest status, the time to warm nodes added later, and the cost of a settled fleet.
//!
//! ```sh
//! cargo run --release -p e2e --bin fleet -- --nodes 1000 --images 10 --concurrency 100 --tag 1
//! ```
//!
//! See `docs/performance.md` for the scenarios and their figures.

mod operator;
mod report;
mod settled;

use clap::Parser;
use drop::api::{
    CachedImage, CachedImageSet, CachedImageSetSpec, CachedImageSpec, ImageEntry, PolicyReference,
    PullPolicy, PullPolicySpec,
};
use e2e::{PodRecorder, audit};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use kube_plan::testing::{Component, TestCluster, simulated_node};
use report::Report;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Namespace of the pull Pods and the operator's ServiceAccount.
const NS: &str = "drop-bench";
/// The operator's identity, the only one the audit log records.
const USER: &str = "system:serviceaccount:drop-bench:drop";

/// Drop on many simulated nodes: what a rollout costs the API server, and how fast it is.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// Simulated nodes in the cluster.
    #[arg(long, default_value_t = 100)]
    nodes: u32,
    /// CachedImages, each targeting every node.
    #[arg(long, default_value_t = 10)]
    images: usize,
    /// The PullPolicy's maxConcurrentNodes.
    #[arg(long, default_value_t = 10)]
    concurrency: i32,
    /// The PullPolicy's minDelayBetweenPulls, in seconds (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    min_delay: f64,
    /// Image tag; `slow-<n>s` makes each simulated pull take n seconds, anything else 0.3 s.
    #[arg(long, default_value = "slow-2s")]
    tag: String,
    /// Nodes to add once the fleet has settled (time until each is warm).
    #[arg(long, default_value_t = 0)]
    add_nodes: u32,
    /// Seconds to watch the settled fleet for its idle cost.
    #[arg(long, default_value_t = 120)]
    idle: u64,
    /// kube-controller-manager's node monitor grace period, in seconds (the cluster's is 40): on a
    /// machine too small for the simulated kubelets' heartbeats to arrive on time, a longer one
    /// keeps nodes from being tainted not-ready and back all the time, so that the figures are the
    /// operator's and not those of a cluster in constant churn.
    #[arg(long)]
    node_monitor_grace: Option<u64>,
    /// Give up on the rollout after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Put the images in one CachedImageSet (its children are the CachedImages) instead of creating
    /// them one by one: what a set costs on top.
    #[arg(long)]
    set: bool,
    /// At the end, delete every node and report the operator's memory a minute after it let go of
    /// them (it hands freed memory back once a minute).
    #[arg(long)]
    remove_nodes: bool,
    /// Kill the operator (SIGKILL) this many seconds apart during the rollout, restarting it at
    /// once, until 80 % of the pairs are cached; then report the faults and the invariants (duplicate
    /// pulls, most in flight, status regressions) instead of the cost figures. 0: no faults.
    #[arg(long, default_value_t = 0)]
    kill_every: u64,
    /// Instead of a rollout: write every image's status as cached on every node, then start the
    /// operator (as after a restart into a settled fleet) and report its memory once its reconciles
    /// stop, and after every node is deleted with `--remove-nodes`. For fleets too large to pull.
    #[arg(long)]
    settled: bool,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Keep the work directory (audit log, operator log) and print where it is.
    #[arg(long)]
    keep: bool,
    /// The operator's log filter (RUST_LOG).
    #[arg(long, default_value = "info")]
    log: String,
    /// The cargo profile the operator is built with: `dist` (as its image ships it) or `release`
    /// (the same without cross-crate optimisation), to compare the two.
    #[arg(long, default_value = "dist")]
    operator_profile: String,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    // On Ctrl-C, or a TERM from `timeout` or `kill`, the run is dropped, and with it the operator
    // and the private cluster, which would otherwise be left running.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = bench(args) => result,
        _ = tokio::signal::ctrl_c() => Err("interrupted: the cluster and the operator were stopped".into()),
        _ = term.recv() => Err("terminated: the cluster and the operator were stopped".into()),
    }
}

async fn bench(args: Args) -> Result<(), Error> {
    kube_plan::install_crypto_provider();
    let bin = operator::build(&args.operator_profile)?;

    let work = tempfile::Builder::new().prefix("drop-fleet-").tempdir()?;
    let policy_file = work.path().join("audit-policy.yaml");
    let audit_log = work.path().join("audit.log");
    std::fs::write(&policy_file, audit::policy(&[USER]))?;
    let extra = audit::apiserver_args(&policy_file, &audit_log);
    let started = Instant::now();
    eprintln!("[fleet] starting a cluster with {} nodes", args.nodes);
    // kube-controller-manager's client allows 20 requests/s by default: lifting the creation
    // taints of 5000 nodes then takes many minutes. A large cluster's controller manager is given
    // more; so is this one.
    let mut kcm = vec![
        "--kube-api-qps=200".to_owned(),
        "--kube-api-burst=400".to_owned(),
    ];
    if let Some(s) = args.node_monitor_grace {
        kcm.push(format!("--node-monitor-grace-period={s}s"));
    }
    let cluster = TestCluster::builder()
        .nodes(args.nodes)
        .args(Component::KubeApiserver, extra)
        .args(Component::KubeControllerManager, kcm)
        .start()?;
    eprintln!(
        "[fleet] cluster up in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let client = cluster.client().await?;
    // A node is Ready before kube-controller-manager lifts the taint it put on it at creation;
    // with thousands of nodes on a small machine that takes minutes, during which every image's
    // targets keep changing. The figures are the operator's, so it starts on a steady cluster.
    let untainted = Instant::now();
    wait_untainted(&client, Duration::from_secs(args.timeout)).await?;
    eprintln!(
        "[fleet] creation taints lifted in {:.0} s more",
        untainted.elapsed().as_secs_f64()
    );
    let kubeconfig = operator_identity(&client, &cluster, work.path()).await?;
    if args.settled {
        // The operator would install its CRDs; here the objects come first.
        e2e::install_drop_crds(&client).await?;
        create_scenario(&client, &args).await?;
        settled::mark_cached(&client, args.nodes).await?;
        let recorder = PodRecorder::start(&client, NS);
        let mut op = operator::Operator::start(&bin, &kubeconfig, NS, work.path(), &args.log)?;
        op.wait_ready().await?;
        let report = settled::run(&client, &args, &op, &recorder).await?;
        op.stop();
        println!("{}", report.table());
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        }
        return Ok(());
    }
    let mut op = operator::Operator::start(&bin, &kubeconfig, NS, work.path(), &args.log)?;
    op.wait_ready().await?;
    let rss_start = op.memory()?.1;
    if args.kill_every > 0 {
        let kill = Kill {
            bin: &bin,
            kubeconfig: &kubeconfig,
            dir: work.path(),
        };
        return fault_run(&client, &args, kill, op).await;
    }

    let recorder = PodRecorder::start(&client, NS);
    let images: Api<CachedImage> = Api::all(client.clone());
    let reconciles_before = op.reconciles().await?;
    let cpu_before = op.cpu_seconds()?;
    let t0 = Timestamp::now();
    create_scenario(&client, &args).await?;
    let all_nodes: BTreeSet<String> = (0..args.nodes).map(|i| format!("kwok-node-{i}")).collect();
    wait_cached(&images, &all_nodes, args.images, &recorder, args.timeout).await?;
    let settled = Timestamp::now();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    wait_no_pods(&pods).await?;
    let rollout_end = Timestamp::now();
    let reconciles_after = op.reconciles().await?;
    let cpu_rollout = op.cpu_seconds()? - cpu_before;
    let rss_rollout = op.memory()?;

    let warm = if args.add_nodes > 0 {
        add_nodes(&client, &images, &args).await?
    } else {
        Vec::new()
    };
    wait_no_pods(&pods).await?;

    eprintln!(
        "[fleet] settled; watching the idle fleet for {} s",
        args.idle
    );
    let idle_from = Timestamp::now();
    let idle_reconciles_before = op.reconciles().await?;
    let idle_cpu_before = op.cpu_seconds()?;
    tokio::time::sleep(Duration::from_secs(args.idle)).await;
    let idle_to = Timestamp::now();
    let idle_reconciles = op.reconciles().await? - idle_reconciles_before;
    let idle_cpu = op.cpu_seconds()? - idle_cpu_before;

    let largest_status = images
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|i| serde_json::to_vec(&i.status).ok().map(|v| v.len()))
        .max()
        .unwrap_or(0);
    let after_removal = if args.remove_nodes {
        Some(remove_nodes(&client, &images, &op).await?)
    } else {
        None
    };
    let requests = audit::read(&audit_log);
    let report = Report::new(report::Inputs {
        args: &args,
        records: &recorder.records(),
        t0,
        settled,
        rollout_end,
        requests: &requests,
        reconciles: reconciles_after - reconciles_before,
        idle: (idle_from, idle_to, idle_reconciles),
        cpu: report::Cpu {
            rollout: cpu_rollout,
            idle: idle_cpu,
        },
        memory: (rss_rollout, op.memory()?),
        rss_start,
        cpu_seconds: op.cpu_seconds()?,
        largest_status,
        warm: &warm,
        after_removal,
    });
    op.stop();
    println!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    drop(cluster);
    if args.keep {
        eprintln!("[fleet] kept {}", work.keep().display());
    }
    Ok(())
}

/// How to restart the operator.
struct Kill<'a> {
    bin: &'a std::path::Path,
    kubeconfig: &'a std::path::Path,
    dir: &'a std::path::Path,
}

/// The rollout under SIGKILLs every `--kill-every` seconds, with the fault suite's invariants
/// checked on every watch event.
async fn fault_run(
    client: &Client,
    args: &Args,
    kill: Kill<'_>,
    mut op: operator::Operator,
) -> Result<(), Error> {
    let watch = e2e::chaos::InvariantWatch::start(client, NS, FLEET);
    let recorder = PodRecorder::start(client, NS);
    let images: Api<CachedImage> = Api::all(client.clone());
    let t0 = Instant::now();
    create_scenario(client, args).await?;
    let all_nodes: BTreeSet<String> = (0..args.nodes).map(|i| format!("kwok-node-{i}")).collect();
    let want = all_nodes.len() * args.images;
    let mut kills = 0;
    loop {
        let done = cached_pairs(
            &images.list(&ListParams::default()).await?.items,
            &all_nodes,
        );
        if done * 5 >= want * 4 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(args.timeout) {
            return Err(format!("{done}/{want} pairs after {} s under kills", args.timeout).into());
        }
        tokio::time::sleep(Duration::from_secs(args.kill_every)).await;
        op.stop();
        kills += 1;
        op = operator::Operator::start(kill.bin, kill.kubeconfig, NS, kill.dir, &args.log)?;
        eprintln!("[fleet] kill {kills}: {done}/{want} pairs cached");
    }
    let last_kill = Instant::now();
    wait_cached(&images, &all_nodes, args.images, &recorder, args.timeout).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    wait_no_pods(&pods).await?;
    let v = watch.violations();
    println!(
        "fleet under faults: {} nodes x {} images, c={}, SIGKILL every {} s\n  kills                    {kills}\n  makespan                 {:.1} s\n  converged after the last kill {:.1} s\n  pull Pods                {} for {want} pairs\n  most in flight           {} (limit {})\n  duplicate pulls          {}\n  status regressions       {}",
        args.nodes,
        args.images,
        args.concurrency,
        args.kill_every,
        t0.elapsed().as_secs_f64(),
        last_kill.elapsed().as_secs_f64(),
        v.pods_seen,
        v.most_in_flight,
        args.concurrency,
        v.duplicates.len(),
        v.regressions.len()
    );
    op.stop();
    Ok(())
}

/// The operator's namespace (Pod Security "restricted") and its own identity: a kubeconfig
/// authenticating as ServiceAccount `drop` there.
async fn operator_identity(
    client: &Client,
    cluster: &TestCluster,
    dir: &std::path::Path,
) -> Result<std::path::PathBuf, Error> {
    let mut ns = Namespace::default();
    ns.metadata.name = Some(NS.into());
    ns.metadata.labels = Some(BTreeMap::from([(
        "pod-security.kubernetes.io/enforce".to_owned(),
        "restricted".to_owned(),
    )]));
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    e2e::identity::service_account_kubeconfig(client, cluster.kubeconfig(), NS, "drop", dir).await
}

/// The label value of the benchmark's objects (under `e2e::TEST_LABEL`), for the invariant watch.
const FLEET: &str = "fleet";

fn fleet_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(e2e::TEST_LABEL.to_owned(), FLEET.to_owned())])
}

async fn create_scenario(client: &Client, args: &Args) -> Result<(), Error> {
    let policy = PullPolicy::new(
        "bench",
        PullPolicySpec {
            max_concurrent_nodes: args.concurrency,
            min_delay_between_pulls: Some(Duration::from_secs_f64(args.min_delay).into()),
            ..Default::default()
        },
    );
    Api::<PullPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await?;
    if args.set {
        let set = CachedImageSet::new(
            "bench",
            CachedImageSetSpec {
                policy_ref: Some(PolicyReference {
                    name: "bench".into(),
                }),
                node_selector: BTreeMap::from([("type".to_owned(), "kwok".to_owned())]),
                images: (0..args.images)
                    .map(|i| ImageEntry {
                        image: format!("registry.bench.example/app{i}"),
                        tag: Some(args.tag.clone()),
                        digest: None,
                    })
                    .collect(),
                ..Default::default()
            },
        );
        let mut set = set;
        set.metadata.labels = Some(fleet_labels());
        Api::<CachedImageSet>::all(client.clone())
            .create(&PostParams::default(), &set)
            .await?;
        return Ok(());
    }
    let images: Api<CachedImage> = Api::all(client.clone());
    for i in 0..args.images {
        let ci = CachedImage::new(
            &format!("bench-{i:04}"),
            CachedImageSpec {
                image: format!("registry.bench.example/app{i}"),
                tag: Some(args.tag.clone()),
                node_selector: BTreeMap::from([("type".to_owned(), "kwok".to_owned())]),
                policy_ref: Some(PolicyReference {
                    name: "bench".into(),
                }),
                ..Default::default()
            },
        );
        let mut ci = ci;
        ci.metadata.labels = Some(fleet_labels());
        images.create(&PostParams::default(), &ci).await?;
    }
    Ok(())
}

/// Pairs (image, node) cached so far, among `nodes`.
fn cached_pairs(images: &[CachedImage], nodes: &BTreeSet<String>) -> usize {
    images
        .iter()
        .filter_map(|i| i.status.as_ref())
        .map(|s| s.cached_nodes.iter().filter(|n| nodes.contains(*n)).count())
        .sum()
}

async fn wait_cached(
    api: &Api<CachedImage>,
    nodes: &BTreeSet<String>,
    images: usize,
    recorder: &PodRecorder,
    timeout: u64,
) -> Result<(), Error> {
    let want = nodes.len() * images;
    let start = Instant::now();
    let mut last_report = Instant::now();
    let mut last_change = (0, Instant::now());
    loop {
        let list = api.list(&ListParams::default()).await?.items;
        let done = cached_pairs(&list, nodes);
        if done >= want {
            return Ok(());
        }
        if done != last_change.0 {
            last_change = (done, Instant::now());
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "[fleet] {:>5.0} s: {done}/{want} pairs cached, {} pull Pods so far",
                start.elapsed().as_secs_f64(),
                recorder.records().len()
            );
            last_report = Instant::now();
        }
        if start.elapsed() > Duration::from_secs(timeout) {
            return Err(format!(
                "not settled after {timeout} s: {done}/{want} pairs cached, no change for {:.0} s",
                last_change.1.elapsed().as_secs_f64()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Deletes every node, waits until every image has let go of them (no target left), and returns
/// the operator's (peak, current) RSS then.
async fn remove_nodes(
    client: &Client,
    images: &Api<CachedImage>,
    op: &operator::Operator,
) -> Result<(f64, f64), Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let names: Vec<String> = nodes
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    eprintln!("[fleet] deleting {} nodes", names.len());
    for name in &names {
        nodes.delete(name, &Default::default()).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let targeted: i32 = images
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter_map(|i| i.status.as_ref())
            .map(|s| s.nodes_targeted)
            .sum();
        if targeted == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{targeted} targets left 600 s after the nodes went").into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The operator hands freed memory back to the system periodically: read its size after the
    // next time it does.
    tokio::time::sleep(drop::memory::TRIM_PERIOD + Duration::from_secs(5)).await;
    op.memory()
}

/// Waits until no node carries a taint of a starting node ([`drop::warmup::STARTUP_TAINTS`]).
/// Polled every 2 s: each poll lists every node.
async fn wait_untainted(client: &Client, timeout: Duration) -> Result<(), Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    loop {
        let tainted = nodes
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|n| {
                n.spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|t| {
                        t.iter()
                            .any(|t| drop::warmup::STARTUP_TAINTS.contains(&t.key.as_str()))
                    })
            })
            .count();
        if tainted == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{tainted} nodes still carry a starting node's taint").into());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn wait_no_pods(pods: &Api<Pod>) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = pods.list(&ListParams::default()).await?.items.len();
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(
                format!("{left} pull Pods still exist 120 s after the fleet settled").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Adds nodes to the settled fleet; returns, per node, the seconds from its creation until every
/// image is cached on it.
async fn add_nodes(
    client: &Client,
    images: &Api<CachedImage>,
    args: &Args,
) -> Result<Vec<f64>, Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut created = BTreeMap::new();
    for i in 0..args.add_nodes {
        let name = format!("kwok-node-added-{i}");
        nodes
            .create(
                &PostParams::default(),
                &simulated_node(&name, &BTreeMap::new()),
            )
            .await?;
        created.insert(name, Instant::now());
    }
    let mut warm: BTreeMap<String, f64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    while warm.len() < created.len() {
        if Instant::now() > deadline {
            return Err(format!("{} of {} added nodes warm", warm.len(), created.len()).into());
        }
        let list = images.list(&ListParams::default()).await?.items;
        for (name, at) in &created {
            if warm.contains_key(name) {
                continue;
            }
            let everywhere = list.iter().all(|i| {
                i.status
                    .as_ref()
                    .is_some_and(|s| s.cached_nodes.contains(name))
            });
            if everywhere {
                warm.insert(name.clone(), at.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(warm.into_values().collect())
}
