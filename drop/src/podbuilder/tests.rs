use super::*;
use crate::api::{CachedImageSpec, ImagePullPolicy, PolicyReference};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateWaiting, ContainerStatus, LocalObjectReference, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use proptest::prelude::*;

const DIGEST: &str = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";

fn image(name: &str, spec: CachedImageSpec) -> CachedImage {
    let mut ci = CachedImage::new(name, spec);
    ci.metadata.uid = Some("uid-1".into());
    ci
}

fn nginx() -> CachedImageSpec {
    CachedImageSpec {
        image: "docker.io/library/nginx".into(),
        tag: Some("1.25-alpine".into()),
        ..CachedImageSpec::default()
    }
}

fn pod_for(ci: &CachedImage, policy: Option<&PullPolicySpec>) -> Pod {
    build(&PullPod {
        image: ci,
        node: "node-a",
        namespace: "drop-system",
        policy,
        attempt: 1,
        tolerations: &[],
    })
    .unwrap()
}

fn container(p: &Pod) -> &Container {
    &p.spec.as_ref().unwrap().containers[0]
}

#[test]
fn podbuilder_tag_reference_and_pinning() {
    let p = pod_for(&image("web", nginx()), None);
    let spec = p.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("node-a"));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(
        container(&p).image.as_deref(),
        Some("docker.io/library/nginx:1.25-alpine")
    );
    assert_eq!(container(&p).name, CONTAINER);
    assert_eq!(p.metadata.namespace.as_deref(), Some("drop-system"));
    assert!(
        spec.affinity.is_none() && spec.node_selector.is_none(),
        "pinned by nodeName only"
    );
}

#[test]
fn podbuilder_digest_reference_and_default_tag() {
    let mut s = nginx();
    s.tag = None;
    s.digest = Some(DIGEST.into());
    assert_eq!(
        container(&pod_for(&image("web", s.clone()), None))
            .image
            .as_deref(),
        Some(format!("docker.io/library/nginx@{DIGEST}").as_str())
    );
    s.digest = None;
    assert_eq!(
        container(&pod_for(&image("web", s), None)).image.as_deref(),
        Some("docker.io/library/nginx:latest")
    );
}

#[test]
fn podbuilder_pull_policy_passes_through() {
    for pp in [
        ImagePullPolicy::Always,
        ImagePullPolicy::IfNotPresent,
        ImagePullPolicy::Never,
    ] {
        let mut s = nginx();
        s.image_pull_policy = pp;
        assert_eq!(
            container(&pod_for(&image("web", s), None))
                .image_pull_policy
                .as_deref(),
            Some(pp.as_str())
        );
    }
}

#[test]
fn podbuilder_pull_secrets_are_copied() {
    let mut s = nginx();
    s.image_pull_secrets = vec![LocalObjectReference {
        name: "ghcr-creds".into(),
    }];
    let p = pod_for(&image("web", s), None);
    assert_eq!(
        p.spec.unwrap().image_pull_secrets.unwrap(),
        vec![LocalObjectReference {
            name: "ghcr-creds".into()
        }]
    );
}

