use super::*;
use crate::api::CachedImageSpec;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn image(name: &str) -> CachedImage {
    CachedImage::new(
        name,
        CachedImageSpec {
            image: format!("registry.example.com/{name}"),
            tag: Some("1".into()),
            ..CachedImageSpec::default()
        },
    )
}

fn pod(
    ci: &CachedImage,
    node: &str,
    attempt: u32,
    created: i64,
    outcome: PullOutcome,
) -> PullPodView {
    PullPodView {
        name: format!("{}-{node}-{attempt}", ci.name_any()),
        uid: format!("uid-{}-{node}-{attempt}", ci.name_any()),
        image: ci.name_any(),
        node: node.to_owned(),
        reference: ci.spec.reference(),
        attempt,
        policy: None,
        created: at(created),
        outcome,
    }
}

/// Images on one node under the built-in pace (one pull at a time, 10 s apart, retries after 30 s),
/// reconciled one step at a time.
struct World {
    pacer: Pacer,
    images: Vec<CachedImage>,
    known: Vec<(String, PolicyKey)>,
    nodes: Vec<String>,
    /// The Nodes that exist (targets or not).
    existing: Vec<Arc<Node>>,
    pace: Pace,
    wakes: tokio::sync::mpsc::UnboundedReceiver<ObjectRef<CachedImage>>,
}

impl World {
    fn new(names: &[&str]) -> Self {
        let (wake, wakes) = tokio::sync::mpsc::unbounded_channel();
        Self {
            pacer: Pacer::new(wake, Duration::from_secs(600)),
            images: names.iter().map(|n| image(n)).collect(),
            known: names.iter().map(|n| ((*n).to_owned(), None)).collect(),
            nodes: vec!["n1".to_owned()],
            existing: Vec::new(),
            pace: Pace::builtin(),
            wakes,
        }
    }

    /// The images woken since last asked, by name.
    fn woken(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        while let Ok(r) = self.wakes.try_recv() {
            names.push(r.name);
        }
        names
    }

    fn step(&self, i: usize, now: i64, pods: &[PullPodView]) -> Outcome {
        self.pacer.step(&Step {
            now: at(now),
            image: &self.images[i],
            targets: &self.nodes,
            pace: Ok((None, self.pace.clone())),
            policy: None,
            pods,
            known_images: &self.known,
            nodes: &self.existing,
        })
    }
}

fn starts(out: &Outcome) -> Vec<(&str, u32)> {
    out.start.iter().map(|(n, a)| (n.as_str(), *a)).collect()
}

#[test]
fn pacing_an_image_waiting_out_a_backoff_wakes_even_while_others_fill_the_policy() {
    let w = World::new(&["a", "b"]);
    let (a, b) = (&w.images[0], &w.images[1]);
    // Nothing starts until both images told their targets; then a goes first (name order), and
    // fails at 1 s: its retry is due at 31 s.
    assert!(w.step(1, 0, &[]).start.is_empty());
    assert_eq!(starts(&w.step(0, 0, &[])), [("n1", 1)]);
    let failed = PullOutcome::Failed {
        reason: "ErrImagePull".into(),
        message: "no such host".into(),
    };
    w.step(0, 1, &[pod(a, "n1", 1, 0, failed)]);
    // b starts once the 10 s spacing allows, and takes the policy's only slot.
    assert_eq!(w.step(1, 2, &[]).wake_at, Some(at(10)));
    assert_eq!(starts(&w.step(1, 10, &[])), [("n1", 1)]);
    // a reconciles while the slot is taken: it must still learn when its retry falls due.
    let out = w.step(0, 11, &[]);
    assert!(out.start.is_empty());
    assert_eq!(out.wake_at, Some(at(31)));
    // b's pull ends before a's retry is due: b's reconcile starts nothing for a...
    let pulled = PullOutcome::Pulled { digest: None };
    assert!(
        w.step(1, 20, &[pod(b, "n1", 1, 10, pulled)])
            .start
            .is_empty()
    );
    // ...and a, woken at 31 s, retries.
    assert_eq!(starts(&w.step(0, 31, &[])), [("n1", 2)]);
}

