//! What the operator's Node cache holds, with and without trimming.
//!
//! The CachedImage controller caches every Node of the cluster for as long as it runs. A kubelet
//! reports up to 50 images per node in `status.images` (and Drop exists to put more there), besides
//! conditions, addresses and capacity; server-side apply adds `managedFields`. This builds Nodes shaped
//! like a kubelet's report, holds them as the cache would, and prints the heap they occupy (counted
//! by this binary's allocator) as they arrive and as the operator keeps them (managed fields dropped
//! by the framework, the status reduced to hashes of the image names by `cachedimage::targets::trim`).
//!
//! Run: `cargo bench -p drop --bench node_cache`.

use k8s_openapi::api::core::v1::Node;

#[path = "support/counting.rs"]
mod counting;

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

/// A Node as a kubelet on a busy CI node reports it (50 images, the usual status, apply history).
fn kubelet_node(i: usize) -> serde_json::Value {
    let images: Vec<serde_json::Value> = (0..50)
        .map(|k| {
            serde_json::json!({
                "names": [
                    format!("registry.example.com/team-{k}/service-{k}@sha256:{:064x}", k * 7919 + i),
                    format!("registry.example.com/team-{k}/service-{k}:v1.{k}.{i}"),
                ],
                "sizeBytes": 100_000_000 + k * 1000,
            })
        })
        .collect();
    let condition = |t: &str, reason: &str| {
        serde_json::json!({
            "type": t, "status": "False", "reason": reason,
            "message": format!("kubelet reports {t} is fine on this node"),
            "lastHeartbeatTime": "2026-11-25T10:00:00Z", "lastTransitionTime": "2026-11-20T10:00:00Z",
        })
    };
    let fields = |manager: &str, sub: &str| {
        serde_json::json!({
            "manager": manager, "operation": "Update", "apiVersion": "v1",
            "time": "2026-11-25T10:00:00Z", "fieldsType": "FieldsV1", "subresource": sub,
            "fieldsV1": {
                "f:status": {
                    "f:conditions": { "k:{\"type\":\"Ready\"}": { "f:lastHeartbeatTime": {}, "f:message": {}, "f:reason": {}, "f:status": {} },
                                      "k:{\"type\":\"MemoryPressure\"}": { "f:lastHeartbeatTime": {} },
                                      "k:{\"type\":\"DiskPressure\"}": { "f:lastHeartbeatTime": {} },
                                      "k:{\"type\":\"PIDPressure\"}": { "f:lastHeartbeatTime": {} } },
                    "f:images": {}, "f:nodeInfo": { "f:bootID": {}, "f:kernelVersion": {}, "f:osImage": {} },
                    "f:allocatable": { "f:cpu": {}, "f:memory": {}, "f:pods": {} },
                    "f:capacity": { "f:cpu": {}, "f:memory": {}, "f:pods": {} },
                },
                "f:metadata": { "f:annotations": { "f:node.alpha.kubernetes.io/ttl": {} },
                                "f:labels": { "f:kubernetes.io/hostname": {}, "f:topology.kubernetes.io/zone": {} } },
            },
        })
    };
    serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": format!("ci-pool-{i:05}"),
            "uid": format!("{:08x}-0000-4000-8000-{:012x}", i, i),
            "resourceVersion": format!("{}", 1_000_000 + i),
            "creationTimestamp": "2026-11-20T10:00:00Z",
            "labels": {
                "kubernetes.io/hostname": format!("ci-pool-{i:05}"), "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "node.kubernetes.io/instance-type": "m7i.2xlarge",
                "topology.kubernetes.io/zone": "eu-central-1a", "topology.kubernetes.io/region": "eu-central-1",
                "pool": "ci",
            },
            "annotations": { "node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true" },
            "managedFields": [fields("kubelet", "status"), fields("kubelet", ""), fields("kube-controller-manager", ""), fields("cluster-autoscaler", "")],
        },
        "spec": {
            "providerID": format!("aws:///eu-central-1a/i-{i:017x}"), "podCIDR": "10.244.1.0/24",
            "taints": [{ "key": "dedicated", "value": "ci", "effect": "NoSchedule" }],
        },
        "status": {
            "capacity": { "cpu": "8", "memory": "32408312Ki", "pods": "110", "ephemeral-storage": "203056560Ki", "hugepages-2Mi": "0" },
            "allocatable": { "cpu": "7910m", "memory": "31391480Ki", "pods": "110", "ephemeral-storage": "187136925387", "hugepages-2Mi": "0" },
            "conditions": [condition("MemoryPressure", "KubeletHasSufficientMemory"), condition("DiskPressure", "KubeletHasNoDiskPressure"),
                           condition("PIDPressure", "KubeletHasSufficientPID"), condition("Ready", "KubeletReady")],
            "addresses": [{ "type": "InternalIP", "address": "10.0.1.17" }, { "type": "Hostname", "address": format!("ci-pool-{i:05}") }],
            "daemonEndpoints": { "kubeletEndpoint": { "Port": 10250 } },
            "nodeInfo": { "machineID": format!("{i:032x}"), "systemUUID": format!("ec2{i:029x}"), "bootID": format!("{i:032x}"),
                          "kernelVersion": "6.1.0-28-cloud-amd64", "osImage": "Debian GNU/Linux 12 (bookworm)",
                          "containerRuntimeVersion": "containerd://2.1.4", "kubeletVersion": "v1.37.2", "kubeProxyVersion": "",
                          "operatingSystem": "linux", "architecture": "amd64" },
            "images": images,
        },
    })
}

/// Heap bytes held by `nodes` Nodes after `keep` has trimmed each as it arrived.
fn held(nodes: usize, keep: impl Fn(&mut Node)) -> usize {
    let before = counting::Held::now();
    let cache: Vec<Node> = (0..nodes)
        .map(|i| {
            let mut node: Node = serde_json::from_value(kubelet_node(i)).expect("a valid Node");
            keep(&mut node);
            node
        })
        .collect();
    let bytes = counting::Held::now().since(before).bytes;
    drop(cache);
    bytes
}

fn main() {
    println!("Node cache: heap held by the cached Nodes (measured by a counting allocator)");
    println!(
        "{:>7} {:>16} {:>22} {:>16} {:>8}",
        "nodes", "as received", "without managedFields", "as kept (Drop)", "ratio"
    );
    for nodes in [100, 1000, 5000] {
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        let received = held(nodes, |_| {});
        let unmanaged = held(nodes, |n| n.metadata.managed_fields = None);
        let kept = held(nodes, |n| {
            n.metadata.managed_fields = None;
            drop::cachedimage::targets::trim(n);
        });
        println!(
            "{:>7} {:>12.1} MiB {:>18.1} MiB {:>12.1} MiB {:>7.1}×",
            nodes,
            mib(received),
            mib(unmanaged),
            mib(kept),
            received as f64 / kept as f64,
        );
    }
}
