use super::*;
use jiff::SignedDuration;
use proptest::prelude::*;

/// No registry has a budget.
static NO_BUDGETS: BTreeMap<Registry, u32> = BTreeMap::new();

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn secs(ts: Timestamp) -> i64 {
    ts.as_second() - 1_800_000_000
}

fn pace(c: u32, d: u64) -> Pace {
    Pace {
        max_concurrent: c,
        min_delay: Duration::from_secs(d),
        ..Pace::builtin()
    }
}

fn target(image: &str, node: &str, priority: i32, policy: Option<&str>) -> Target {
    Target {
        key: PullKey::new(image, node),
        priority,
        policy: policy.map(Arc::from),
        registry: REGISTRY.into(),
    }
}

/// The registry of the targets [`target`] makes.
const REGISTRY: &str = "registry.example.com";

/// A discrete-event run: pulls take `duration(key, attempt)` and fail when `fails(key, attempt)`.
struct Sim {
    now: Timestamp,
    paces: BTreeMap<PolicyKey, Pace>,
    targets: Vec<Target>,
    history: BTreeMap<PullKey, History>,
    flying: Vec<(InFlight, Timestamp, bool)>,
    attempts: BTreeMap<PullKey, u32>,
    /// (key, policy, start, attempt)
    log: Vec<(PullKey, PolicyKey, Timestamp, u32)>,
    max_in_flight: BTreeMap<PolicyKey, u32>,
    budgets: BTreeMap<Registry, u32>,
    /// Most pulls in flight per registry.
    max_at_registry: BTreeMap<Registry, u32>,
}

impl Sim {
    fn new(paces: BTreeMap<PolicyKey, Pace>, targets: Vec<Target>) -> Self {
        Self {
            now: at(0),
            paces,
            targets,
            history: BTreeMap::new(),
            flying: Vec::new(),
            attempts: BTreeMap::new(),
            log: Vec::new(),
            max_in_flight: BTreeMap::new(),
            budgets: BTreeMap::new(),
            max_at_registry: BTreeMap::new(),
        }
    }

    fn run(
        &mut self,
        horizon: i64,
        duration: impl Fn(&PullKey, u32) -> u64,
        fails: impl Fn(&PullKey, u32) -> bool,
    ) {
        loop {
            // Pulls that ended by now.
            let (ended, still): (Vec<_>, Vec<_>) = self
                .flying
                .drain(..)
                .partition(|(_, end, _)| *end <= self.now);
            self.flying = still;
            for (f, end, failed) in ended {
                let h = self.history.entry(f.key.clone()).or_default();
                if failed {
                    h.consecutive_failures += 1;
                    h.last_failure = Some(end);
                } else {
                    h.consecutive_failures = 0;
                    h.last_success = Some(end);
                }
            }
            let in_flight: Vec<InFlight> = self.flying.iter().map(|(f, _, _)| f.clone()).collect();
            let decision = decide(&Input {
                now: self.now,
                paces: &self.paces,
                targets: &refs(&self.targets),
                in_flight: &in_flight,
                history: &self.history,
                earlier_starts: &BTreeMap::new(),
                pull_timeout: Duration::from_secs(86_400),
                registry_budgets: &self.budgets,
            });
            for key in &decision.start {
                let target = self.targets.iter().find(|x| &x.key == key).unwrap();
                let (policy, registry) = (target.policy.clone(), target.registry.clone());
                let attempt = {
                    let a = self.attempts.entry(key.clone()).or_default();
                    *a += 1;
                    *a
                };
                let end = after(self.now, Duration::from_secs(duration(key, attempt)));
                self.flying.push((
                    InFlight {
                        key: key.clone(),
                        policy: policy.clone(),
                        registry: registry.clone(),
                        started: self.now,
                    },
                    end,
                    fails(key, attempt),
                ));
                self.history.entry(key.clone()).or_default().last_start = Some(self.now);
                self.log
                    .push((key.clone(), policy.clone(), self.now, attempt));
                let n = self
                    .flying
                    .iter()
                    .filter(|(f, _, _)| f.policy == policy)
                    .count() as u32;
                let m = self.max_in_flight.entry(policy).or_default();
                *m = (*m).max(n);
                let n = self
                    .flying
                    .iter()
                    .filter(|(f, _, _)| f.registry == registry)
                    .count() as u32;
                let m = self.max_at_registry.entry(registry).or_default();
                *m = (*m).max(n);
            }
            let next_end = self.flying.iter().map(|(_, end, _)| *end).min();
            let next = match (decision.wake_at, next_end) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(x) => x,
                    None => break,
                },
            };
            assert!(
                next > self.now || !decision.start.is_empty(),
                "no progress at {}",
                secs(self.now)
            );
            if secs(next) > horizon {
                break;
            }
            self.now = next.max(self.now);
        }
    }

    fn starts(&self) -> Vec<(String, i64)> {
        self.log
            .iter()
            .map(|(k, _, s, _)| (format!("{}/{}", k.image, k.node), secs(*s)))
            .collect()
    }
}