#[test]
fn pacing_an_image_that_never_registers_holds_its_policy_for_a_while_only() {
    // b is known (it exists, under the same policy) but never gets to reconcile.
    let mut w = World::new(&["a", "b"]);
    let out = w.step(0, 0, &[]);
    assert!(out.start.is_empty(), "b might come first: a waits");
    assert_eq!(w.woken(), ["b"], "b is woken to register");
    assert_eq!(
        out.wake_at,
        Some(at(30)),
        "a retries when the hold runs out"
    );
    assert!(w.step(0, 29, &[]).start.is_empty());
    assert_eq!(starts(&w.step(0, 30, &[])), [("n1", 1)]);
}

#[test]
fn pacing_a_settled_image_still_spaces_the_next_start() {
    let w = World::new(&["a", "b"]);
    let a = &w.images[0];
    assert!(w.step(1, 0, &[]).start.is_empty());
    assert_eq!(starts(&w.step(0, 0, &[])), [("n1", 1)]);
    // a is cached at 2 s and has nothing due: later decisions leave it out, but its start at 0 s
    // still holds b back until 10 s.
    let pulled = PullOutcome::Pulled { digest: None };
    assert!(w.step(0, 2, &[pod(a, "n1", 1, 0, pulled)]).start.is_empty());
    let out = w.step(1, 3, &[]);
    assert!(out.start.is_empty());
    assert_eq!(out.wake_at, Some(at(10)));
    assert_eq!(starts(&w.step(1, 10, &[])), [("n1", 1)]);
}

#[test]
fn pacing_only_the_image_next_in_line_wakes_when_the_delay_ends() {
    // Three images on two nodes under ten slots and one second between starts: a's two pulls go
    // first, then b's, then c's. At each delay's end exactly one image has a reason to reconcile.
    let mut w = World::new(&["a", "b", "c"]);
    w.nodes = vec!["n1".to_owned(), "n2".to_owned()];
    w.pace = Pace {
        max_concurrent: 10,
        min_delay: Duration::from_secs(1),
        ..Pace::builtin()
    };
    let a = w.images[0].clone();
    w.step(1, 0, &[]);
    w.step(2, 0, &[]);
    let out = w.step(0, 0, &[]);
    assert_eq!(starts(&out), [("n1", 1)]);
    assert_eq!(out.wake_at, Some(at(1)), "a is next in line");
    assert!(out.wake_others.is_empty());
    // b and c, reconciling in between (their own events), have nothing to wake for.
    assert_eq!(w.step(1, 0, &[]).wake_at, None);
    assert_eq!(w.step(2, 0, &[]).wake_at, None);
    // a starts its last pull; b is next, at 2 s: a says so, and b alone is woken then.
    let out = w.step(0, 1, &[pod(&a, "n1", 1, 0, PullOutcome::Pulling)]);
    assert_eq!(starts(&out), [("n2", 1)]);
    assert_eq!(out.wake_others, [("b".to_owned(), at(2))]);
    assert!(out.wake_at.is_none_or(|t| t > at(2)), "{:?}", out.wake_at);
    // Another reconcile of a before then does not wake b twice.
    assert!(w.step(0, 1, &[]).wake_others.is_empty());
    let out = w.step(1, 2, &[]);
    assert_eq!(starts(&out), [("n1", 1)]);
    assert_eq!(out.wake_at, Some(at(3)));
    assert_eq!(w.step(2, 2, &[]).wake_at, None);
    // b is deleted while next in line: c, waiting behind it, is woken.
    w.woken();
    w.pacer.forget("b");
    assert_eq!(w.woken(), ["a", "c"]);
}

fn node_listing(names: &[&str]) -> Node {
    use k8s_openapi::api::core::v1::{ContainerImage, NodeStatus};
    let mut node = Node::default();
    node.metadata.name = Some("n1".into());
    node.status = Some(NodeStatus {
        images: Some(
            names
                .iter()
                .map(|n| ContainerImage {
                    names: Some(vec![(*n).to_owned()]),
                    size_bytes: None,
                })
                .collect(),
        ),
        ..NodeStatus::default()
    });
    super::super::presence::trim(&mut node);
    node
}

