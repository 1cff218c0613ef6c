//! The checked-in CRD YAML is what the code generates.

/// Where the generated CRDs are checked in: the plain YAML, and the CRD chart's copy.
const CRD_DIRS: &[&str] = &["deploy/crds", "deploy/charts/drop-crds/files"];

#[test]
fn api_checked_in_crds_are_current() {
    let files = drop::api::crd_files().unwrap();
    assert_eq!(files.len(), 4);
    for dir in CRD_DIRS {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(dir);
        for (name, generated) in &files {
            let path = root.join(name);
            let fix = format!("run `cargo run -p drop -- crd --dir {dir}`");
            let on_disk = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}; {fix}", path.display()));
            assert!(on_disk == *generated, "{} is stale: {fix}", path.display());
        }
    }
}

#[test]
fn api_crds_are_cluster_scoped_in_category_drop() {
    for crd in drop::api::crds() {
        assert_eq!(crd.spec.group, "drop.corewire.io");
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["drop".to_owned()][..])
        );
        assert_eq!(crd.spec.versions[0].name, "v1alpha1");
        assert!(
            crd.spec.names.short_names.is_none(),
            "no short names, as the reference"
        );
    }
}

/// (kind, name, type, JSONPath, priority) of every printer column in the seed.
const SEED_COLUMNS: &[(&str, &str, &str, &str, i32)] = &[
    ("CachedImage", "Policy", "string", ".spec.policyRef.name", 1),
    (
        "CachedImage",
        "Message",
        "string",
        ".status.conditions[?(@.type==\"Ready\")].message",
        1,
    ),
    (
        "CachedImage",
        "Set",
        "string",
        ".metadata.labels.drop\\.corewire\\.io/imageset",
        1,
    ),
    (
        "CachedImage",
        "Digest",
        "string",
        ".status.resolvedDigest",
        1,
    ),
    (
        "CachedImage",
        "Age",
        "date",
        ".metadata.creationTimestamp",
        0,
    ),
    ("CachedImage", "Ready", "string", ".status.ready", 0),
    (
        "CachedImage",
        "Status",
        "string",
        ".status.conditions[?(@.type==\"Ready\")].reason",
        0,
    ),
    ("CachedImage", "Tag", "string", ".spec.tag", 0),
    ("CachedImage", "Image", "string", ".spec.image", 0),
    (
        "CachedImageSet",
        "Age",
        "date",
        ".metadata.creationTimestamp",
        0,
    ),
    (
        "CachedImageSet",
        "Message",
        "string",
        ".status.conditions[?(@.type==\"Ready\")].message",
        1,
    ),
    (
        "CachedImageSet",
        "Source",
        "string",
        ".spec.discoveryPolicyRef.name",
        0,
    ),
    (
        "CachedImageSet",
        "Managed",
        "integer",
        ".status.imagesManaged",
        0,
    ),
    (
        "CachedImageSet",
        "Ready",
        "string",
        ".status.imagesReady",
        0,
    ),
    (
        "CachedImageSet",
        "Status",
        "string",
        ".status.conditions[?(@.type==\"Ready\")].reason",
        0,
    ),
    (
        "DiscoveryPolicy",
        "Age",
        "date",
        ".metadata.creationTimestamp",
        0,
    ),
    (
        "DiscoveryPolicy",
        "Message",
        "string",
        ".status.conditions[?(@.type==\"Ready\")].message",
        1,
    ),
    (
        "DiscoveryPolicy",
        "LastSync",
        "date",
        ".status.lastSyncTime",
        0,
    ),
    (
        "DiscoveryPolicy",
        "Images",
        "integer",
        ".status.imageCount",
        0,
    ),
    (
        "DiscoveryPolicy",
        "Sources",
        "integer",
        ".status.sourceCount",
        0,
    ),
    (
        "DiscoveryPolicy",
        "Status",
        "string",
        ".status.conditions[?(@.type==\"Ready\")].reason",
        0,
    ),
    (
        "PullPolicy",
        "Age",
        "date",
        ".metadata.creationTimestamp",
        0,
    ),
    (
        "PullPolicy",
        "RepullInterval",
        "string",
        ".spec.repullInterval",
        0,
    ),
    (
        "PullPolicy",
        "MinDelay",
        "string",
        ".spec.minDelayBetweenPulls",
        0,
    ),
    (
        "PullPolicy",
        "MaxNodes",
        "integer",
        ".spec.maxConcurrentNodes",
        0,
    ),
];

#[test]
fn api_printer_columns_match_the_seed() {
    let mut got: Vec<(String, String, String, String, i32)> = Vec::new();
    for crd in drop::api::crds() {
        for c in crd.spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap_or_default()
        {
            got.push((
                crd.spec.names.kind.clone(),
                c.name,
                c.type_,
                c.json_path,
                c.priority.unwrap_or(0),
            ));
        }
    }
    // The seed lists each kind's column markers in reverse of the table's order; `kubectl get` shows
    // them in the table's order, so the CRD lists them so too (kinds in the order `crds` gives).
    let mut want: Vec<(String, String, String, String, i32)> = Vec::new();
    for crd in drop::api::crds() {
        let kind = crd.spec.names.kind;
        let mut of_kind: Vec<_> = SEED_COLUMNS
            .iter()
            .filter(|c| c.0 == kind)
            .map(|(k, n, t, p, pr)| {
                (
                    k.to_string(),
                    n.to_string(),
                    t.to_string(),
                    p.to_string(),
                    *pr,
                )
            })
            .collect();
        of_kind.reverse();
        want.extend(of_kind);
    }
    assert_eq!(got, want);
}
