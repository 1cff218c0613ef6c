//! The fault suite: a rollout on 100 simulated nodes × 5 images under one tight policy, while Drop is
//! killed every 5 s, while leadership changes hands (the leader killed, then frozen past its lease
//! and resumed), and while the API server restarts. The invariants are checked on every watch event
//! (`e2e::chaos::InvariantWatch`): never two live pull Pods for one (image, node), never more pulls
//! in flight than the policy allows (counting Pods an earlier process left), no image's ready count
//! going down; at the end every image is Ready, no pull Pod is left and no slot is held.

use drop::api::{
    CachedImage, CachedImagePhase, CachedImageSpec, PolicyReference, PullPolicy, PullPolicySpec,
};
use e2e::chaos::{DropCommand, DropProcess, InvariantWatch, log_dir};
use e2e::{TEST_LABEL, cluster, install_drop_crds};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use kube_plan::testing::{Component, TestCluster, TestNodes, eventually};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const POOL: &str = "e2e.drop/pool";
const NODES: usize = 100;
const IMAGES: usize = 5;
/// The policy's limit: pulls in flight at once.
const CONCURRENCY: i32 = 10;

struct Rollout {
    client: Client,
    ns: kube_plan::testing::TestNamespace,
    _nodes: TestNodes,
    command: DropCommand,
    images: Vec<String>,
    watch: InvariantWatch,
}