#[test]
fn pacing_an_image_the_node_stops_listing_is_pulled_again() {
    let w = World::new(&["a"]);
    let a = &w.images[0];
    let listed = "registry.example.com/a:1";
    assert_eq!(starts(&w.step(0, 0, &[])), [("n1", 1)]);
    let pulled = PullOutcome::Pulled { digest: None };
    let out = w.step(0, 2, &[pod(a, "n1", 1, 0, pulled)]);
    assert_eq!(*out.observed.node("n1").unwrap(), NodeState::Cached);
    // Right after the pull the kubelet may not list it yet: that proves nothing.
    assert!(
        w.pacer
            .node_images_changed(&node_listing(&["other:1"]), 50)
            .is_empty()
    );
    // Listed, then no longer, in a list with room: gone.
    assert!(
        w.pacer
            .node_images_changed(&node_listing(&[listed, "other:1"]), 50)
            .is_empty()
    );
    assert!(
        w.pacer
            .node_images_changed(&node_listing(&["other:1", "big:1"]), 2)
            .is_empty(),
        "missing from a full list proves nothing"
    );
    let woken = w.pacer.node_images_changed(&node_listing(&["other:1"]), 50);
    assert_eq!(woken, [ObjectRef::new("a")]);
    assert!(
        w.pacer
            .node_images_changed(&node_listing(&["other:1"]), 50)
            .is_empty(),
        "named once"
    );
    // Its reconcile pulls it again (the old Pod is long gone), and the status says so meanwhile.
    let out = w.step(0, 20, &[]);
    assert_eq!(starts(&out), [("n1", 2)]);
    assert_eq!(*out.observed.node("n1").unwrap(), NodeState::Pulling);
}

fn failure_reason(out: &Outcome) -> Option<String> {
    match out.observed.node("n1") {
        Some(NodeState::Failed { reason, .. }) => Some(reason.clone()),
        _ => None,
    }
}

#[test]
fn pacing_a_pull_whose_pod_vanishes_frees_its_slot_at_once() {
    let w = World::new(&["a", "b"]);
    let a = &w.images[0];
    assert!(w.step(1, 0, &[]).start.is_empty());
    assert_eq!(starts(&w.step(0, 0, &[])), [("n1", 1)]);
    // a's Pod is seen pulling, then it is gone without a result (someone deleted it).
    w.step(0, 1, &[pod(a, "n1", 1, 0, PullOutcome::Pulling)]);
    let out = w.step(0, 2, &[]);
    assert_eq!(out.ended, [Ended::Failed(POD_DELETED.into())]);
    assert_eq!(failure_reason(&out).as_deref(), Some(POD_DELETED));
    assert_eq!(w.pacer.active_pulls(), 0);
    // The slot is free: b starts as soon as the spacing allows, not after any grace.
    assert_eq!(starts(&w.step(1, 10, &[])), [("n1", 1)]);
}

#[test]
fn pacing_a_pull_whose_pod_never_appears_wakes_its_image_and_ends() {
    let w = World::new(&["a", "b"]);
    assert!(w.step(1, 0, &[]).start.is_empty());
    assert_eq!(starts(&w.step(0, 0, &[])), [("n1", 1)]);
    // The Pod cache has not shown the Pod yet: the pull stays in flight, and the image is told to
    // look again when the grace ends, even though nothing else would wake it.
    let out = w.step(0, 1, &[]);
    assert!(out.ended.is_empty());
    assert_eq!(w.pacer.active_pulls(), 1);
    assert_eq!(out.wake_at, Some(at(30)));
    // At the end of the grace the pull has failed and its slot is free.
    let out = w.step(0, 30, &[]);
    assert_eq!(out.ended, [Ended::Failed(POD_MISSING.into())]);
    assert_eq!(failure_reason(&out).as_deref(), Some(POD_MISSING));
    assert_eq!(w.pacer.active_pulls(), 0);
    assert_eq!(starts(&w.step(1, 30, &[])), [("n1", 1)]);
}

#[test]
fn pacing_a_node_back_from_a_spell_out_of_the_targets_is_not_pulled_again() {
    let mut w = World::new(&["a"]);
    w.nodes = vec!["n1".to_owned(), "n2".to_owned()];
    w.existing = w
        .nodes
        .iter()
        .map(|n| {
            let mut node = Node::default();
            node.metadata.name = Some(n.clone());
            Arc::new(node)
        })
        .collect();
    let a = w.images[0].clone();
    let pulled = || PullOutcome::Pulled { digest: None };
    assert_eq!(starts(&w.step(0, 0, &[])), [("n1", 1)]);
    w.step(0, 1, &[pod(&a, "n1", 1, 0, pulled())]);
    assert_eq!(starts(&w.step(0, 10, &[])), [("n2", 1)]);
    w.step(0, 11, &[pod(&a, "n2", 1, 10, pulled())]);
    // n2 goes not-ready (tainted, out of the targets) and comes back a minute later.
    w.nodes.truncate(1);
    assert!(w.step(0, 20, &[]).start.is_empty());
    assert_eq!(w.pacer.remembered_pairs(), 2, "n2's Node still exists");
    w.nodes.push("n2".to_owned());
    let out = w.step(0, 80, &[]);
    assert!(out.start.is_empty(), "{:?}", out.start);
    assert_eq!(*out.observed.node("n2").unwrap(), NodeState::Cached);
    // Out again, and this time its Node is deleted: nothing about it stays.
    w.nodes.truncate(1);
    w.existing.truncate(1);
    w.step(0, 90, &[]);
    assert_eq!(w.pacer.remembered_pairs(), 1);
}