#[test]
fn podbuilder_tolerations_merge_image_and_policy_without_duplicates() {
    let t = |k: &str| Toleration {
        key: Some(k.into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Toleration::default()
    };
    let mut s = nginx();
    s.tolerations = vec![t("build"), t("shared")];
    let policy = PullPolicySpec {
        tolerations: vec![t("shared"), t("ci")],
        ..PullPolicySpec::default()
    };
    let ci = image("web", s);
    let p = pod_for(&ci, Some(&policy));
    assert_eq!(
        p.spec.unwrap().tolerations.unwrap(),
        vec![t("build"), t("shared"), t("ci")]
    );
    // The operator's own (the warm-up taint's) come last.
    let p = build(&PullPod {
        image: &ci,
        node: "node-a",
        namespace: "drop-system",
        policy: Some(&policy),
        attempt: 1,
        tolerations: &[t("warming"), t("ci")],
    })
    .unwrap();
    assert_eq!(
        p.spec.unwrap().tolerations.unwrap(),
        vec![t("build"), t("shared"), t("ci"), t("warming")]
    );
}

#[test]
fn podbuilder_owner_reference_is_the_controlling_cachedimage() {
    let p = pod_for(&image("web", nginx()), None);
    let owners = p.metadata.owner_references.unwrap();
    assert_eq!(owners.len(), 1);
    assert_eq!(owners[0].kind, "CachedImage");
    assert_eq!(owners[0].api_version, "drop.corewire.io/v1alpha1");
    assert_eq!(owners[0].name, "web");
    assert_eq!(owners[0].uid, "uid-1");
    assert_eq!(owners[0].controller, Some(true));
}

#[test]
fn podbuilder_labels_and_annotations_name_image_node_and_policy() {
    let mut s = nginx();
    s.policy_ref = Some(PolicyReference {
        name: "slow".into(),
    });
    let p = pod_for(&image("web", s), None);
    let labels = p.metadata.labels.unwrap();
    assert_eq!(labels[IMAGE_LABEL], "web");
    assert_eq!(labels[NODE_LABEL], "node-a");
    assert_eq!(labels[MANAGED_BY.0], MANAGED_BY.1);
    let ann = p.metadata.annotations.unwrap();
    assert_eq!(ann[POLICY_ANNOTATION], "slow");
    assert_eq!(ann[ATTEMPT_ANNOTATION], "1");
    assert_eq!(
        ann[REFERENCE_ANNOTATION],
        "docker.io/library/nginx:1.25-alpine"
    );
}

#[test]
fn podbuilder_long_names_are_hashed_into_valid_labels() {
    let long_image = format!("{}-x", "a".repeat(240));
    let long_node = format!("ip-10-0-0-1.{}.internal", "b".repeat(80));
    let ci = image(&long_image, nginx());
    let p = build(&PullPod {
        image: &ci,
        node: &long_node,
        namespace: "drop-system",
        policy: None,
        attempt: 3,
        tolerations: &[],
    })
    .unwrap();
    let labels = p.metadata.labels.clone().unwrap();
    for key in [IMAGE_LABEL, NODE_LABEL] {
        assert!(is_label_value(&labels[key]), "{key}={}", labels[key]);
    }
    assert_ne!(
        labels[IMAGE_LABEL],
        label_value(&format!("{}-y", "a".repeat(240))),
        "hash tells them apart"
    );
    let ann = p.metadata.annotations.unwrap();
    assert_eq!(
        ann[IMAGE_ANNOTATION], long_image,
        "the full name stays available"
    );
    assert_eq!(ann[NODE_ANNOTATION], long_node);
}

#[test]
fn podbuilder_name_is_deterministic_and_changes_with_reference_and_attempt() {
    let a = pod_name("web", "node-a", "nginx:1", 1);
    assert_eq!(a, pod_name("web", "node-a", "nginx:1", 1));
    assert_ne!(a, pod_name("web", "node-a", "nginx:2", 1));
    assert_ne!(a, pod_name("web", "node-a", "nginx:1", 2));
    assert_ne!(a, pod_name("web", "node-b", "nginx:1", 1));
    assert!(a.starts_with("web-node-a-"), "{a}");
}

#[test]
fn podbuilder_needs_an_object_from_the_api_server() {
    let ci = CachedImage::new("web", nginx());
    let err = build(&PullPod {
        image: &ci,
        node: "n",
        namespace: "ns",
        policy: None,
        attempt: 1,
        tolerations: &[],
    })
    .unwrap_err();
    assert_eq!(err, BuildError::Missing("uid"));
}

fn is_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && v.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
        && v.chars().last().is_none_or(|c| c.is_ascii_alphanumeric())
}

