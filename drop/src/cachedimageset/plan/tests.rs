use super::*;
use crate::api::{
    CachedImageSetSpec, CachedImageStatus, DiscoveredImage, DiscoveryPolicySpec,
    DiscoveryPolicyStatus, ImageEntry, PolicyReference,
};

fn set(images: &[(&str, &str)]) -> CachedImageSet {
    let mut s = CachedImageSet::new(
        "ci-tools",
        CachedImageSetSpec {
            policy_ref: Some(PolicyReference {
                name: "slow".into(),
            }),
            node_selector: BTreeMap::from([("pool".into(), "ci".into())]),
            images: images
                .iter()
                .map(|(i, t)| ImageEntry {
                    image: i.to_string(),
                    tag: Some(t.to_string()),
                    digest: None,
                })
                .collect(),
            ..CachedImageSetSpec::default()
        },
    );
    s.metadata.labels = Some(BTreeMap::from([("team".into(), "ci".into())]));
    s
}

fn discovered(images: &[&str]) -> DiscoveryPolicy {
    let mut p = DiscoveryPolicy::new("popular", DiscoveryPolicySpec::default());
    p.status = Some(DiscoveryPolicyStatus {
        discovered_images: images
            .iter()
            .map(|i| DiscoveredImage {
                image: i.to_string(),
                score: 1,
                source: "test".into(),
            })
            .collect(),
        ..DiscoveryPolicyStatus::default()
    });
    p
}

#[test]
fn imageset_static_and_discovered_images_merge_without_duplicates() {
    let s = set(&[
        ("docker.io/library/alpine", "3.19"),
        ("docker.io/library/busybox", "1.36"),
    ]);
    let p = discovered(&[
        "alpine:3.19",
        "registry.local:5000/team/app:v2",
        "ghcr.io/org/tool@sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4",
    ]);
    let (w, invalid) = wanted(&s, Some(&p));
    assert!(invalid.is_empty());
    let refs: Vec<String> = w.iter().map(Wanted::reference).collect();
    assert_eq!(refs.len(), 4, "{refs:?}");
    assert!(refs.contains(&"registry.local:5000/team/app:v2".to_owned()));
    assert!(
        refs.iter()
            .any(|r| r.starts_with("ghcr.io/org/tool@sha256:"))
    );
}

#[test]
fn imageset_unparsable_discovered_references_are_reported() {
    let (w, invalid) = wanted(
        &set(&[]),
        Some(&discovered(&["UPPER/Case:tag", "ok/image:1"])),
    );
    assert_eq!(w.len(), 1);
    assert_eq!(invalid.len(), 1);
    assert!(invalid[0].contains("UPPER/Case:tag"));
}

#[test]
fn imageset_child_names_are_readable_stable_and_valid() {
    let w = Wanted::parse(
        "registry.example.com:5000/team/some-really-long-application-name:v1.2.3-rc.1",
    )
    .unwrap();
    let name = child_name("my-ci-toolchain-set-with-a-long-name", &w);
    assert!(name.len() <= 63, "{name}");
    assert!(name.starts_with("my-ci-toolchain-set-with"), "{name}");
    assert!(name.contains("some-really-long"), "{name}");
    assert_eq!(
        name,
        child_name("my-ci-toolchain-set-with-a-long-name", &w),
        "stable"
    );
    assert!(
        name.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    );
    let other = Wanted::parse(
        "registry.example.com:5000/team/some-really-long-application-name:v1.2.3-rc.2",
    )
    .unwrap();
    assert_ne!(
        name,
        child_name("my-ci-toolchain-set-with-a-long-name", &other),
        "the hash tells them apart"
    );
    assert_eq!(
        child_name(
            "dev-set",
            &Wanted::parse("docker.io/library/alpine:3.19").unwrap()
        )
        .split('-')
        .take(4)
        .collect::<Vec<_>>(),
        ["dev", "set", "alpine", "3"]
    );
}

#[test]
fn imageset_child_names_of_sets_sharing_a_long_prefix_differ() {
    let w = Wanted::parse("docker.io/library/alpine:3.19").unwrap();
    let a = child_name("platform-team-build-tools-nightly-a", &w);
    let b = child_name("platform-team-build-tools-nightly-b", &w);
    assert_ne!(a, b, "two sets must not claim the same child");
    assert!(a.len() <= 63 && b.len() <= 63);
}

#[test]
fn imageset_children_carry_the_set_settings_and_labels() {
    let s = set(&[("docker.io/library/alpine", "3.19")]);
    let (w, _) = wanted(&s, None);
    let c = child(&s, &w[0]);
    assert_eq!(c.spec.policy_ref, s.spec.policy_ref);
    assert_eq!(c.spec.node_selector, s.spec.node_selector);
    assert_eq!(c.spec.tag.as_deref(), Some("3.19"));
    let labels = c.metadata.labels.unwrap();
    assert_eq!(labels[IMAGESET_LABEL], "ci-tools");
    assert_eq!(labels["team"], "ci");
}

fn child_in(phase: CachedImagePhase) -> CachedImage {
    let mut c = CachedImage::new("c", CachedImageSpec::default());
    c.status = Some(CachedImageStatus {
        phase: Some(phase),
        ..CachedImageStatus::default()
    });
    c
}

#[test]
fn imageset_status_rolls_up_children() {
    let now = Timestamp::from_second(1_900_000_000).unwrap();
    let (a, b, f) = (
        child_in(CachedImagePhase::Ready),
        child_in(CachedImagePhase::Pulling),
        child_in(CachedImagePhase::Degraded),
    );
    let ready = status(None, &[&a, &a], None, &[], now);
    assert_eq!(ready.phase, Some(CachedImageSetPhase::Ready));
    let c = conditions::get(&ready.conditions, "Ready").unwrap();
    assert_eq!(
        (c.reason.as_str(), c.message.as_str()),
        ("Ready", "All 2 images are cached")
    );
    let progressing = status(None, &[&a, &b], None, &[], now);
    let c = conditions::get(&progressing.conditions, "Ready").unwrap();
    assert_eq!(
        (c.reason.as_str(), c.message.as_str()),
        ("Progressing", "1/2 images cached")
    );
    let degraded = status(None, &[&a, &f, &b], None, &[], now);
    let c = conditions::get(&degraded.conditions, "Ready").unwrap();
    assert_eq!(
        (c.reason.as_str(), c.message.as_str()),
        ("Degraded", "1/3 images cached, failing: 1")
    );
    assert_eq!((degraded.images_managed, degraded.images_ready), (3, 1));
    let missing = status(
        None,
        &[&a],
        Some(&DiscoveryTrouble::NotFound("popular".into())),
        &[],
        now,
    );
    assert_eq!(
        conditions::get(&missing.conditions, "Ready")
            .unwrap()
            .reason,
        "DiscoveryPolicyNotFound"
    );
    assert_eq!(missing.phase, Some(CachedImageSetPhase::Degraded));
}