#[test]
fn pacing_a_restart_keeps_a_cached_node_that_is_not_a_target_at_the_time() {
    let mut w = World::new(&["a"]);
    w.existing = ["n1", "n2"]
        .iter()
        .map(|n| {
            let mut node = Node::default();
            node.metadata.name = Some((*n).to_owned());
            Arc::new(node)
        })
        .collect();
    // The status a previous operator wrote: cached on both; n2 is not-ready at the restart.
    w.images[0].status = Some(CachedImageStatus {
        cached_nodes: ["n1", "n2"].iter().collect(),
        last_pulled_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(
            -60,
        ))),
        ..CachedImageStatus::default()
    });
    assert!(w.step(0, 0, &[]).start.is_empty());
    w.nodes.push("n2".to_owned());
    let out = w.step(0, 30, &[]);
    assert!(out.start.is_empty(), "{:?}", out.start);
    assert_eq!(*out.observed.node("n2").unwrap(), NodeState::Cached);
}

#[test]
fn pacing_nodes_that_leave_the_targets_leave_the_pacer() {
    let mut w = World::new(&["a"]);
    w.nodes = (0..50).map(|i| format!("n{i}")).collect();
    let a = w.images[0].clone();
    let mut now = 0;
    // Pull every node (the built-in pace: one at a time, 10 s apart).
    while w.pacer.remembered_pairs() < 50 || w.pacer.active_pulls() > 0 {
        let out = w.step(0, now, &[]);
        let pods: Vec<PullPodView> = out
            .start
            .iter()
            .map(|(n, at)| pod(&a, n, *at, now, PullOutcome::Pulled { digest: None }))
            .collect();
        w.step(0, now, &pods);
        now += 10;
        assert!(now < 10_000, "the rollout did not end");
    }
    assert_eq!(w.pacer.remembered_pairs(), 50);
    // 45 nodes leave: nothing about them stays.
    w.nodes.truncate(5);
    w.step(0, now, &[]);
    assert_eq!(w.pacer.remembered_pairs(), 5);
    assert_eq!(
        w.pacer.lock().images["a"].pairs.len(),
        5,
        "no pair beyond the targets"
    );
    w.nodes.clear();
    w.step(0, now + 1, &[]);
    assert_eq!(w.pacer.remembered_pairs(), 0);
    assert_eq!(
        w.pacer.lock().names.names.len(),
        1,
        "the shared node names went with the nodes; the image's stays"
    );
}

#[test]
fn pacing_a_node_change_names_only_the_images_it_retargets() {
    use k8s_openapi::api::core::v1::Node;
    let node = |name: &str, pool: &str| {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some([("pool".to_owned(), pool.to_owned())].into());
        n
    };
    let mut w = World::new(&["gpu", "web"]);
    w.images[0].spec.node_selector = [("pool".to_owned(), "gpu".to_owned())].into();
    w.images[1].spec.node_selector = [("pool".to_owned(), "web".to_owned())].into();
    let images: Vec<Arc<CachedImage>> = w.images.iter().cloned().map(Arc::new).collect();
    let names = |refs: Vec<ObjectRef<CachedImage>>| -> Vec<String> {
        refs.into_iter().map(|r| r.name).collect()
    };
    // Not reconciled yet: the pacer cannot judge, so every image is named.
    assert_eq!(
        names(w.pacer.retargeted_by(&node("g1", "gpu"), &images, &[])),
        ["gpu", "web"]
    );
    // gpu targets g1, web targets w1.
    w.nodes = vec!["g1".into()];
    w.step(0, 0, &[]);
    w.nodes = vec!["w1".into()];
    w.step(1, 0, &[]);
    // A new gpu node concerns gpu only; a heartbeat of a known node concerns nobody.
    assert_eq!(
        names(w.pacer.retargeted_by(&node("g2", "gpu"), &images, &[])),
        ["gpu"]
    );
    assert!(
        w.pacer
            .retargeted_by(&node("w1", "web"), &images, &[])
            .is_empty()
    );
    // w1 relabelled into the gpu pool concerns both; its deletion concerns web.
    assert_eq!(
        names(w.pacer.retargeted_by(&node("w1", "gpu"), &images, &[])),
        ["gpu", "web"]
    );
    let mut gone = node("w1", "web");
    gone.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(5)));
    assert_eq!(names(w.pacer.retargeted_by(&gone, &images, &[])), ["web"]);
}