fn is_dns_subdomain_63(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && v.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && v.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// Every rule of the Pod Security "restricted" profile (v1.37) that a Pod spec can break.
fn restricted_violations(p: &Pod) -> Vec<String> {
    let mut v = Vec::new();
    let spec = p.spec.as_ref().unwrap();
    let psc = spec.security_context.clone().unwrap_or_default();
    if spec.host_network == Some(true) || spec.host_pid == Some(true) || spec.host_ipc == Some(true)
    {
        v.push("host namespaces".to_owned());
    }
    if spec
        .volumes
        .as_ref()
        .is_some_and(|vs| vs.iter().any(|vol| vol.host_path.is_some()))
    {
        v.push("hostPath volume".to_owned());
    }
    if psc.sysctls.as_ref().is_some_and(|s| !s.is_empty()) {
        v.push("sysctls".to_owned());
    }
    let pod_seccomp = psc.seccomp_profile.as_ref().map(|s| s.type_.clone());
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let sc = c.security_context.clone().unwrap_or_default();
        if sc.privileged == Some(true) {
            v.push(format!("{}: privileged", c.name));
        }
        if sc.allow_privilege_escalation != Some(false) {
            v.push(format!(
                "{}: allowPrivilegeEscalation must be false",
                c.name
            ));
        }
        let caps = sc.capabilities.clone().unwrap_or_default();
        if !caps.drop.unwrap_or_default().iter().any(|d| d == "ALL") {
            v.push(format!("{}: must drop ALL capabilities", c.name));
        }
        if caps
            .add
            .unwrap_or_default()
            .iter()
            .any(|a| a != "NET_BIND_SERVICE")
        {
            v.push(format!("{}: adds capabilities", c.name));
        }
        if sc.run_as_non_root.or(psc.run_as_non_root) != Some(true) {
            v.push(format!("{}: runAsNonRoot", c.name));
        }
        if sc.run_as_user.or(psc.run_as_user) == Some(0) {
            v.push(format!("{}: runAsUser 0", c.name));
        }
        let seccomp = sc
            .seccomp_profile
            .as_ref()
            .map(|s| s.type_.clone())
            .or(pod_seccomp.clone());
        if !matches!(seccomp.as_deref(), Some("RuntimeDefault" | "Localhost")) {
            v.push(format!("{}: seccompProfile", c.name));
        }
        if c.ports
            .as_ref()
            .is_some_and(|ps| ps.iter().any(|port| port.host_port.is_some()))
        {
            v.push(format!("{}: hostPort", c.name));
        }
        if sc.proc_mount.as_deref().is_some_and(|m| m != "Default") {
            v.push(format!("{}: procMount", c.name));
        }
    }
    v
}

#[test]
fn podbuilder_pod_meets_the_restricted_profile() {
    let mut s = nginx();
    s.image_pull_secrets = vec![LocalObjectReference {
        name: "creds".into(),
    }];
    let p = pod_for(&image("web", s), None);
    assert_eq!(restricted_violations(&p), Vec::<String>::new());
    let spec = p.spec.unwrap();
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.enable_service_links, Some(false));
    assert_eq!(spec.termination_grace_period_seconds, Some(0));
    let c = &spec.containers[0];
    assert_eq!(
        c.command.as_deref(),
        Some(&[COMMAND.to_owned()][..]),
        "no image code runs"
    );
    assert!(c.args.is_none());
    let res = c.resources.clone().unwrap();
    assert!(res.requests.is_some() && res.limits.is_some());
}

