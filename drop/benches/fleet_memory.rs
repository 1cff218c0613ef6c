//! What the operator holds per (image, node) pair once a fleet is settled, at the fleet benchmark's
//! scenario sizes, up to S3 (200 images on 5000 nodes: a million pairs).
//!
//! A million pulls take this project's two-core machines most of a day to run through KWOK, so the
//! end-to-end fleet benchmark stops at S2; the memory that grows with the pairs can be measured
//! without pulling. Two things grow with them:
//! - the CachedImage cache: every image's status lists the nodes holding it (`cachedNodes`);
//! - the pacer: every image's targets, and the history of every (image, node) pair.
//!
//! This builds both as the operator does after a restart into a settled fleet (every image's status
//! lists every node; one reconcile per image restores the pacer from it) and prints the heap they
//! hold, counted by this binary's allocator (bytes and live allocations; glibc adds about 16 bytes
//! to each allocation). Equal lists of cached nodes share one copy, so the cache is also measured
//! with every image's list different (each leaves out another node), as during a rollout.
//!
//! Run: `cargo bench -p drop --bench fleet_memory`.

use drop::api::{CachedImage, CachedImageSpec, CachedImageStatus};
use drop::cachedimage::pacer::{Pacer, Step};
use drop::pacing::{Pace, PolicyKey};
use jiff::Timestamp;
use std::time::Duration;

#[path = "support/counting.rs"]
mod counting;
use counting::Held;

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

/// An image whose status lists `nodes`.
fn image<'a>(i: usize, nodes: impl IntoIterator<Item = &'a String>) -> CachedImage {
    let mut ci = CachedImage::new(
        &format!("team-app-{i:04}"),
        CachedImageSpec {
            image: format!("registry.example.com/team/app-{i}"),
            tag: Some("v1".into()),
            ..CachedImageSpec::default()
        },
    );
    ci.status = Some(CachedImageStatus {
        cached_nodes: nodes.into_iter().collect(),
        resolved_digest: Some(format!("sha256:{i:064x}")),
        ..Default::default()
    });
    ci
}

fn main() {
    println!("Heap held per settled fleet (counting allocator; MiB include 16 B per allocation)");
    println!(
        "{:>7} {:>6} {:>9} {:>16} {:>22} {:>16} {:>12}",
        "images", "nodes", "pairs", "image cache", "cache, lists differ", "pacer", "pacer/pair"
    );
    for (images, nodes) in [(10, 1000), (50, 1000), (200, 1000), (200, 5000)] {
        let names: Vec<String> = (0..nodes).map(|n| format!("ci-pool-{n:05}")).collect();
        let before = Held::now();
        let fleet: Vec<CachedImage> = (0..images).map(|i| image(i, &names)).collect();
        let cache = Held::now().since(before);
        let before = Held::now();
        let differing: Vec<CachedImage> = (0..images)
            .map(|i| image(i, names.iter().filter(|n| **n != names[i % nodes])))
            .collect();
        let differ = Held::now().since(before);
        drop(differing);
        let known: Vec<(String, PolicyKey)> = fleet
            .iter()
            .map(|ci| {
                let name = ci.metadata.name.clone().unwrap_or_default();
                (name, Some("ci-pool".into()))
            })
            .collect();

        let (wake, woken) = tokio::sync::mpsc::unbounded_channel();
        let before = Held::now();
        let pacer = Pacer::new(wake, Duration::from_secs(600));
        let now = Timestamp::now();
        for ci in &fleet {
            std::hint::black_box(pacer.step(&Step {
                now,
                image: ci,
                targets: &names,
                pace: Ok((Some("ci-pool".into()), Pace::builtin())),
                policy: None,
                pods: &[],
                known_images: &known,
                nodes: &[],
            }));
        }
        let pacer_held = Held::now().since(before);
        let pairs = images * nodes;
        println!(
            "{:>7} {:>6} {:>9} {:>12.1} MiB {:>18.1} MiB {:>12.1} MiB {:>10} B",
            images,
            nodes,
            pairs,
            cache.mib(),
            differ.mib(),
            pacer_held.mib(),
            (pacer_held.bytes + 16 * pacer_held.allocations) / pairs,
        );
        drop((pacer, woken, fleet));
    }
}
