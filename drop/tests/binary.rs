//! The `drop` binary's user-facing behaviour that needs no cluster.

use std::process::Command;

fn drop_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_drop"))
}

#[test]
fn cachedimage_binary_bad_kubeconfig_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = drop_bin()
        .args([
            "run",
            "--metrics-bind-address",
            "0",
            "--health-probe-bind-address",
            "0",
        ])
        .env("KUBECONFIG", dir.path().join("missing-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: no usable Kubernetes configuration"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn cachedimage_binary_rejects_bad_flags_with_the_fix() {
    let out = drop_bin()
        .args(["run", "--pull-timeout", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"soon\" is not a duration like 30s or 15m"),
        "{err}"
    );
    let out = drop_bin()
        .args(["run", "--log-format", "xml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("use `text` or `json`"));
}

#[test]
fn cachedimage_binary_prints_the_crds() {
    let out = drop_bin().arg("crd").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for name in [
        "cachedimages",
        "cachedimagesets",
        "discoverypolicies",
        "pullpolicies",
    ] {
        assert!(
            text.contains(&format!("name: {name}.drop.corewire.io")),
            "{name} missing"
        );
    }
}
