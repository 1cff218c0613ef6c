//! Hostile input: what sources, Secrets, users and the kubelet hand Drop is fed to every parser as
//! arbitrary bytes and as structured near-misses. Nothing may panic, and every answer is bounded by
//! its input. `PROPTEST_CASES` raises the case counts for a deeper run (see docs/testing.md).

use drop::cachedimageset::plan::Wanted;
use drop::discovery::client::Credentials;
use drop::discovery::{prometheus, registry};
use drop::podbuilder::{self, CONTAINER};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateWaiting, ContainerStatus, Pod, PodStatus,
};
use proptest::prelude::*;

/// JSON shaped like a Prometheus answer, with arbitrary values where a hostile server would put them.
fn prometheus_answer() -> impl Strategy<Value = String> {
    let sample = (
        any::<f64>(),
        prop_oneof![
            any::<f64>().prop_map(|v| v.to_string()),
            Just("NaN".to_owned()),
            Just("+Inf".to_owned()),
            Just("9e999".to_owned()),
            ".{0,12}",
        ],
    );
    let series = (
        prop::option::of(".{0,40}"),
        prop::option::of(sample.clone()),
        prop::collection::vec(sample, 0..4),
    )
        .prop_map(|(image, value, values)| {
            let mut metric = serde_json::Map::new();
            if let Some(i) = image {
                metric.insert("image".into(), i.into());
            }
            serde_json::json!({"metric": metric, "value": value, "values": values})
        });
    (
        prop_oneof![
            Just("success".to_owned()),
            Just("error".to_owned()),
            ".{0,8}"
        ],
        prop_oneof![
            Just("vector".to_owned()),
            Just("matrix".to_owned()),
            Just("scalar".to_owned()),
            ".{0,8}"
        ],
        prop::collection::vec(series, 0..6),
    )
        .prop_map(|(status, kind, result)| {
            serde_json::json!({"status": status, "data": {"resultType": kind, "result": result}})
                .to_string()
        })
}

fn pod_with(image_id: String, reason: Option<String>, phase: Option<String>) -> Pod {
    Pod {
        status: Some(PodStatus {
            phase,
            container_statuses: Some(vec![ContainerStatus {
                name: CONTAINER.into(),
                image_id,
                state: Some(ContainerState {
                    waiting: reason.map(|r| ContainerStateWaiting {
                        reason: Some(r),
                        message: Some("m".into()),
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

proptest! {
    // A fixed seed, so `make test` is repeatable; 256 cases unless PROPTEST_CASES says more.
    #![proptest_config(ProptestConfig {
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x0d20_9bad),
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_prometheus_answers_as_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = prometheus::scores("http://p", &body);
    }

    #[test]
    fn hostile_prometheus_answers_as_json(body in prometheus_answer()) {
        if let Ok(found) = prometheus::scores("http://p", body.as_bytes()) {
            prop_assert!(found.len() <= 6);
        }
    }

    #[test]
    fn hostile_image_references(reference in ".{0,300}") {
        let _ = Wanted::parse(&reference);
    }

    #[test]
    fn hostile_image_templates(template in ".{0,200}", tag in ".{0,80}") {
        if let Ok(out) = registry::render(&template, "r:5000", "team/app", &tag) {
            // Rendering only substitutes: bounded by the template and the three values.
            prop_assert!(out.len() <= template.len() * (tag.len() + 20) + template.len());
        }
    }

    #[test]
    fn hostile_secret_contents(
        pairs in prop::collection::btree_map(
            prop_oneof![
                Just("token".to_owned()), Just("username".to_owned()), Just("password".to_owned()),
                Just("ca.crt".to_owned()), Just("tls.crt".to_owned()), Just("tls.key".to_owned()),
                "headers\\.[A-Za-z-]{0,10}", ".{0,12}",
            ],
            prop::collection::vec(any::<u8>(), 0..64),
            0..8,
        )
    ) {
        kube_plan::install_crypto_provider();
        let data = pairs.into_iter().map(|(k, v)| (k, ByteString(v))).collect();
        if let Ok(c) = Credentials::from_secret("s", &data) {
            // A client is built (or refused with a reason) from whatever the Secret holds.
            let _ = c.client();
        }
    }

    #[test]
    fn hostile_pull_pod_statuses(
        image_id in ".{0,120}",
        reason in prop::option::of(prop_oneof![
            Just("ErrImagePull".to_owned()), Just("CreateContainerError".to_owned()), ".{0,20}",
        ]),
        phase in prop::option::of(prop_oneof![Just("Failed".to_owned()), ".{0,10}"]),
    ) {
        let _ = podbuilder::outcome(&pod_with(image_id.clone(), reason, phase));
        let _ = podbuilder::digest_of(&image_id);
    }
}