fn nodes(image: &str, n: usize, policy: Option<&str>) -> Vec<Target> {
    (0..n)
        .map(|i| target(image, &format!("n{i}"), 0, policy))
        .collect()
}

#[test]
fn pacing_timeline_fast_pulls_are_spaced_by_min_delay() {
    // c=2, d=5s, 6 nodes, each pull 3 s: concurrency never binds, the delay does.
    let mut sim = Sim::new(
        BTreeMap::from([(Some("p".into()), pace(2, 5))]),
        nodes("img", 6, Some("p")),
    );
    sim.run(1000, |_, _| 3, |_, _| false);
    let at: Vec<i64> = sim.starts().iter().map(|(_, s)| *s).collect();
    assert_eq!(at, vec![0, 5, 10, 15, 20, 25]);
}

#[test]
fn pacing_timeline_slow_pulls_are_bound_by_concurrency() {
    // c=2, d=5s, 6 nodes, each pull 12 s: A@0 B@5, then a start whenever one of two slots frees.
    let mut sim = Sim::new(
        BTreeMap::from([(Some("p".into()), pace(2, 5))]),
        nodes("img", 6, Some("p")),
    );
    sim.run(1000, |_, _| 12, |_, _| false);
    let at: Vec<i64> = sim.starts().iter().map(|(_, s)| *s).collect();
    assert_eq!(at, vec![0, 5, 12, 17, 24, 29]);
    assert_eq!(sim.max_in_flight[&Some("p".into())], 2);
}

#[test]
fn pacing_timeline_builtin_pace_is_one_node_ten_seconds_apart_in_name_order() {
    let mut targets = nodes("web", 2, None);
    targets.extend(nodes("api", 2, None));
    let mut sim = Sim::new(BTreeMap::new(), targets);
    sim.run(1000, |_, _| 1, |_, _| false);
    assert_eq!(
        sim.starts(),
        vec![
            ("api/n0".into(), 0),
            ("api/n1".into(), 10),
            ("web/n0".into(), 20),
            ("web/n1".into(), 30)
        ]
    );
}

#[test]
fn pacing_timeline_failures_back_off_exponentially_up_to_max() {
    // Each pull fails after 1 s; retries wait 30, 60, 120, 240, then 300 (the cap), 300.
    let mut sim = Sim::new(BTreeMap::new(), nodes("bad", 1, None));
    sim.run(2000, |_, _| 1, |_, _| true);
    let at: Vec<i64> = sim.starts().iter().map(|(_, s)| *s).collect();
    assert_eq!(at, vec![0, 31, 92, 213, 454, 755, 1056, 1357, 1658, 1959]);
}

#[test]
fn pacing_timeline_recovery_resets_the_backoff() {
    let mut sim = Sim::new(BTreeMap::new(), nodes("flaky", 1, None));
    sim.run(2000, |_, _| 1, |_, attempt| attempt <= 2);
    let at: Vec<i64> = sim.starts().iter().map(|(_, s)| *s).collect();
    assert_eq!(
        at,
        vec![0, 31, 92],
        "two failures, then cached: no more pulls"
    );
    assert_eq!(
        sim.history[&PullKey::new("flaky", "n0")].consecutive_failures,
        0
    );
}