#[test]
fn pacing_a_refused_pull_pod_frees_its_slot_and_backs_off() {
    let w = World::new(&["a", "b"]);
    assert!(w.step(1, 0, &[]).start.is_empty());
    assert_eq!(starts(&w.step(0, 0, &[])), [("n1", 1)]);
    assert_eq!(w.pacer.active_pulls(), 1);
    // The API server refuses the Pod: the slot is free at once, not after the creation grace.
    w.pacer.refused(
        "a",
        "n1",
        "pods \"a-n1-1\" is forbidden: exceeded quota",
        at(0),
    );
    assert_eq!(w.pacer.active_pulls(), 0);
    let out = w.step(0, 1, &[]);
    assert_eq!(failure_reason(&out).as_deref(), Some(POD_REFUSED));
    assert!(out.start.is_empty(), "the refused pull backs off");
    // Told twice (the framework retries a reconcile), it counts once.
    w.pacer.refused("a", "n1", "again", at(1));
    assert!(
        starts(&w.step(1, 10, &[])).contains(&("n1", 1)),
        "b is not held up"
    );
}

#[test]
fn pacing_an_image_the_cache_no_longer_has_frees_its_slot() {
    let mut w = World::new(&["a", "b"]);
    assert!(w.step(1, 0, &[]).start.is_empty());
    assert_eq!(starts(&w.step(0, 0, &[])), [("n1", 1)]);
    assert_eq!(w.pacer.active_pulls(), 1);
    // a is deleted while the watch re-lists: no deletion call ever comes, a just stops being known.
    w.known.retain(|(n, _)| n != "a");
    let out = w.step(1, 10, &[]);
    assert_eq!(starts(&out), [("n1", 1)], "a's slot and turn went with it");
    assert_eq!(w.pacer.remembered_pairs(), 1, "only b's pair is left");
}

#[test]
fn pacing_a_repull_keeps_the_node_cached_in_the_status() {
    let w = World::new(&["a"]);
    let a = &w.images[0];
    let pace = Pace {
        repull_interval: Some(Duration::from_secs(100)),
        ..Pace::builtin()
    };
    let step = |now: i64, pods: &[PullPodView]| {
        w.pacer.step(&Step {
            now: at(now),
            image: a,
            targets: &w.nodes,
            pace: Ok((None, pace.clone())),
            policy: None,
            pods,
            known_images: &w.known,
            nodes: &[],
        })
    };
    assert_eq!(starts(&step(0, &[])), [("n1", 1)]);
    let pulled = PullOutcome::Pulled { digest: None };
    step(1, &[pod(a, "n1", 1, 0, pulled)]);
    // The refresh is due 100 s after the success: the node is pulled again, and stays cached.
    let out = step(101, &[]);
    assert_eq!(starts(&out), [("n1", 2)]);
    assert_eq!(*out.observed.node("n1").unwrap(), NodeState::Refreshing);
    let status = super::super::status::compute(None, &out.observed, at(101));
    assert_eq!(status.phase, Some(crate::api::CachedImagePhase::Ready));
}

