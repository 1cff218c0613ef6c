//! What decoding a watched object costs with and without its managed fields: a pull Pod as the
//! API server sends it (created by server-side apply, its status written by the kubelet), decoded
//! as `Pod` and as `kube_plan::lean::Lean<Pod>`. Prints figures; asserts nothing.
//!
//! `cargo bench -p framework --bench lean_decode`

use k8s_openapi::api::core::v1::Pod;
use kube_plan::lean::Lean;
use std::hint::black_box;
use std::time::Instant;

fn fields(keys: &[&str]) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for k in keys {
        map.insert((*k).to_owned(), serde_json::json!({}));
    }
    serde_json::Value::Object(map)
}

fn pod() -> serde_json::Value {
    let applied = serde_json::json!({
        "f:metadata": {
            "f:annotations": fields(&["f:drop.corewire.io/attempt", "f:drop.corewire.io/cachedimage", "f:drop.corewire.io/node", "f:drop.corewire.io/policy", "f:drop.corewire.io/reference"]),
            "f:labels": fields(&["f:app.kubernetes.io/managed-by", "f:drop.corewire.io/cachedimage", "f:drop.corewire.io/node", "f:framework.owner"]),
            "f:ownerReferences": {"k:{\"uid\":\"0b7c\"}": {}}
        },
        "f:spec": {
            "f:automountServiceAccountToken": {}, "f:enableServiceLinks": {}, "f:nodeName": {},
            "f:restartPolicy": {}, "f:terminationGracePeriodSeconds": {},
            "f:securityContext": fields(&["f:runAsGroup", "f:runAsNonRoot", "f:runAsUser", "f:seccompProfile"]),
            "f:containers": {"k:{\"name\":\"pull\"}": {
                ".": {}, "f:command": {}, "f:image": {}, "f:imagePullPolicy": {}, "f:name": {},
                "f:resources": fields(&["f:limits", "f:requests"]),
                "f:securityContext": fields(&["f:allowPrivilegeEscalation", "f:capabilities", "f:readOnlyRootFilesystem"])
            }}
        }
    });
    let status = serde_json::json!({
        "f:status": {
            "f:conditions": {
                "k:{\"type\":\"ContainersReady\"}": fields(&[".", "f:lastTransitionTime", "f:status", "f:type"]),
                "k:{\"type\":\"Initialized\"}": fields(&[".", "f:lastTransitionTime", "f:status", "f:type"]),
                "k:{\"type\":\"Ready\"}": fields(&[".", "f:lastTransitionTime", "f:status", "f:type"])
            },
            "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {}, "f:startTime": {}
        }
    });
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "img-3f2a-node-0042-9c1e2d3f-1", "namespace": "drop-system",
            "uid": "6c1f0f7e-3b1e-4f5e-9d7a-2f1d0c9b8a71", "resourceVersion": "123456",
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "labels": {"app.kubernetes.io/managed-by": "drop", "drop.corewire.io/cachedimage": "img-3f2a", "drop.corewire.io/node": "node-0042", "framework.owner": "cachedimage"},
            "annotations": {"drop.corewire.io/attempt": "1", "drop.corewire.io/cachedimage": "img-3f2a", "drop.corewire.io/node": "node-0042", "drop.corewire.io/policy": "fleet", "drop.corewire.io/reference": "docker.io/library/nginx:1.27"},
            "ownerReferences": [{"apiVersion": "drop.corewire.io/v1alpha1", "kind": "CachedImage", "name": "img-3f2a", "uid": "0b7c", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                {"manager": "drop", "operation": "Apply", "apiVersion": "v1", "time": "2026-12-01T10:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": applied},
                {"manager": "kwok", "operation": "Update", "apiVersion": "v1", "time": "2026-12-01T10:00:01Z", "fieldsType": "FieldsV1", "fieldsV1": status, "subresource": "status"}
            ]
        },
        "spec": {
            "nodeName": "node-0042", "restartPolicy": "Never", "automountServiceAccountToken": false,
            "enableServiceLinks": false, "terminationGracePeriodSeconds": 0,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65534, "runAsGroup": 65534, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "pull", "image": "docker.io/library/nginx:1.27", "command": ["/.drop-pull-only/never-run"], "imagePullPolicy": "IfNotPresent",
                "resources": {"limits": {"cpu": "10m", "memory": "16Mi"}, "requests": {"cpu": "1m", "memory": "4Mi"}},
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {
            "phase": "Running", "hostIP": "10.0.0.42", "podIP": "10.0.0.42", "startTime": "2026-12-01T10:00:01Z",
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-12-01T10:00:01Z"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-01T10:00:01Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-12-01T10:00:01Z"}
            ],
            "containerStatuses": [{"name": "pull", "image": "docker.io/library/nginx:1.27", "imageID": "docker.io/library/nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "containerID": "containerd://abc", "ready": true, "started": true, "restartCount": 0, "state": {"running": {"startedAt": "2026-12-01T10:00:01Z"}}}]
        }
    })
}

fn per_decode(rounds: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..rounds / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..rounds {
        f();
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
}

fn main() {
    let text = serde_json::to_vec(&pod()).expect("serialise");
    let rounds = 20_000;
    let full = per_decode(rounds, || {
        black_box(serde_json::from_slice::<Pod>(black_box(&text)).expect("decode"));
    });
    let lean = per_decode(rounds, || {
        black_box(serde_json::from_slice::<Lean<Pod>>(black_box(&text)).expect("decode"));
    });
    println!("pull Pod of {} bytes, {rounds} decodes each", text.len());
    println!("  as Pod (managed fields decoded): {full:>7.2} µs");
    println!("  as Lean<Pod> (managed fields skipped): {lean:>7.2} µs");
    println!("  ratio lean / full: {:.2}", lean / full);
}