#[test]
fn pacing_timeline_repull_interval_refreshes_cached_nodes() {
    let p = Pace {
        repull_interval: Some(Duration::from_secs(3600)),
        ..pace(1, 0)
    };
    let mut sim = Sim::new(
        BTreeMap::from([(Some("daily".into()), p)]),
        nodes("img", 1, Some("daily")),
    );
    sim.run(8000, |_, _| 10, |_, _| false);
    let at: Vec<i64> = sim.starts().iter().map(|(_, s)| *s).collect();
    assert_eq!(at, vec![0, 3610, 7220]);
}

#[test]
fn pacing_new_nodes_go_before_refreshes_whatever_the_priority() {
    let p = Pace {
        repull_interval: Some(Duration::from_secs(60)),
        ..pace(1, 0)
    };
    let paces = BTreeMap::from([(Some("p".into()), p)]);
    let targets = vec![
        target("a-urgent", "n0", -100, Some("p")),
        target("z-later", "n1", 100, Some("p")),
    ];
    let history = BTreeMap::from([(
        PullKey::new("a-urgent", "n0"),
        History {
            last_start: Some(at(0)),
            last_success: Some(at(1)),
            ..History::default()
        },
    )]);
    let d = decide(&Input {
        now: at(3600),
        paces: &paces,
        targets: &refs(&targets),
        in_flight: &[],
        history: &history,
        earlier_starts: &BTreeMap::new(),
        pull_timeout: Duration::from_secs(600),
        registry_budgets: &NO_BUDGETS,
    });
    assert_eq!(
        d.start,
        vec![PullKey::new("z-later", "n1")],
        "the node lacking an image first"
    );
}

#[test]
fn pacing_several_pulls_start_in_one_decision_when_limits_allow() {
    let paces = BTreeMap::from([(Some("fast".into()), pace(3, 0))]);
    let targets = nodes("img", 5, Some("fast"));
    let d = decide(&Input {
        now: at(0),
        paces: &paces,
        targets: &refs(&targets),
        in_flight: &[],
        history: &BTreeMap::new(),
        earlier_starts: &BTreeMap::new(),
        pull_timeout: Duration::from_secs(600),
        registry_budgets: &NO_BUDGETS,
    });
    assert_eq!(d.start.len(), 3);
    assert_eq!(
        d.wake_at, None,
        "the other two wait for a pull to end, which is an event, not a time"
    );
}

#[test]
fn pacing_policies_are_separate_budgets() {
    let paces = BTreeMap::from([
        (Some("a".into()), pace(1, 60)),
        (Some("b".into()), pace(1, 60)),
    ]);
    let mut targets = nodes("x", 2, Some("a"));
    targets.extend(nodes("y", 2, Some("b")));
    let d = decide(&Input {
        now: at(0),
        paces: &paces,
        targets: &refs(&targets),
        in_flight: &[],
        history: &BTreeMap::new(),
        earlier_starts: &BTreeMap::new(),
        pull_timeout: Duration::from_secs(600),
        registry_budgets: &NO_BUDGETS,
    });
    assert_eq!(
        d.start,
        vec![PullKey::new("x", "n0"), PullKey::new("y", "n0")]
    );
}

#[test]
fn pacing_reports_pulls_past_the_timeout() {
    let targets = nodes("img", 2, None);
    let in_flight = vec![InFlight {
        key: PullKey::new("img", "n0"),
        policy: None,
        registry: REGISTRY.into(),
        started: at(0),
    }];
    let paces = BTreeMap::new();
    let history = BTreeMap::new();
    let earlier_starts = BTreeMap::new();
    let target_refs = refs(&targets);
    let input = |now| Input {
        now,
        paces: &paces,
        targets: &target_refs,
        in_flight: &in_flight,
        history: &history,
        earlier_starts: &earlier_starts,
        pull_timeout: Duration::from_secs(600),
        registry_budgets: &NO_BUDGETS,
    };
    let before = decide(&input(at(599)));
    assert!(before.timed_out.is_empty());
    assert_eq!(before.wake_at, Some(at(600)));
    assert!(
        before.start.is_empty(),
        "the built-in pace allows one pull at a time"
    );
    assert_eq!(
        decide(&input(at(600))).timed_out,
        vec![PullKey::new("img", "n0")]
    );
}

