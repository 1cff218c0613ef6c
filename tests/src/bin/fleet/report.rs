//! The figures of one run, computed from what the run observed.

use super::Args;
use e2e::PodRecord;
use e2e::audit::{self, Request};
use jiff::Timestamp;
use serde::Serialize;
use std::collections::BTreeMap;

/// What a run observed.
pub struct Inputs<'a> {
    pub args: &'a Args,
    pub records: &'a [PodRecord],
    pub t0: Timestamp,
    pub settled: Timestamp,
    /// The last pull Pod of the rollout is gone.
    pub rollout_end: Timestamp,
    pub requests: &'a [Request],
    /// CachedImage reconciles during the rollout.
    pub reconciles: u64,
    /// Idle window and the reconciles in it.
    pub idle: (Timestamp, Timestamp, u64),
    /// (peak, current) RSS in MiB after the rollout, and at the end.
    pub memory: ((f64, f64), (f64, f64)),
    /// RSS in MiB once the operator was ready, before the scenario's objects existed.
    pub rss_start: f64,
    pub cpu_seconds: f64,
    /// CPU seconds of the rollout and of the idle window.
    pub cpu: Cpu,
    pub largest_status: usize,
    pub warm: &'a [f64],
    /// (peak, current) RSS once every node was deleted and let go of.
    pub after_removal: Option<(f64, f64)>,
}

/// The operator's CPU seconds over two spans.
pub struct Cpu {
    /// From the scenario's creation until the last pull Pod of the rollout was gone.
    pub rollout: f64,
    /// Over the idle window.
    pub idle: f64,
}

/// The figures.
#[derive(Serialize, Debug)]
pub struct Report {
    pub nodes: u32,
    pub images: usize,
    pub concurrency: i32,
    pub min_delay_s: f64,
    pub pull_s: f64,
    pub pairs: usize,
    pub makespan_s: f64,
    pub ideal_makespan_s: f64,
    pub efficiency: f64,
    pub pull_pods: usize,
    pub pull_pods_deleted_before_pulling: usize,
    pub max_in_flight: usize,
    pub min_start_gap_s: Option<f64>,
    /// The shortest gap between two pull Pod creations as the API server received them.
    pub min_start_gap_server_s: Option<f64>,
    pub requests: BTreeMap<String, u64>,
    pub writes: u64,
    pub writes_per_pair: f64,
    pub deletes_not_found: u64,
    pub reconciles: u64,
    pub reconciles_per_pull: f64,
    pub cpu_seconds: f64,
    pub cpu_ms_per_pull: f64,
    /// CPU of the rollout, less what the settled fleet costs over as long (Node heartbeats,
    /// leases, timers), per pull: what the pulls themselves cost.
    pub cpu_ms_per_pull_net: f64,
    pub idle_cpu_per_s: f64,
    pub rss_start_mib: f64,
    pub rss_peak_mib: f64,
    pub rss_after_rollout_mib: f64,
    pub rss_end_mib: f64,
    pub rss_after_node_removal_mib: Option<f64>,
    pub set: bool,
    pub largest_status_bytes: usize,
    pub idle_s: f64,
    pub idle_requests_per_min: f64,
    pub idle_writes_per_min: f64,
    pub idle_reconciles_per_s: f64,
    pub added_nodes: usize,
    pub warm_p50_s: Option<f64>,
    pub warm_p95_s: Option<f64>,
}

