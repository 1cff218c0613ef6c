//! What one CachedImage reconcile costs in the pacer, as the fleet grows.
//!
//! Every reconcile of one image hands its targets to the shared pacer, which decides over all
//! images (the start order is global). Handing the engine every target of the fleet on every
//! reconcile would make a full resync cost images × targets; the pacer leaves out images with nothing
//! due and images whose policy has no free slot. This prints, for growing fleets and in two regimes,
//! the cost of one reconcile beside a baseline measured in the same run: one engine decision over
//! every target of the fleet, handed in as they are. Regimes:
//! - settled, where a CI fleet spends its life: everything cached, no re-pull due;
//! - rollout: nothing cached yet, the pace's one pull slot taken, every other pull waiting.
//!
//! The baseline is close to what a reconcile cost before the pacer left images out (it also cloned
//! every target, so it cost more).
//!
//! Run: `cargo bench -p drop --bench pacer`.

use drop::api::{CachedImage, CachedImageSpec, CachedImageStatus};
use drop::cachedimage::pacer::{Pacer, Step};
use drop::pacing::{self, History, InFlight, Pace, PolicyKey, PullKey, Target};
use jiff::Timestamp;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// An image, cached on every node if `cached` (as its status says after an operator restart).
fn image(i: usize, nodes: &[String], cached: bool) -> CachedImage {
    let mut ci = CachedImage::new(
        &format!("image-{i:04}"),
        CachedImageSpec {
            image: format!("registry.example.com/team/app-{i}"),
            tag: Some("v1".into()),
            ..CachedImageSpec::default()
        },
    );
    if cached {
        ci.status = Some(CachedImageStatus {
            cached_nodes: nodes.iter().collect(),
            ..Default::default()
        });
    }
    ci
}

/// Mean wall time of `f` over `rounds` runs.
fn time(rounds: usize, mut f: impl FnMut()) -> Duration {
    let t0 = Instant::now();
    for _ in 0..rounds {
        f();
    }
    t0.elapsed() / u32::try_from(rounds).unwrap_or(u32::MAX)
}

struct Figures {
    targets: usize,
    /// One reconcile, through the pacer.
    reconcile: Duration,
    /// One engine decision over every target of the fleet.
    whole_fleet: Duration,
}

fn measure(images: usize, nodes: usize, cached: bool) -> Figures {
    let now = Timestamp::now();
    let node_names: Vec<String> = (0..nodes).map(|n| format!("node-{n:04}")).collect();
    let fleet: Vec<CachedImage> = (0..images).map(|i| image(i, &node_names, cached)).collect();
    let known: Vec<(String, PolicyKey)> = fleet
        .iter()
        .map(|ci| (ci.metadata.name.clone().unwrap_or_default(), None))
        .collect();
    let (wake, mut woken) = tokio::sync::mpsc::unbounded_channel();
    let pacer = Pacer::new(wake, Duration::from_secs(600));
    let pass = || {
        for ci in &fleet {
            black_box(pacer.step(&Step {
                now,
                image: ci,
                targets: &node_names,
                pace: Ok((None, Pace::builtin())),
                policy: None,
                pods: &[],
                known_images: &known,
                nodes: &[],
            }));
        }
    };
    // The first pass restores every image from its status (the operator's start); in a rollout it
    // also starts the first pull.
    pass();
    while woken.try_recv().is_ok() {}
    let rounds = (200_000 / (images * images * nodes)).clamp(1, 20);
    let reconcile = time(rounds, pass) / u32::try_from(images).unwrap_or(u32::MAX);

    // The same world, as one engine input over the whole fleet.
    let targets: Vec<Target> = known
        .iter()
        .flat_map(|(image, _)| {
            node_names.iter().map(|node| Target {
                key: PullKey::new(image, node),
                priority: 0,
                policy: None,
                registry: "registry.example.com".into(),
            })
        })
        .collect();
    let history: BTreeMap<PullKey, History> = targets
        .iter()
        .map(|t| {
            let h = History {
                last_success: cached.then_some(now),
                ..History::default()
            };
            (t.key.clone(), h)
        })
        .collect();
    let in_flight: Vec<InFlight> = targets
        .iter()
        .take(usize::from(!cached))
        .map(|t| InFlight {
            key: t.key.clone(),
            policy: None,
            registry: t.registry.clone(),
            started: now,
        })
        .collect();
    let (paces, earlier_starts, registry_budgets) =
        (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let target_refs: Vec<&pacing::Target> = targets.iter().collect();
    let input = pacing::Input {
        now,
        paces: &paces,
        targets: &target_refs,
        earlier_starts: &earlier_starts,
        in_flight: &in_flight,
        history: &history,
        pull_timeout: Duration::from_secs(600),
        registry_budgets: &registry_budgets,
    };
    let whole_fleet = time(rounds * 5, || {
        black_box(pacing::decide(black_box(&input)));
    });
    Figures {
        targets: targets.len(),
        reconcile,
        whole_fleet,
    }
}

fn table(regime: &str, cached: bool) {
    println!(
        "\npacer, {regime}: one CachedImage reconcile against one decision over the whole fleet"
    );
    println!(
        "{:>7} {:>6} {:>8} {:>14} {:>12} {:>10} {:>16}",
        "images", "nodes", "targets", "reconcile", "whole fleet", "ratio", "full resync"
    );
    for (images, nodes) in [(10, 20), (50, 50), (100, 200), (200, 500)] {
        let f = measure(images, nodes, cached);
        println!(
            "{:>7} {:>6} {:>8} {:>11.1} µs {:>9.1} µs {:>9.1}× {:>13.1} ms",
            images,
            nodes,
            f.targets,
            f.reconcile.as_secs_f64() * 1e6,
            f.whole_fleet.as_secs_f64() * 1e6,
            f.whole_fleet.as_secs_f64() / f.reconcile.as_secs_f64(),
            f.reconcile.as_secs_f64() * 1e3 * images as f64,
        );
    }
}

fn main() {
    table("settled (all cached)", true);
    table("rollout (nothing cached, one pull in flight)", false);
}