#[test]
fn pacing_in_flight_pulls_are_rebuilt_from_pods() {
    use crate::api::{CachedImage, CachedImageSpec, PolicyReference};
    let mut ci = CachedImage::new(
        "web",
        CachedImageSpec {
            image: "nginx".into(),
            policy_ref: Some(PolicyReference {
                name: "slow".into(),
            }),
            ..CachedImageSpec::default()
        },
    );
    ci.metadata.uid = Some("u".into());
    let mut pod = podbuilder::build(&podbuilder::PullPod {
        image: &ci,
        node: "node-7",
        namespace: "drop-system",
        policy: None,
        attempt: 2,
        tolerations: &[],
    })
    .unwrap();
    assert_eq!(
        InFlight::from_pod(&pod),
        None,
        "no creation time yet: not from the API server"
    );
    pod.metadata.creation_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(42)));
    assert_eq!(
        InFlight::from_pod(&pod),
        Some(InFlight {
            key: PullKey::new("web", "node-7"),
            policy: Some("slow".into()),
            registry: "docker.io".into(),
            started: at(42),
        })
    );
    assert_eq!(InFlight::from_pod(&Pod::default()), None);
}

#[test]
fn pacing_pace_from_spec_fills_defaults() {
    let p = Pace::from_spec(&PullPolicySpec::default());
    assert_eq!(p.max_concurrent, 1);
    assert_eq!(p.min_delay, Duration::from_secs(10));
    assert_eq!(
        (p.backoff_initial, p.backoff_max),
        (Duration::from_secs(30), Duration::from_secs(300))
    );
    assert_eq!(p.repull_interval, None);
    let zero = PullPolicySpec {
        repull_interval: Some(Duration::ZERO.into()),
        ..PullPolicySpec::default()
    };
    assert_eq!(
        Pace::from_spec(&zero).repull_interval,
        None,
        "0 means never"
    );
}

fn arb_world() -> impl Strategy<Value = (BTreeMap<PolicyKey, Pace>, Vec<Target>, u64, u64)> {
    let policies = prop::collection::vec((1u32..4, 0u64..20, 1u64..60, 60u64..400), 1..4);
    (
        policies,
        prop::collection::vec((0usize..5, 0usize..6, -3i32..3, 0usize..4), 1..25),
        1u64..40,
        0u64..1000,
    )
        .prop_map(|(pol, ts, dur, seed)| {
            let mut paces = BTreeMap::new();
            for (i, (c, d, init, max)) in pol.iter().enumerate() {
                paces.insert(
                    Some(format!("p{i}").into()),
                    Pace {
                        max_concurrent: *c,
                        min_delay: Duration::from_secs(*d),
                        backoff_initial: Duration::from_secs(*init),
                        backoff_max: Duration::from_secs(*max),
                        repull_interval: None,
                    },
                );
            }
            let n = pol.len();
            let mut targets: Vec<Target> = ts
                .into_iter()
                .map(|(img, node, prio, p)| Target {
                    key: PullKey::new(&format!("img{img}"), &format!("n{node}")),
                    priority: prio,
                    policy: if p >= n {
                        None
                    } else {
                        Some(format!("p{p}").into())
                    },
                    registry: format!("reg{}", img % 2).into(),
                })
                .collect();
            // One policy and priority per image, as the controller derives them from the spec.
            targets.sort_by(|a, b| a.key.cmp(&b.key));
            targets.dedup_by(|a, b| a.key == b.key);
            let first: BTreeMap<std::sync::Arc<str>, (i32, PolicyKey)> = targets
                .iter()
                .rev()
                .map(|t| (t.key.image.clone(), (t.priority, t.policy.clone())))
                .collect();
            for t in &mut targets {
                (t.priority, t.policy) = first[&t.key.image].clone();
            }
            (paces, targets, dur, seed)
        })
}