/// How long one simulated pull takes (the KWOK stages: `slow-<n>s` tags take n seconds, others 0.3 s).
pub fn pull_seconds(tag: &str) -> f64 {
    tag.strip_prefix("slow-")
        .and_then(|t| t.strip_suffix('s'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.3)
}

/// Makespan of `pulls` identical pulls of `pull` seconds under `concurrency` and `min_delay`, each
/// starting as early as the two rules allow (what the pacing engine does with instant reactions).
pub fn ideal_makespan(pulls: usize, concurrency: usize, min_delay: f64, pull: f64) -> f64 {
    let mut starts: Vec<f64> = Vec::with_capacity(pulls);
    for i in 0..pulls {
        let spaced = starts.last().map_or(0.0, |s| s + min_delay);
        let slot = if i >= concurrency {
            starts[i - concurrency] + pull
        } else {
            0.0
        };
        starts.push(spaced.max(slot));
    }
    starts.last().map_or(0.0, |s| s + pull)
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied()
}

fn secs(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64()
}

impl Report {
    pub fn new(i: Inputs<'_>) -> Self {
        let a = i.args;
        // The rollout's Pods (the recorder goes on to see those of nodes added later).
        let rollout: Vec<PodRecord> = i
            .records
            .iter()
            .filter(|r| r.seen <= i.rollout_end)
            .cloned()
            .collect();
        let records = rollout.as_slice();
        let pairs = a.nodes as usize * a.images;
        let pull = pull_seconds(&a.tag);
        let ideal = ideal_makespan(
            pairs,
            usize::try_from(a.concurrency).unwrap_or(1),
            a.min_delay,
            pull,
        );
        let makespan = secs(i.t0, i.settled);
        let mut seen: Vec<Timestamp> = records.iter().map(|r| r.seen).collect();
        seen.sort();
        let min_gap = seen
            .windows(2)
            .map(|w| secs(w[0], w[1]))
            .fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.min(g))));
        // The same gap where the API server received each pull Pod's creation (microseconds, and
        // free of the watch's delivery jitter): a create, or a server-side apply that creates
        // (both answer 201).
        let mut created: Vec<Timestamp> = i
            .requests
            .iter()
            .filter(|r| matches!(r.verb.as_str(), "create" | "patch"))
            .filter(|r| r.resource == "pods" && r.code == 201)
            .filter(|r| r.at >= i.t0 && r.at <= i.rollout_end)
            .map(|r| r.at)
            .collect();
        created.sort();
        let min_gap_server = created
            .windows(2)
            .map(|w| secs(w[0], w[1]))
            .fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.min(g))));
        let writes = audit::writes(i.requests, i.t0, i.rollout_end);
        let pulls = records.len().max(1) as f64;
        let (idle_from, idle_to, idle_reconciles) = i.idle;
        let idle_s = secs(idle_from, idle_to);
        let idle_requests: u64 = audit::by_verb(i.requests, idle_from, idle_to)
            .values()
            .sum();
        let idle_cpu_per_s = i.cpu.idle / idle_s.max(1.0);
        let mut warm = i.warm.to_vec();
        warm.sort_by(f64::total_cmp);
        Self {
            nodes: a.nodes,
            images: a.images,
            concurrency: a.concurrency,
            min_delay_s: a.min_delay,
            pull_s: pull,
            pairs,
            makespan_s: makespan,
            ideal_makespan_s: ideal,
            efficiency: if makespan > 0.0 {
                ideal / makespan
            } else {
                0.0
            },
            pull_pods: records.len(),
            pull_pods_deleted_before_pulling: i.records.iter().filter(|r| r.deleted_early).count(),
            max_in_flight: e2e::PodRecorder::max_in_flight(records),
            min_start_gap_s: min_gap,
            min_start_gap_server_s: min_gap_server,
            requests: audit::by_verb(i.requests, i.t0, i.rollout_end),
            writes,
            writes_per_pair: writes as f64 / pairs.max(1) as f64,
            deletes_not_found: audit::deletes_not_found(i.requests, i.t0, i.rollout_end),
            reconciles: i.reconciles,
            reconciles_per_pull: i.reconciles as f64 / pulls,
            cpu_seconds: i.cpu_seconds,
            cpu_ms_per_pull: i.cpu_seconds * 1000.0 / pulls,
            cpu_ms_per_pull_net: (i.cpu.rollout - idle_cpu_per_s * secs(i.t0, i.rollout_end))
                * 1000.0
                / pulls,
            idle_cpu_per_s,
            rss_start_mib: i.rss_start,
            rss_peak_mib: i.memory.1.0,
            rss_after_rollout_mib: i.memory.0.1,
            rss_end_mib: i.memory.1.1,
            rss_after_node_removal_mib: i.after_removal.map(|m| m.1),
            set: a.set,
            largest_status_bytes: i.largest_status,
            idle_s,
            idle_requests_per_min: idle_requests as f64 * 60.0 / idle_s.max(1.0),
            idle_writes_per_min: audit::writes(i.requests, idle_from, idle_to) as f64 * 60.0
                / idle_s.max(1.0),
            idle_reconciles_per_s: idle_reconciles as f64 / idle_s.max(1.0),
            added_nodes: warm.len(),
            warm_p50_s: percentile(&warm, 0.5),
            warm_p95_s: percentile(&warm, 0.95),
        }
    }

    /// A table for people.
    pub fn table(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        let mut out = format!(
            "fleet: {} nodes x {} images{}, c={}, d={}s, {}s pulls\n",
            self.nodes,
            self.images,
            if self.set {
                " (one CachedImageSet)"
            } else {
                ""
            },
            self.concurrency,
            self.min_delay_s,
            self.pull_s
        );
        let rows: Vec<(&str, String)> = vec![
            ("makespan", format!("{:.1} s", self.makespan_s)),
            ("pacing ideal", format!("{:.1} s", self.ideal_makespan_s)),
            ("efficiency", format!("{:.3}", self.efficiency)),
            ("pull Pods", self.pull_pods.to_string()),
            (
                "deleted before pulling",
                self.pull_pods_deleted_before_pulling.to_string(),
            ),
            (
                "most in flight",
                format!("{} (limit {})", self.max_in_flight, self.concurrency),
            ),
            (
                "shortest start gap",
                format!(
                    "{} s as watched, {} s as the API server received the creations (limit {} s)",
                    opt(self.min_start_gap_s),
                    opt(self.min_start_gap_server_s),
                    self.min_delay_s
                ),
            ),
            ("operator writes", self.writes.to_string()),
            ("writes per pair", format!("{:.2}", self.writes_per_pair)),
            ("deletes answered 404", self.deletes_not_found.to_string()),
            ("reconciles", self.reconciles.to_string()),
            (
                "reconciles per pull",
                format!("{:.2}", self.reconciles_per_pull),
            ),
            (
                "CPU",
                format!(
                    "{:.1} s ({:.2} ms per pull; {:.2} ms net of the idle {:.3} s/s)",
                    self.cpu_seconds,
                    self.cpu_ms_per_pull,
                    self.cpu_ms_per_pull_net,
                    self.idle_cpu_per_s
                ),
            ),
            (
                "RSS",
                format!(
                    "start {:.1} MiB, peak {:.1} MiB, after rollout {:.1} MiB, end {:.1} MiB{}",
                    self.rss_start_mib,
                    self.rss_peak_mib,
                    self.rss_after_rollout_mib,
                    self.rss_end_mib,
                    self.rss_after_node_removal_mib
                        .map(|m| format!(", a minute after every node went {m:.1} MiB"))
                        .unwrap_or_default()
                ),
            ),
            (
                "largest status",
                format!("{} bytes", self.largest_status_bytes),
            ),
            (
                "idle",
                format!(
                    "{:.1} requests/min, {:.1} writes/min, {:.3} reconciles/s over {:.0} s",
                    self.idle_requests_per_min,
                    self.idle_writes_per_min,
                    self.idle_reconciles_per_s,
                    self.idle_s
                ),
            ),
            (
                "new nodes warm",
                format!(
                    "{} nodes: p50 {} s, p95 {} s",
                    self.added_nodes,
                    opt(self.warm_p50_s),
                    opt(self.warm_p95_s)
                ),
            ),
        ];
        for (k, v) in rows {
            out.push_str(&format!("  {k:<24} {v}\n"));
        }
        out.push_str("  requests during the rollout (verb resource: count)\n");
        for (k, v) in &self.requests {
            out.push_str(&format!("    {k:<40} {v}\n"));
        }
        out
    }
}