impl Rollout {
    async fn prepare(cluster: &TestCluster, client: Client, id: &str, nodes: usize) -> Self {
        install_drop_crds(&client).await.unwrap();
        let ns = cluster.namespace(&client, id).await.unwrap();
        e2e::restrict_namespace(&client, ns.name()).await;
        let pool = BTreeMap::from([(POOL.to_owned(), ns.name().to_owned())]);
        let nodes = cluster
            .add_nodes(&client, ns.name(), nodes, &pool)
            .await
            .unwrap();
        let watch = InvariantWatch::start(&client, ns.name(), ns.name());
        let command = DropCommand {
            program: env!("CARGO_BIN_EXE_drop-process").into(),
            kubeconfig: cluster.kubeconfig().to_owned(),
            namespace: ns.name().to_owned(),
            id: ns.name().to_owned(),
            dir: log_dir(id),
            extra: Vec::new(),
            log_filter: "info".into(),
        };
        Self {
            client,
            ns,
            _nodes: nodes,
            command,
            images: Vec::new(),
            watch,
        }
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(TEST_LABEL.to_owned(), self.ns.name().to_owned())])
    }

    /// One tight policy and `IMAGES` images whose pulls take `pull` each.
    async fn create_objects(&mut self, pull: &str) {
        let name = |s: &str| format!("{}-{s}", self.ns.name());
        let mut policy = PullPolicy::new(
            &name("tight"),
            PullPolicySpec {
                max_concurrent_nodes: CONCURRENCY,
                min_delay_between_pulls: Some(Duration::ZERO.into()),
                ..PullPolicySpec::default()
            },
        );
        policy.metadata.labels = Some(self.labels());
        Api::<PullPolicy>::all(self.client.clone())
            .create(&PostParams::default(), &policy)
            .await
            .unwrap();
        let images: Api<CachedImage> = Api::all(self.client.clone());
        for i in 0..IMAGES {
            let mut ci = CachedImage::new(
                &name(&format!("img{i}")),
                CachedImageSpec {
                    image: format!("docker.io/library/chaos{i}"),
                    tag: Some(pull.to_owned()),
                    node_selector: BTreeMap::from([(POOL.to_owned(), self.ns.name().to_owned())]),
                    policy_ref: Some(PolicyReference {
                        name: name("tight"),
                    }),
                    ..CachedImageSpec::default()
                },
            );
            ci.metadata.labels = Some(self.labels());
            images.create(&PostParams::default(), &ci).await.unwrap();
            self.images.push(ci.name_any());
        }
    }

    /// How many images are Ready on every node.
    async fn ready(&self) -> usize {
        let images: Api<CachedImage> = Api::all(self.client.clone());
        let mut n = 0;
        for name in &self.images {
            if let Ok(ci) = images.get(name).await
                && ci.status.and_then(|s| s.phase) == Some(CachedImagePhase::Ready)
            {
                n += 1;
            }
        }
        n
    }

    /// Pulled pairs so far (sum of every image's ready count).
    async fn pulled(&self) -> i32 {
        let images: Api<CachedImage> = Api::all(self.client.clone());
        let mut n = 0;
        for name in &self.images {
            if let Ok(ci) = images.get(name).await {
                n += ci.status.map_or(0, |s| s.nodes_ready);
            }
        }
        n
    }

    /// Waits until the rollout is under way (50 pairs pulled).
    async fn under_way(&self) {
        eventually(Duration::from_secs(60), "the rollout under way", || async {
            match self.pulled().await {
                n if n >= 50 => Ok(()),
                n => Err(format!("{n} pulled")),
            }
        })
        .await
        .unwrap();
    }

    /// Waits until every image is Ready and the last process has settled: no pull Pod left, no
    /// slot held. Returns how long the rollout took to settle from `since`.
    async fn settle(&self, last: &DropProcess, since: Instant) -> Duration {
        eventually(Duration::from_secs(180), "every image Ready", || async {
            match self.ready().await {
                n if n == self.images.len() => Ok(()),
                n => Err(format!("{n}/{} Ready", self.images.len())),
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", last.log_tail()));
        let settled = since.elapsed();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), self.ns.name());
        eventually(Duration::from_secs(60), "no pull Pod left", || async {
            match pods.list(&Default::default()).await {
                Ok(l) if l.items.is_empty() => Ok(()),
                Ok(l) => Err(format!("{} pull Pods left", l.items.len())),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
        .unwrap();
        eventually(Duration::from_secs(30), "no slot held", || async {
            match last.metric("drop_active_pulls").await {
                Some(0.0) => Ok(()),
                other => Err(format!("drop_active_pulls {other:?}")),
            }
        })
        .await
        .unwrap();
        settled
    }

    /// The invariants, after the rollout.
    fn check(&self, what: &str) {
        let v = self.watch.violations();
        println!(
            "{what}: {} pull Pods seen, at most {} in flight (limit {CONCURRENCY}), {} duplicates, {} regressions",
            v.pods_seen,
            v.most_in_flight,
            v.duplicates.len(),
            v.regressions.len()
        );
        assert!(
            v.duplicates.is_empty(),
            "duplicate pulls: {:?}",
            v.duplicates
        );
        assert!(
            v.most_in_flight <= usize::try_from(CONCURRENCY).unwrap(),
            "{} pulls in flight, limit {CONCURRENCY}",
            v.most_in_flight
        );
        assert!(
            v.regressions.is_empty(),
            "status regressions: {:?}",
            v.regressions
        );
    }

    async fn finish(self) {
        let images: Api<CachedImage> = Api::all(self.client.clone());
        for name in &self.images {
            let _ = images.delete(name, &DeleteParams::default()).await;
        }
        let _ = Api::<PullPolicy>::all(self.client.clone())
            .delete(
                &format!("{}-tight", self.ns.name()),
                &DeleteParams::default(),
            )
            .await;
    }
}

/// Leader election fast enough for a test: lease 4 s, renew deadline 3 s, retry every 0.5 s.
fn fast_leader_election() -> Vec<String> {
    [
        "--leader-elect",
        "--leader-elect-lease-duration",
        "4s",
        "--leader-elect-renew-deadline",
        "3s",
        "--leader-elect-retry-period",
        "500ms",
    ]
    .map(String::from)
    .to_vec()
}

/// Waits until replica `who` holds Drop's leader Lease in `namespace`.
async fn wait_leader(client: &Client, namespace: &str, who: &str) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    eventually(Duration::from_secs(30), "the expected leader", || async {
        let holder = leases
            .get_opt("drop-leader")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
            .unwrap_or_default();
        if holder == who {
            Ok(())
        } else {
            Err(format!("holder {holder:?}, waiting for {who}"))
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_operator_killed_every_5s_mid_rollout_loses_and_duplicates_nothing() {
    let (cluster, client) = cluster().await.unwrap();
    let mut r = Rollout::prepare(cluster, client, "chaos-kill", NODES).await;
    r.create_objects("slow-1s").await;
    let t0 = Instant::now();
    let mut n = 0;
    let mut running = r.command.spawn(n);
    let mut kills = 0;
    // Kill every 5 s until the rollout has reached 80 % (then let the last process finish it, so
    // the suite's time stays bounded whatever the machine's speed).
    let total = i32::try_from(NODES * IMAGES).unwrap();
    while r.pulled().await < total * 4 / 5 {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no progress under kills"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        running.kill();
        kills += 1;
        n += 1;
        running = r.command.spawn(n);
    }
    let last_kill = Instant::now();
    let settled = r.settle(&running, last_kill).await;
    println!(
        "chaos kill: {kills} SIGKILLs every 5 s, rollout of {NODES}x{IMAGES} done {:.1}s after the start, converged {:.1}s after the last kill",
        t0.elapsed().as_secs_f64(),
        settled.as_secs_f64()
    );
    assert!(kills >= 3, "the rollout outran the faults: {kills} kills");
    r.check("chaos kill");
    running.kill();
    r.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_leader_killed_then_frozen_hands_over_without_overlap() {
    let (cluster, client) = cluster().await.unwrap();
    let mut r = Rollout::prepare(cluster, client.clone(), "chaos-leader", NODES).await;
    r.command.extra = fast_leader_election();
    let mut replicas: BTreeMap<String, DropProcess> = BTreeMap::new();
    replicas.insert("drop-0".into(), r.command.spawn(0));
    let first = "drop-0";
    wait_leader(&client, r.ns.name(), first).await;
    replicas.insert("drop-1".into(), r.command.spawn(1));
    r.create_objects("slow-1s").await;
    let t0 = Instant::now();
    r.under_way().await;

    // 1. The leader is killed: the standby takes over once the lease has run out.
    let killed_at = Instant::now();
    replicas.remove(first).unwrap().kill();
    let second = "drop-1";
    wait_leader(&client, r.ns.name(), second).await;
    let handover = killed_at.elapsed();
    replicas.insert("drop-2".into(), r.command.spawn(2));

    // 2. The new leader is frozen past its lease; the fresh standby takes over; the frozen one is
    // resumed and must step down (it exits) instead of carrying on.
    let frozen = replicas.get(second).unwrap();
    frozen.signal("STOP");
    let frozen_at = Instant::now();
    wait_leader(&client, r.ns.name(), "drop-2").await;
    let takeover = frozen_at.elapsed();
    let frozen = replicas.get_mut(second).unwrap();
    frozen.signal("CONT");
    let status = eventually(
        Duration::from_secs(30),
        "the resumed one steps down",
        || {
            let s = frozen.exited();
            async move { s.ok_or("still running") }
        },
    )
    .await
    .unwrap();
    assert!(
        !status.success(),
        "losing the lease ends the process with an error"
    );
    let log = std::fs::read_to_string(&frozen.log).unwrap_or_default();
    assert!(log.contains("lost leadership"), "{log}");

    let leader = replicas.get("drop-2").unwrap();
    let settled = r.settle(leader, Instant::now()).await;
    println!(
        "chaos leader: handover after SIGKILL {:.1}s, takeover from a frozen leader {:.1}s (lease 4s), rollout {:.1}s, converged {:.1}s after the last fault",
        handover.as_secs_f64(),
        takeover.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        settled.as_secs_f64()
    );
    r.check("chaos leader");
    drop(replicas);
    r.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_api_server_restart_mid_rollout_is_survived() {
    // Its own control plane: restarting the shared one would fail the other tests.
    let cluster = TestCluster::start(0).unwrap();
    let client = cluster.client().await.unwrap();
    let mut r = Rollout::prepare(&cluster, client, "chaos-apiserver", NODES / 2).await;
    r.create_objects("slow-1s").await;
    let running = r.command.spawn(0);
    let t0 = Instant::now();
    r.under_way().await;
    let restart_at = Instant::now();
    cluster
        .restart(Component::KubeApiserver)
        .expect("the API server restarts");
    let down = restart_at.elapsed();
    let settled = r.settle(&running, Instant::now()).await;
    println!(
        "chaos apiserver: restarted in {:.1}s mid-rollout, rollout {:.1}s, converged {:.1}s after it was back",
        down.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        settled.as_secs_f64()
    );
    r.check("chaos apiserver");
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_frozen_leader_resumed_writes_nothing_says_the_audit_log() {
    // Its own control plane, with an audit log of the two replicas' requests, each replica under
    // its own ServiceAccount so the log tells them apart.
    //
    // What the fence can promise: once the old leader resumes, no write of its passes the fence.
    // A write that had passed it before the freeze, and was frozen on its way to the socket, still
    // lands on waking (no client can take back what it already sent). The replicas log each write
    // as it passes the fence, with the time read before the check, and the test holds every write
    // the API server received from the old leader after the resume to such a pass from before.
    let dir = log_dir("chaos-audit");
    let (ns_name, a, b) = ("chaos-audit", "drop-a", "drop-b");
    let users = [
        e2e::identity::username(ns_name, a),
        e2e::identity::username(ns_name, b),
    ];
    let policy_file = dir.join("audit-policy.yaml");
    let audit_log = dir.join("audit.log");
    std::fs::write(
        &policy_file,
        e2e::audit::policy(&[users[0].as_str(), users[1].as_str()]),
    )
    .unwrap();
    let cluster = TestCluster::builder()
        .args(
            Component::KubeApiserver,
            e2e::audit::apiserver_args(&policy_file, &audit_log),
        )
        .start()
        .unwrap();
    let client = cluster.client().await.unwrap();
    install_drop_crds(&client).await.unwrap();
    let mut ns = k8s_openapi::api::core::v1::Namespace::default();
    ns.metadata.name = Some(ns_name.into());
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    e2e::restrict_namespace(&client, ns_name).await;
    let pool = BTreeMap::from([(POOL.to_owned(), ns_name.to_owned())]);
    let _nodes = cluster
        .add_nodes(&client, ns_name, 20, &pool)
        .await
        .unwrap();
    let mut kubeconfigs = Vec::new();
    for name in [a, b] {
        kubeconfigs.push(
            e2e::identity::service_account_kubeconfig(
                &client,
                cluster.kubeconfig(),
                ns_name,
                name,
                &dir,
            )
            .await
            .unwrap(),
        );
    }
    let command = |kubeconfig: &std::path::Path| DropCommand {
        program: env!("CARGO_BIN_EXE_drop-process").into(),
        kubeconfig: kubeconfig.to_owned(),
        namespace: ns_name.to_owned(),
        id: ns_name.to_owned(),
        dir: dir.clone(),
        extra: fast_leader_election(),
        log_filter: "info,kube_plan::fence=debug".into(),
    };
    let mut first = command(&kubeconfigs[0]).spawn(0);
    wait_leader(&client, ns_name, "drop-0").await;
    let second = command(&kubeconfigs[1]).spawn(1);

    // A rollout of about 30 s (60 pulls of 5 s, 10 at a time), so there is work to write all along.
    let labels = BTreeMap::from([(TEST_LABEL.to_owned(), ns_name.to_owned())]);
    let mut policy = PullPolicy::new(
        "chaos-audit",
        PullPolicySpec {
            max_concurrent_nodes: CONCURRENCY,
            min_delay_between_pulls: Some(Duration::ZERO.into()),
            ..PullPolicySpec::default()
        },
    );
    policy.metadata.labels = Some(labels.clone());
    Api::<PullPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let images: Api<CachedImage> = Api::all(client.clone());
    for i in 0..3 {
        let mut ci = CachedImage::new(
            &format!("audit-{i}"),
            CachedImageSpec {
                image: format!("docker.io/library/audit{i}"),
                tag: Some("slow-5s".into()),
                node_selector: pool.clone(),
                policy_ref: Some(PolicyReference {
                    name: "chaos-audit".into(),
                }),
                ..CachedImageSpec::default()
            },
        );
        ci.metadata.labels = Some(labels.clone());
        images.create(&PostParams::default(), &ci).await.unwrap();
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns_name);
    eventually(Duration::from_secs(60), "pulls under way", || async {
        match pods.list(&Default::default()).await {
            Ok(l) if !l.items.is_empty() => Ok(()),
            _ => Err("no pull Pod yet"),
        }
    })
    .await
    .unwrap();

    first.signal("STOP");
    wait_leader(&client, ns_name, "drop-1").await;
    // The standby writes as the new leader before the old one is resumed.
    let resumed_at = jiff::Timestamp::now();
    first.signal("CONT");
    let status = eventually(Duration::from_secs(30), "drop-0 steps down", || {
        let s = first.exited();
        async move { s.ok_or("still running") }
    })
    .await
    .unwrap();
    assert!(!status.success());
    // The new leader keeps writing a while after (so the log covers the old one's whole end).
    eventually(
        Duration::from_secs(60),
        "the rollout finished by drop-1",
        || async {
            let list = images
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            let ready = list
                .items
                .iter()
                .filter(|i| {
                    i.status.as_ref().and_then(|s| s.phase) == Some(CachedImagePhase::Ready)
                })
                .count();
            if ready == 3 {
                Ok(())
            } else {
                Err(format!("{ready}/3 Ready"))
            }
        },
    )
    .await
    .unwrap();

    let requests = e2e::audit::read(&audit_log);
    let (old, new) = (users[0].as_str(), users[1].as_str());
    // A Lease write refused for a stale version (a renewal read before the freeze and sent after
    // it) changes nothing; any other write counts.
    let counts = |r: &&e2e::audit::Request| {
        r.is_write() && (r.resource != "leases" || (200..300).contains(&r.code))
    };
    let old_writes_after: Vec<String> = requests
        .iter()
        .filter(|r| r.user == old && r.at >= resumed_at)
        .filter(counts)
        .map(|r| format!("{} {} at {}", r.verb, r.resource, r.at))
        .collect();
    let new_writes = requests
        .iter()
        .filter(|r| r.user == new && r.is_write())
        .count();
    let old_writes_before = requests
        .iter()
        .filter(|r| r.user == old && r.is_write() && r.at < resumed_at)
        .count();
    // The controllers' writes (Lease writes go through the election's own, unfenced client).
    let controller_writes_before = requests
        .iter()
        .filter(|r| r.user == old && r.is_write() && r.at < resumed_at)
        .filter(|r| r.resource != "leases")
        .count();
    // The old leader's fence passes (leases are written with the unfenced client, so all of these
    // are the controllers' writes).
    let passes: Vec<jiff::Timestamp> = std::fs::read_to_string(&first.log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("write passed the leader fence"))
        .filter_map(|l| {
            l.split("checked_at=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let passed_after_resume: Vec<&jiff::Timestamp> =
        passes.iter().filter(|t| **t >= resumed_at).collect();
    // Passes logged before the resume: nothing runs while the process is stopped, so every one of
    // these was checked before the freeze took effect. (A time taken before sending the signal
    // would miss a pass in the moment before the signal lands, and fail the count below.)
    let in_flight = passes.iter().filter(|t| **t < resumed_at).count();
    println!(
        "chaos audit: drop-0 wrote {old_writes_before} times before its freeze, {} after its resume \
         {old_writes_after:?}; {} fence passes logged, {} after its resume; drop-1 wrote {new_writes} times",
        old_writes_after.len(),
        passes.len(),
        passed_after_resume.len()
    );
    assert!(
        old_writes_before > 0 && new_writes > 0,
        "both replicas wrote as leaders"
    );
    assert!(
        passes.len() >= controller_writes_before,
        "every controller write is logged as it passes the fence"
    );
    assert!(
        passed_after_resume.is_empty(),
        "writes passed the resumed old leader's fence at {passed_after_resume:?}"
    );
    // What arrived late had passed before the freeze: at most the writes that were on their way
    // (passes beyond the writes the server saw before the freeze).
    assert!(
        old_writes_after.len() <= in_flight.saturating_sub(controller_writes_before),
        "late writes {old_writes_after:?} are more than the {} in flight at the freeze",
        in_flight.saturating_sub(controller_writes_before)
    );
    drop(second);
}