#[test]
fn warmup_missing_on_names_the_targeting_images_not_cached_there() {
    use k8s_openapi::api::core::v1::{Node, NodeSpec, Taint, Toleration};
    let warming = |name: &str| {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "warming".into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        n
    };
    let also = [Toleration {
        key: Some("warming".into()),
        operator: Some("Exists".into()),
        ..Toleration::default()
    }];
    let mut w = World::new(&["a", "b", "blocked"]);
    w.images[2].spec.policy_ref = Some(crate::api::PolicyReference {
        name: "absent".into(),
    });
    w.known[2].1 = Some("absent".into());
    let images: Vec<Arc<CachedImage>> = w.images.iter().cloned().map(Arc::new).collect();
    let n1 = warming("n1");
    // Before any reconcile the pacer cannot tell: every image counts as missing.
    assert_eq!(
        w.pacer.missing_on(&n1, &images, &also),
        ["a", "b", "blocked"]
    );
    // Without the toleration the taint keeps the images it can judge away (the one naming a policy
    // it has not seen still counts).
    assert_eq!(w.pacer.missing_on(&n1, &images, &[]), ["blocked"]);
    // The blocked image reconciles (its policy does not exist): it pulls nowhere, so it no longer
    // counts. a starts first and gets pulled; b is still missing.
    w.pacer.step(&Step {
        now: at(0),
        image: &w.images[2],
        targets: &w.nodes,
        pace: Err(Blocked::PolicyNotFound("absent".into())),
        policy: None,
        pods: &[],
        known_images: &w.known,
        nodes: &[],
    });
    w.step(1, 0, &[]);
    assert_eq!(starts(&w.step(0, 0, &[])), [("n1", 1)]);
    assert_eq!(w.pacer.missing_on(&n1, &images, &also), ["a", "b"]);
    let pulled = PullOutcome::Pulled { digest: None };
    w.step(0, 2, &[pod(&w.images[0], "n1", 1, 0, pulled.clone())]);
    assert_eq!(w.pacer.missing_on(&n1, &images, &also), ["b"]);
    assert_eq!(starts(&w.step(1, 12, &[])), [("n1", 1)]);
    w.step(1, 14, &[pod(&w.images[1], "n1", 1, 12, pulled)]);
    assert!(w.pacer.missing_on(&n1, &images, &also).is_empty());
    // A node the images do not target is warm at once.
    w.images[0].spec.node_selector = [("pool".to_owned(), "gpu".to_owned())].into();
    w.images[1].spec.node_selector = [("pool".to_owned(), "gpu".to_owned())].into();
    let images: Vec<Arc<CachedImage>> = w.images.iter().cloned().map(Arc::new).collect();
    assert!(
        w.pacer
            .missing_on(&warming("n2"), &images, &also)
            .is_empty()
    );
}

#[test]
fn registry_budget_an_image_held_by_its_registry_says_so_and_starts_when_a_slot_frees() {
    // Two images from one registry under separate paces (one node each, no spacing), with a
    // registry budget of 1.
    let (wake, _wakes) = tokio::sync::mpsc::unbounded_channel();
    let pacer = Pacer::new(wake, Duration::from_secs(600))
        .with_registry_budgets(BTreeMap::from([("registry.example.com".into(), 1)]));
    let images = [image("a"), image("b")];
    let known: Vec<(String, PolicyKey)> = vec![
        ("a".into(), Some("pa".into())),
        ("b".into(), Some("pb".into())),
    ];
    let nodes = vec!["n1".to_owned()];
    let pace = Pace {
        min_delay: Duration::ZERO,
        ..Pace::builtin()
    };
    let step = |i: usize, now: i64, pods: &[PullPodView]| {
        let policy = known[i].1.clone();
        pacer.step(&Step {
            now: at(now),
            image: &images[i],
            targets: &nodes,
            pace: Ok((policy, pace.clone())),
            policy: None,
            pods,
            known_images: &known,
            nodes: &[],
        })
    };
    assert_eq!(starts(&step(0, 0, &[])), [("n1", 1)]);
    let held = step(1, 1, &[]);
    assert!(held.start.is_empty());
    assert_eq!(
        held.observed.registry_wait,
        Some(("registry.example.com".to_owned(), 1))
    );
    assert_eq!(
        pacer.registry_loads(),
        [RegistryLoad {
            registry: "registry.example.com".into(),
            in_flight: 1,
            waiting_images: 1
        }]
    );
    // a's pull ends: b may start, and waits no more.
    let pulled = PullOutcome::Pulled { digest: None };
    step(0, 2, &[pod(&images[0], "n1", 1, 0, pulled)]);
    let out = step(1, 2, &[]);
    assert_eq!(starts(&out), [("n1", 1)]);
    assert_eq!(out.observed.registry_wait, None);
    assert_eq!(pacer.registry_loads()[0].waiting_images, 0);
}
