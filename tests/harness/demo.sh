#!/usr/bin/env bash
# The main job: a local cluster with simulated nodes, Drop running against it, the seed's samples
# applied, and the images shown until they are cached (or, for the broken sample, reported failing).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# A cluster of its own, so a demo never meets a test run's objects.
export KUBE_PLAN_CLUSTER_STATE=${KUBE_PLAN_CLUSTER_STATE:-$REPO/target/demo-cluster}
STATE=$KUBE_PLAN_CLUSTER_STATE
BIN=$("$REPO/framework/tools/tools.sh" ensure | tail -n1)
echo "[demo] building drop and the cluster tool" >&2
cargo build -q -p drop -p e2e --bin drop --bin cluster
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
DROP="$TARGET/debug/drop"
# The same code as the tests' clusters (kube_plan::testing), from a shell.
eval "$("$TARGET/debug/cluster" ensure --nodes 3)"
k() { "$BIN/kubectl" "$@"; }
# One real node too (a kubelet with containerd), where a real image is really pulled. A machine that
# cannot run one (no writable cgroups, or another real node running) gets the demo without it.
REAL_NODE=
if real=$("$HERE/realnode.sh" ensure); then
  eval "$real"
  echo "[demo] real node $REAL_NODE (kubelet + containerd), its registry $REAL_NODE_REGISTRY" >&2
else
  echo "[demo] no real node on this machine (see above); the demo goes on with simulated nodes" >&2
fi


k apply --server-side -f "$REPO/deploy/crds/" >/dev/null
k wait --for=condition=Established crd --all --timeout=60s >/dev/null
k create namespace drop-system --dry-run=client -o yaml | k apply -f - >/dev/null
k label namespace drop-system pod-security.kubernetes.io/enforce=restricted --overwrite >/dev/null

# (Re)start the operator; its PID joins the cluster's, so `make down` stops it too.
if [[ -f "$STATE/pids/drop" ]]; then kill "$(cat "$STATE/pids/drop")" 2>/dev/null || true; fi
setsid "$DROP" run --pod-namespace drop-system --metrics-bind-address 127.0.0.1:8080 \
  --health-probe-bind-address 127.0.0.1:8081 >"$STATE/logs/drop.log" 2>&1 </dev/null 8>&- 9>&- &
echo $! >"$STATE/pids/drop"
readlink -f "$DROP" >"$STATE/pids/drop.exe"
for _ in $(seq 1 100); do curl -fsS 127.0.0.1:8081/readyz >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS 127.0.0.1:8081/readyz >/dev/null || { tail -20 "$STATE/logs/drop.log"; exit 1; }
echo "[demo] drop is running (log: $STATE/logs/drop.log)" >&2

# Real discovery sources on loopback stand in for the in-cluster services the samples name.
eval "$("$HERE/demo-sources.sh" "$STATE")"
echo "[demo] registry $REGISTRY_URL (test/myapp: 4 tags), prometheus $PROMETHEUS_URL (a day of CI runners)" >&2

# Every sample of the seed. The broken ones stay broken on purpose, to show how Drop reports them.
k apply -f "$REPO/deploy/samples/cachedimages.yaml"
k apply -f "$REPO/deploy/samples/cachedimagesets.yaml"
sed -e "s#http://prometheus.e2e-infra.svc.cluster.local:9090#$PROMETHEUS_URL#" \
    -e "s#http://registry.e2e-infra.svc.cluster.local:5000#$REGISTRY_URL#" \
    "$REPO/deploy/samples/discoverypolicies.yaml" | k apply -f -

if [[ -n $REAL_NODE ]]; then
  # A real image (Debian's static busybox, built by the harness) for the real node alone.
  k apply -f - <<YAML
apiVersion: drop.corewire.io/v1alpha1
kind: CachedImage
metadata: {name: real-busybox}
spec:
  image: $REAL_NODE_REGISTRY/busybox
  tag: "1"
  nodeSelector: {drop.corewire.io/e2e-real-node: "true"}
  tolerations: [{key: drop.corewire.io/e2e-real-node, operator: Exists, effect: NoSchedule}]
YAML
fi
echo "[demo] every pull shares PullPolicy dev-conservative: one node at a time, 5 s apart" >&2
reason() { k get "$1" "$2" -o jsonpath='{.status.conditions[?(@.type=="Ready")].reason}' 2>/dev/null; }
settled() {
  [[ "$(reason cachedimage dev-nginx)" == Cached && "$(reason cachedimage dev-redis)" == Cached &&
     "$(reason cachedimage test-invalid-image)" == PullFailed && "$(reason cachedimageset dev-set)" == Ready &&
     "$(reason cachedimageset dev-set-discovered)" == Ready &&
     ( -z $REAL_NODE || "$(reason cachedimage real-busybox)" == Cached ) ]]
}
applied=$SECONDS
deadline=$((applied + 420))
shown=$applied
until settled; do
  (( SECONDS < deadline )) || { echo "[demo] not settled after 420 s" >&2; exit 1; }
  sleep 2
  if (( SECONDS - shown >= 10 )); then
    shown=$SECONDS
    echo; k get cachedimagesets; k get cachedimages
  fi
done
echo "[demo] settled $((SECONDS - applied)) s after the samples were applied" >&2
echo
k get discoverypolicies -o wide
echo
k get cachedimagesets
echo
k get cachedimages -o wide
if [[ -n $REAL_NODE ]]; then
  echo
  echo "[demo] real-busybox on $REAL_NODE: resolved digest $(k get cachedimage real-busybox -o jsonpath='{.status.resolvedDigest}')"
  echo "[demo] and the node's containerd now holds it (ctr images ls):"
  ctr --address "$REAL_NODE_CONTAINERD" -n k8s.io images ls |
    awk 'NR == 1 || /busybox/ {printf "  %-40s %-72s %s %s\n", $1, $3, $4, $5}'
fi
cat <<MSG

dev-nginx and dev-redis are cached on every node; dev-set's two images too; dev-set-discovered holds the
last 3 tags the registry lists for test/myapp, found by DiscoveryPolicy dev-registry. test-invalid-image
cannot be pulled (its registry does not resolve), is retried with backoff, and says so in its status
and Events; the test-* DiscoveryPolicies show their DNSError and RepositoryNotFound failures.
real-busybox went to the one real node (a kubelet with containerd): its bytes are in that node's
containerd, under the digest Drop reports.

  export KUBECONFIG=$KUBECONFIG PATH=$BIN:\$PATH
  kubectl get events -A --field-selector involvedObject.kind=CachedImage
  curl -s 127.0.0.1:8080/metrics | grep ^drop_
  make down          # stop everything
MSG