fn hashy(k: &PullKey, attempt: u32, seed: u64) -> u64 {
    k.image
        .bytes()
        .chain(k.node.bytes())
        .fold(seed ^ (u64::from(attempt) * 7919), |h, b| {
            h.wrapping_mul(31).wrapping_add(u64::from(b))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn pacing_invariants_hold_over_random_runs((paces, targets, dur, seed) in arb_world()) {
        let mut sim = Sim::new(paces.clone(), targets.clone());
        sim.run(5000, |k, a| 1 + hashy(k, a, seed) % (dur * 2), |k, a| hashy(k, a, seed).is_multiple_of(3));
        let builtin = Pace::builtin();
        let pace_of = |p: &PolicyKey| paces.get(p).cloned().unwrap_or(builtin.clone());
        // Progress: every target was started within the horizon (nobody starves).
        for t in &targets {
            prop_assert!(sim.log.iter().any(|(k, _, _, _)| k == &t.key), "{:?} never started", t.key);
        }
        // Never more than c in flight per policy.
        for (p, m) in &sim.max_in_flight {
            prop_assert!(*m <= pace_of(p).max_concurrent, "{:?}: {} in flight", p, m);
        }
        // Never two starts within d under one policy.
        let mut by_policy: BTreeMap<PolicyKey, Vec<Timestamp>> = BTreeMap::new();
        for (_, p, s, _) in &sim.log {
            by_policy.entry(p.clone()).or_default().push(*s);
        }
        for (p, starts) in &by_policy {
            let d = pace_of(p).min_delay;
            for w in starts.windows(2) {
                prop_assert!(w[1].duration_since(w[0]) >= SignedDuration::try_from(d).unwrap(),
                    "{:?}: starts {} and {} closer than {:?}", p, secs(w[0]), secs(w[1]), d);
            }
        }
        // Retries wait the backoff: at least `initial`, at most `max` after a failure, unless the
        // policy's limits hold them back further.
        for (k, p, s, a) in &sim.log {
            if *a > 1 {
                let prev = sim.log.iter().rfind(|(k2, _, s2, a2)| k2 == k && *a2 == a - 1 && s2 < s);
                let pc = pace_of(p);
                prop_assert!(pc.retry_delay(*a - 1) >= pc.backoff_initial.min(pc.backoff_max));
                prop_assert!(pc.retry_delay(*a - 1) <= pc.backoff_max);
                if let Some((_, _, ps, _)) = prev {
                    let gap = s.duration_since(*ps);
                    prop_assert!(gap >= SignedDuration::try_from(pc.backoff_initial.min(pc.backoff_max)).unwrap(),
                        "{:?} retried {:?} after the previous start", k, gap);
                }
            }
        }
    }

    #[test]
    fn pacing_priority_then_name_order_is_respected((_, targets, _, _) in arb_world()) {
        // One shared budget, one pull at a time, instant pulls: the start order is the target order.
        let targets: Vec<Target> = targets.into_iter().map(|t| Target { policy: None, ..t }).collect();
        let paces = BTreeMap::from([(None, pace(1, 0))]);
        let mut sim = Sim::new(paces, targets.clone());
        sim.run(100_000, |_, _| 1, |_, _| false);
        let mut want: Vec<&Target> = targets.iter().collect();
        want.sort_by(|a, b| (a.priority, &a.key).cmp(&(b.priority, &b.key)));
        let got: Vec<&PullKey> = sim.log.iter().map(|(k, _, _, _)| k).collect();
        prop_assert_eq!(got, want.iter().map(|t| &t.key).collect::<Vec<_>>());
    }

    #[test]
    fn pacing_same_input_gives_the_same_decision((paces, targets, _, seed) in arb_world(), now in 0i64..1000) {
        let history: BTreeMap<PullKey, History> = targets.iter().filter(|t| hashy(&t.key, 0, seed).is_multiple_of(2))
            .map(|t| (t.key.clone(), History {
                last_start: Some(at(0)),
                last_failure: Some(at(1)),
                consecutive_failures: (hashy(&t.key, 1, seed) % 4) as u32,
                last_success: None,
            })).collect();
        let in_flight: Vec<InFlight> = targets.iter().filter(|t| hashy(&t.key, 2, seed).is_multiple_of(5))
            .map(|t| InFlight { key: t.key.clone(), policy: t.policy.clone(), registry: t.registry.clone(), started: at(0) }).collect();
        let input = Input { now: at(now), paces: &paces, targets: &refs(&targets), in_flight: &in_flight,
            history: &history,
        earlier_starts: &BTreeMap::new(), pull_timeout: Duration::from_secs(600), registry_budgets: &NO_BUDGETS };
        let a = decide(&input);
        prop_assert_eq!(&a, &decide(&input));
        let mut shuffled = targets.clone();
        shuffled.reverse();
        let mut flying = in_flight.clone();
        flying.reverse();
        let b = decide(&Input { targets: &refs(&shuffled), in_flight: &flying, ..input });
        prop_assert_eq!(a, b, "the order of the inputs does not matter");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The contract a caller relies on to skip images: leaving out targets whose policy is saturated,
    /// and targets that are in flight or not due yet (reporting their starts), changes no start and no
    /// timeout.
    #[test]
    fn pacing_leaving_out_targets_not_due_changes_no_start(
        (paces, targets, _, seed) in arb_world(),
        now in 0i64..2000,
    ) {
        let (history, in_flight) = past(&targets, seed, 4, 6, now);
        let builtin = Pace::builtin();
        let none = BTreeMap::new();
        let whole = Input { now: at(now), paces: &paces, targets: &refs(&targets), earlier_starts: &none,
            in_flight: &in_flight, history: &history, pull_timeout: Duration::from_secs(600), registry_budgets: &NO_BUDGETS };

        let mut kept = Vec::new();
        let mut earlier: BTreeMap<PolicyKey, Timestamp> = BTreeMap::new();
        let free = FreeSlots::new(&paces, &in_flight);
        for t in &targets {
            if free.of(&t.policy) == 0 && hashy(&t.key, 6, seed).is_multiple_of(2) {
                continue;
            }
            let h = history.get(&t.key).cloned().unwrap_or_default();
            let flying = in_flight.iter().any(|f| f.key == t.key);
            let pace = paces.get(&t.policy).unwrap_or(&builtin);
            let settled = flying || next_due(&h, pace, at(now)).is_none_or(|d| d > at(now));
            if settled && hashy(&t.key, 4, seed).is_multiple_of(2) {
                if let Some(s) = h.last_start {
                    let e = earlier.entry(t.policy.clone()).or_insert(s);
                    *e = (*e).max(s);
                }
            } else {
                kept.push(t.clone());
            }
        }
        let a = decide(&whole);
        let b = decide(&Input { targets: &refs(&kept), earlier_starts: &earlier, ..whole.clone() });
        prop_assert_eq!(a.start, b.start);
        prop_assert_eq!(a.timed_out, b.timed_out);
        // Only the left-out targets' own due times can be missing from the wake-up.
        if let (Some(wa), Some(wb)) = (a.wake_at, b.wake_at) {
            prop_assert!(wa <= wb);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// The contract of [`leaders`]: handing the engine only the leaders of some images (their
    /// targets sharing one pace), as many as their policy has free slots, and their latest starts,
    /// instead of all their targets, changes no start, no timeout and no next in line.
    #[test]
    fn pacing_only_the_leaders_of_an_image_change_no_start(
        (paces, targets, _, seed) in arb_world(),
        now in 0i64..2000,
    ) {
        let (history, in_flight) = past(&targets, seed, 3, 7, now);
        let builtin = Pace::builtin();
        let none = BTreeMap::new();
        let whole = Input { now: at(now), paces: &paces, targets: &refs(&targets), earlier_starts: &none,
            in_flight: &in_flight, history: &history, pull_timeout: Duration::from_secs(600), registry_budgets: &NO_BUDGETS };

        // An "image" of the pacer: targets of one image under one policy.
        let mut groups: BTreeMap<(&str, &PolicyKey), Vec<Target>> = BTreeMap::new();
        for t in &targets {
            groups.entry((&*t.key.image, &t.policy)).or_default().push(t.clone());
        }
        let mut kept: Vec<Target> = Vec::new();
        let mut earlier: BTreeMap<PolicyKey, Timestamp> = BTreeMap::new();
        let free = FreeSlots::new(&paces, &in_flight);
        for ((image, policy), group) in &groups {
            let pace = paces.get(*policy).unwrap_or(&builtin);
            let lead = leaders(group, &history, |k| in_flight.iter().any(|f| &f.key == k), pace, at(now));
            let use_leaders = hashy(&PullKey::new(image, ""), 4, seed).is_multiple_of(2);
            if use_leaders {
                kept.extend(lead.first.iter().take(free.of(policy)).map(|&i| group[i].clone()));
                if let Some(s) = lead.last_start {
                    let e = earlier.entry((*policy).clone()).or_insert(s);
                    *e = (*e).max(s);
                }
            } else {
                kept.extend(group.iter().cloned());
            }
        }
        let a = decide(&whole);
        let b = decide(&Input { targets: &refs(&kept), earlier_starts: &earlier, ..whole.clone() });
        prop_assert_eq!(a.start, b.start);
        prop_assert_eq!(a.timed_out, b.timed_out);
        prop_assert_eq!(a.next_in_line, b.next_in_line);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// The contract the pacer wakes images by: when a policy's delay ends, the target a decision then
    /// starts first under it is the one `next_in_line` named (unless another of its targets fell due
    /// in between, whose image wakes for that itself).
    #[test]
    fn pacing_next_in_line_is_what_starts_when_the_delay_ends(
        (paces, targets, _, seed) in arb_world(),
        now in 0i64..2000,
    ) {
        let (mut history, mut in_flight) = past(&targets, seed, 3, 7, now);
        let builtin = Pace::builtin();
        let none = BTreeMap::new();
        let first = decide(&Input { now: at(now), paces: &paces, targets: &refs(&targets),
            earlier_starts: &none, in_flight: &in_flight, history: &history,
            pull_timeout: Duration::from_secs(600), registry_budgets: &NO_BUDGETS });
        for k in &first.start {
            let t = targets.iter().find(|t| &t.key == k).unwrap();
            in_flight.push(InFlight { key: k.clone(), policy: t.policy.clone(), registry: t.registry.clone(), started: at(now) });
            history.entry(k.clone()).or_default().last_start = Some(at(now));
        }
        let policy_of = |k: &PullKey| &targets.iter().find(|t| &t.key == k).unwrap().policy;
        let mut policies = BTreeSet::new();
        for (key, when) in &first.next_in_line {
            let policy = policy_of(key);
            prop_assert!(policies.insert(policy), "one target per policy");
            prop_assert!(*when > at(now));
            let pace = paces.get(policy).unwrap_or(&builtin);
            let fell_due = targets.iter().any(|t| {
                &t.policy == policy
                    && !in_flight.iter().any(|f| f.key == t.key)
                    && next_due(history.get(&t.key).unwrap_or(&History::default()), pace, at(now))
                        .is_some_and(|d| d > at(now) && d <= *when)
            });
            if fell_due {
                continue;
            }
            let then = decide(&Input { now: *when, paces: &paces, targets: &refs(&targets),
                earlier_starts: &none, in_flight: &in_flight, history: &history,
                pull_timeout: Duration::from_secs(600), registry_budgets: &NO_BUDGETS });
            let started = then.start.iter().find(|k| policy_of(k) == policy);
            prop_assert_eq!(started, Some(key));
        }
    }
}

/// A past for a test world: every `never`-th target never pulled, the others started, some failed;
/// every `flying`-th target in flight since `now / 2`.
fn past(
    targets: &[Target],
    seed: u64,
    never: u64,
    flying: u64,
    now: i64,
) -> (BTreeMap<PullKey, History>, Vec<InFlight>) {
    let history = targets
        .iter()
        .filter(|t| !hashy(&t.key, 0, seed).is_multiple_of(never))
        .map(|t| {
            let start = at((hashy(&t.key, 1, seed) % 1500) as i64);
            let failures = (hashy(&t.key, 2, seed) % 3) as u32;
            let end = Some(pacing_end(start, &t.key, seed));
            let history = History {
                last_start: Some(start),
                last_success: if failures == 0 { end } else { None },
                last_failure: if failures > 0 { end } else { None },
                consecutive_failures: failures,
            };
            (t.key.clone(), history)
        })
        .collect();
    let in_flight = targets
        .iter()
        .filter(|t| hashy(&t.key, 3, seed).is_multiple_of(flying))
        .map(|t| InFlight {
            key: t.key.clone(),
            policy: t.policy.clone(),
            registry: t.registry.clone(),
            started: at(now / 2),
        })
        .collect();
    (history, in_flight)
}

/// When a pull started at `start` ended, in a test world.
fn pacing_end(start: Timestamp, k: &PullKey, seed: u64) -> Timestamp {
    after(start, Duration::from_secs(hashy(k, 5, seed) % 120))
}

/// The targets as the engine takes them.
fn refs(targets: &[Target]) -> Vec<&Target> {
    targets.iter().collect()
}

#[test]
fn registry_budget_holds_across_policies_and_reports_what_waits() {
    // Two policies with room for 3 each, both pulling from one registry with a budget of 2.
    let paces = BTreeMap::from([
        (Some("a".into()), pace(3, 0)),
        (Some("b".into()), pace(3, 0)),
    ]);
    let mut targets = nodes("x", 3, Some("a"));
    targets.extend(nodes("y", 3, Some("b")));
    let mut other = target("z", "n0", 0, Some("b"));
    other.registry = "elsewhere.example.com".into();
    targets.push(other);
    let budgets = BTreeMap::from([(Registry::from(REGISTRY), 2)]);
    let d = decide(&Input {
        now: at(0),
        paces: &paces,
        targets: &refs(&targets),
        in_flight: &[],
        history: &BTreeMap::new(),
        earlier_starts: &BTreeMap::new(),
        pull_timeout: Duration::from_secs(600),
        registry_budgets: &budgets,
    });
    let started: Vec<String> = d
        .start
        .iter()
        .map(|k| format!("{}/{}", k.image, k.node))
        .collect();
    assert_eq!(
        started,
        ["x/n0", "x/n1", "z/n0"],
        "two from the registry, and the other registry's"
    );
    let held: Vec<String> = d
        .registry_held
        .iter()
        .map(|(k, r)| format!("{}/{}@{r}", k.image, k.node))
        .collect();
    assert_eq!(
        held,
        [
            "x/n2@registry.example.com",
            "y/n0@registry.example.com",
            "y/n1@registry.example.com",
            "y/n2@registry.example.com"
        ]
    );
    // A pull ending frees a slot for the next in the engine's order, whichever its policy.
    let flying = vec![InFlight {
        key: PullKey::new("x", "n0"),
        policy: Some("a".into()),
        registry: REGISTRY.into(),
        started: at(0),
    }];
    let d = decide(&Input {
        now: at(1),
        paces: &paces,
        targets: &refs(&targets[2..6]),
        in_flight: &flying,
        history: &BTreeMap::new(),
        earlier_starts: &BTreeMap::new(),
        pull_timeout: Duration::from_secs(600),
        registry_budgets: &budgets,
    });
    assert_eq!(d.start, [PullKey::new("x", "n2")]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// With a budget per registry on top of the policies: no registry ever has more pulls in flight
    /// than its budget, the policies' own limits still hold, and every target is started (no
    /// starvation, whatever the policies and priorities competing for the registry).
    #[test]
    fn registry_budget_is_never_exceeded_and_starves_nobody(
        (paces, targets, dur, seed) in arb_world(),
        b0 in 1u32..3,
        b1 in 1u32..4,
    ) {
        let mut sim = Sim::new(paces.clone(), targets.clone());
        sim.budgets = BTreeMap::from([(Registry::from("reg0"), b0), (Registry::from("reg1"), b1)]);
        sim.run(20_000, |k, a| 1 + hashy(k, a, seed) % (dur * 2), |k, a| hashy(k, a, seed).is_multiple_of(4));
        for (r, m) in &sim.max_at_registry {
            prop_assert!(*m <= sim.budgets[r], "{}: {} in flight, budget {}", r, m, sim.budgets[r]);
        }
        let builtin = Pace::builtin();
        for (p, m) in &sim.max_in_flight {
            prop_assert!(*m <= paces.get(p).unwrap_or(&builtin).max_concurrent);
        }
        for t in &targets {
            prop_assert!(sim.log.iter().any(|(k, _, _, _)| k == &t.key), "{:?} never started", t.key);
        }
    }
}