fn status_with(image_id: &str, waiting: Option<&str>, phase: &str) -> Pod {
    Pod {
        status: Some(PodStatus {
            phase: Some(phase.into()),
            container_statuses: Some(vec![ContainerStatus {
                name: CONTAINER.into(),
                image_id: image_id.into(),
                state: waiting.map(|r| ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(r.into()),
                        message: Some(format!("{r} message")),
                    }),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        }),
        ..Pod::default()
    }
}

#[test]
fn podbuilder_outcome_is_judged_by_the_pull_not_the_exit() {
    let pulled = status_with(&format!("docker.io/library/nginx@{DIGEST}"), None, "Failed");
    assert_eq!(
        outcome(&pulled),
        PullOutcome::Pulled {
            digest: Some(DIGEST.into())
        },
        "StartError after pull"
    );
    assert_eq!(
        outcome(&status_with(DIGEST, None, "Succeeded")),
        PullOutcome::Pulled {
            digest: Some(DIGEST.into())
        }
    );
    assert_eq!(
        outcome(&status_with("", None, "Pending")),
        PullOutcome::Pulling
    );
    assert_eq!(outcome(&Pod::default()), PullOutcome::Pulling);
    for reason in PULL_ERRORS {
        assert!(
            matches!(outcome(&status_with("", Some(reason), "Pending")), PullOutcome::Failed { reason: r, .. } if r == *reason),
            "{reason}"
        );
    }
    assert_eq!(
        outcome(&status_with("", Some("ContainerCreating"), "Pending")),
        PullOutcome::Pulling
    );
    let mut rejected = status_with("", None, "Failed");
    rejected.status.as_mut().unwrap().reason = Some("OutOfcpu".into());
    assert!(
        matches!(outcome(&rejected), PullOutcome::Failed { reason, .. } if reason == "OutOfcpu")
    );
}

#[test]
fn podbuilder_outcome_on_cri_o_is_pulled_when_the_container_cannot_be_created() {
    // CRI-O refuses the missing command at create time: no image ID, but the image is on the node.
    assert_eq!(
        outcome(&status_with("", Some("CreateContainerError"), "Pending")),
        PullOutcome::Pulled { digest: None }
    );
}

#[test]
fn podbuilder_a_trimmed_pull_pod_reads_as_the_whole_one() {
    let ci = image("nginx", nginx());
    let mut pods: Vec<Pod> = vec![
        pod_for(&ci, None),
        status_with(&format!("docker.io/library/nginx@{DIGEST}"), None, "Failed"),
        status_with("", None, "Pending"),
        status_with("", Some("CreateContainerError"), "Pending"),
        status_with("", Some("ContainerCreating"), "Pending"),
    ];
    pods.extend(
        PULL_ERRORS
            .iter()
            .map(|r| status_with("", Some(r), "Pending")),
    );
    let mut rejected = status_with("", None, "Failed");
    rejected.status.as_mut().unwrap().reason = Some("OutOfcpu".into());
    rejected.status.as_mut().unwrap().message = Some("Node didn't have enough cpu".into());
    pods.push(rejected);
    let built = pod_for(&ci, None);
    for (i, mut pod) in pods.into_iter().enumerate() {
        // Each as the API server would hand it: the built Pod's metadata, a creation time, and
        // status fields the operator does not read.
        pod.metadata = built.metadata.clone();
        pod.metadata.creation_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        pod.spec = built.spec.clone();
        if let Some(s) = pod.status.as_mut() {
            s.pod_ip = Some("10.0.0.1".into());
            s.conditions = Some(vec![Default::default()]);
            if let Some(c) = s.container_statuses.as_mut() {
                c[0].restart_count = 3;
                c.push(ContainerStatus {
                    name: "other".into(),
                    ..ContainerStatus::default()
                });
            }
        }
        let mut trimmed = pod.clone();
        trim(&mut trimmed);
        assert!(PullPodView::of(&pod).is_some(), "case {i} is a pull Pod");
        assert_eq!(PullPodView::of(&trimmed), PullPodView::of(&pod), "case {i}");
        assert_eq!(trimmed.spec, None);
        if let Some(s) = &trimmed.status {
            assert_eq!((&s.pod_ip, &s.conditions), (&None, &None), "case {i}");
            assert!(
                s.container_statuses
                    .iter()
                    .flatten()
                    .all(|c| c.name == CONTAINER)
            );
        }
    }
}

#[test]
fn podbuilder_digest_parsing() {
    assert_eq!(
        digest_of(&format!("docker-pullable://nginx@{DIGEST}")),
        Some(DIGEST.into())
    );
    assert_eq!(digest_of(DIGEST), Some(DIGEST.into()));
    assert_eq!(digest_of("sha256:short"), None);
    assert_eq!(digest_of(""), None);
}

proptest! {
    #[test]
    fn podbuilder_names_are_always_valid(
        image in "[a-z0-9]([a-z0-9.-]{0,250}[a-z0-9])?",
        node in "[a-z0-9]([a-z0-9.-]{0,250}[a-z0-9])?",
        reference in ".{1,80}",
        attempt in 1u32..100_000,
    ) {
        let name = pod_name(&image, &node, &reference, attempt);
        prop_assert!(is_dns_subdomain_63(&name), "{}", name);
        prop_assert!(is_label_value(&label_value(&image)));
        prop_assert!(is_label_value(&label_value(&node)));
    }
}
