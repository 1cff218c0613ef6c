//! Admission rules of the CRDs, checked client-side with kube's CEL evaluator. The same table runs
//! against a real API server in the e2e suite (`tests/tests/api.rs`), which also covers the OpenAPI
//! rules (required fields, enums, types, lengths) that are not CEL.

use serde::Deserialize;

#[derive(Deserialize)]
pub struct Case {
    pub case: String,
    pub expect: String,
    pub cel: bool,
    #[serde(default)]
    pub client_expect: Option<String>,
    pub object: serde_json::Value,
}

fn table() -> Vec<Case> {
    serde_saphyr::from_str(include_str!("data/invalid-objects.yaml")).unwrap()
}

fn schema_of(kind: &str) -> serde_json::Value {
    let crd = drop::api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap();
    let schema = crd.spec.versions[0]
        .schema
        .clone()
        .unwrap()
        .open_api_v3_schema
        .unwrap();
    serde_json::to_value(schema).unwrap()
}

#[test]
fn api_validation_table_is_large_enough() {
    let t = table();
    assert!(
        t.len() >= 30,
        "at least 30 invalid objects, got {}",
        t.len()
    );
    for kind in [
        "CachedImage",
        "CachedImageSet",
        "DiscoveryPolicy",
        "PullPolicy",
    ] {
        assert!(
            t.iter().any(|c| c.object["kind"] == kind),
            "no case for {kind}"
        );
    }
}

#[test]
fn api_cel_rules_reject_each_invalid_object_with_its_message() {
    let mut failures = Vec::new();
    for c in table().into_iter().filter(|c| c.cel) {
        let kind = c.object["kind"].as_str().unwrap().to_owned();
        match kube::core::cel::Validator::new().validate(&schema_of(&kind), &c.object, None) {
            Ok(()) => failures.push(format!("{}: accepted", c.case)),
            Err(errs) => {
                let text = errs.to_string();
                let expect = c.client_expect.as_ref().unwrap_or(&c.expect);
                if !text.contains(expect.as_str()) {
                    failures.push(format!("{}: expected {expect:?} in {text:?}", c.case));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn api_cel_rules_accept_the_seed_samples() {
    let samples = include_str!("data/samples.yaml");
    let mut n = 0;
    for doc in serde_saphyr::from_multiple::<serde_json::Value>(samples).unwrap() {
        if doc.is_null() {
            continue;
        }
        let kind = doc["kind"].as_str().unwrap().to_owned();
        kube::core::cel::Validator::new()
            .validate(&schema_of(&kind), &doc, None)
            .unwrap_or_else(|e| panic!("sample {} rejected: {e}", doc["metadata"]["name"]));
        n += 1;
    }
    assert_eq!(n, 11, "all seed samples checked");
}

#[test]
fn api_deploy_samples_are_the_seed_samples() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/samples");
    let mut shipped = Vec::new();
    for f in [
        "cachedimages.yaml",
        "cachedimagesets.yaml",
        "discoverypolicies.yaml",
    ] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        shipped.extend(
            serde_saphyr::from_multiple::<serde_json::Value>(&text)
                .unwrap()
                .into_iter()
                .filter(|d| !d.is_null()),
        );
    }
    let seed: Vec<serde_json::Value> =
        serde_saphyr::from_multiple::<serde_json::Value>(include_str!("data/samples.yaml"))
            .unwrap()
            .into_iter()
            .filter(|d| !d.is_null())
            .collect();
    let key = |d: &serde_json::Value| format!("{}/{}", d["kind"], d["metadata"]["name"]);
    let mut a: Vec<String> = shipped
        .iter()
        .map(|d| format!("{} {}", key(d), d["spec"]))
        .collect();
    let mut b: Vec<String> = seed
        .iter()
        .map(|d| format!("{} {}", key(d), d["spec"]))
        .collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
}
