//! `--settled`: the operator started into a fleet that is already cached.
//!
//! Pulling S3's million pairs through KWOK takes this project's two-core machines most of a day, but
//! what the operator holds for them does not need them pulled: every image's status is written as
//! cached on every node before the operator starts, as after an operator restart (or an upgrade) in
//! a settled fleet. The operator restores its pacer from those statuses; this reports its memory
//! then, whether it started any pull (it must not), and its memory once every node is gone.

use crate::operator::Operator;
use crate::{Args, Error, NS, remove_nodes};
use drop::api::{CachedImage, CachedImagePhase, CachedImageStatus};
use e2e::PodRecorder;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde::Serialize;
use std::time::{Duration, Instant};

/// What a settled start costs.
#[derive(Debug, Serialize)]
pub struct SettledReport {
    pub nodes: u32,
    pub images: usize,
    pub pairs: usize,
    /// From the operator's start until its reconciles stop (seconds).
    pub settle_seconds: f64,
    pub reconciles: u64,
    /// Pull Pods created: none is due in a cached fleet.
    pub pull_pods: usize,
    pub rss_start_mib: f64,
    pub rss_peak_mib: f64,
    pub rss_settled_mib: f64,
    /// RSS once the operator's periodic `malloc_trim` has run after it settled: what it holds,
    /// without what it freed and the allocator has not handed back yet.
    pub rss_steady_mib: f64,
    pub cpu_seconds: f64,
    /// (peak, current) RSS once every node is deleted and every image has let go of them.
    pub after_removal_mib: Option<(f64, f64)>,
}

/// Writes every image's status as cached on every node (the images must exist).
pub async fn mark_cached(client: &Client, nodes: u32) -> Result<(), Error> {
    let images: Api<CachedImage> = Api::all(client.clone());
    let names: Vec<String> = (0..nodes).map(|i| format!("kwok-node-{i}")).collect();
    let count = i32::try_from(nodes)?;
    let now = Time(Timestamp::now());
    for image in images.list(&ListParams::default()).await?.items {
        let status = CachedImageStatus {
            observed_generation: image.metadata.generation,
            phase: Some(CachedImagePhase::Ready),
            nodes_targeted: count,
            nodes_ready: count,
            cached_nodes: names.iter().collect(),
            last_pulled_at: Some(now.clone()),
            ..Default::default()
        };
        images
            .patch_status(
                &image.name_any(),
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": status })),
            )
            .await?;
    }
    Ok(())
}

/// Starts the operator into the settled fleet and measures it until its reconciles stop.
pub async fn run(
    client: &Client,
    args: &Args,
    op: &Operator,
    recorder: &PodRecorder,
) -> Result<SettledReport, Error> {
    let started = Instant::now();
    let rss_start = op.memory()?.1;
    // Settled: each image reconciled at least once, and no reconcile for 20 s.
    let quiet = Duration::from_secs(20);
    let mut last = (op.reconciles().await?, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = op.reconciles().await?;
        if now != last.0 {
            last = (now, Instant::now());
        } else if now >= args.images as u64 && last.1.elapsed() >= quiet {
            break;
        }
        if started.elapsed() > Duration::from_secs(args.timeout) {
            return Err(
                format!("still reconciling after {} s ({now} so far)", args.timeout).into(),
            );
        }
    }
    let settle_seconds = (last.1 - started).as_secs_f64();
    let (rss_peak, rss_settled) = op.memory()?;
    let cpu_seconds = op.cpu_seconds()?;
    eprintln!(
        "[fleet] settled after {settle_seconds:.0} s: {} reconciles, RSS {rss_settled:.1} MiB (peak {rss_peak:.1})",
        last.0
    );
    tokio::time::sleep(drop::memory::TRIM_PERIOD + Duration::from_secs(5)).await;
    let rss_steady = op.memory()?.1;
    eprintln!("[fleet] a trim later: RSS {rss_steady:.1} MiB");
    let after_removal_mib = if args.remove_nodes {
        let images: Api<CachedImage> = Api::all(client.clone());
        Some(remove_nodes(client, &images, op).await?)
    } else {
        None
    };
    Ok(SettledReport {
        nodes: args.nodes,
        images: args.images,
        pairs: args.nodes as usize * args.images,
        settle_seconds,
        reconciles: last.0,
        pull_pods: recorder.records().len(),
        rss_start_mib: rss_start,
        rss_peak_mib: rss_peak,
        rss_settled_mib: rss_settled,
        rss_steady_mib: rss_steady,
        cpu_seconds,
        after_removal_mib,
    })
}

impl SettledReport {
    pub fn table(&self) -> String {
        let removal = self
            .after_removal_mib
            .map_or("not asked".to_owned(), |(peak, now)| {
                format!("{now:.1} MiB (peak {peak:.1} MiB)")
            });
        format!(
            "fleet started settled: {} nodes x {} images ({} pairs cached before the operator started), namespace {NS}\n  \
             settled after            {:.0} s ({} reconciles)\n  \
             pull Pods created        {}\n  \
             RSS at start             {:.1} MiB\n  \
             RSS settled / peak       {:.1} / {:.1} MiB\n  \
             RSS a trim later         {:.1} MiB\n  \
             CPU                      {:.1} s\n  \
             RSS after every node went {removal}",
            self.nodes,
            self.images,
            self.pairs,
            self.settle_seconds,
            self.reconciles,
            self.pull_pods,
            self.rss_start_mib,
            self.rss_settled_mib,
            self.rss_peak_mib,
            self.rss_steady_mib,
            self.cpu_seconds,
        )
    }
}
