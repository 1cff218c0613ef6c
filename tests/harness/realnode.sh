#!/usr/bin/env bash
# One real node beside the simulated ones: a kubelet (built with the other kube tools) running Pods in
# a private containerd (Debian's, with runc and the CNI plugins), joined to the local control plane
# (kube_plan::testing; `cargo run -p e2e --bin cluster`), and a loopback registry holding the images the node and the tests need.
#
#   realnode.sh up       start registry, containerd and kubelet; wait until the Node is Ready
#   realnode.sh ensure   reuse a running real node, else (re)start it; prints the env lines
#   realnode.sh down     stop everything it started and put the machine back as it was
#   realnode.sh env      print REAL_NODE=..., REAL_NODE_REGISTRY=..., REAL_NODE_CONTAINERD=...,
#                        REAL_NODE_HOSTS_DIR=... (containerd's per-registry hosts.toml directory)
#   realnode.sh status   say what runs
#
# The node is named real-node-0, labelled and tainted drop.corewire.io/e2e-real-node=true (NoSchedule),
# so only what tolerates that taint goes there: tests of the simulated fleet never land on it.
# The kubelet writes to a few fixed paths whatever its flags say (kernel sysctls, kubepods cgroups,
# /var/lib/kubelet/device-plugins, /var/log/containers), so there is one real node per machine; `down`
# restores or removes each of them.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
STATE=${KUBE_PLAN_CLUSTER_STATE:-$REPO/target/kube-plan-cluster}
RN=$STATE/realnode
NODE=real-node-0
MARK=drop.corewire.io/e2e-real-node
SOCK=$RN/containerd/containerd.sock
# Machine-wide: which state directory's real node runs (one per machine).
OWNER=${DROP_E2E_REALNODE_OWNER:-/run/drop-e2e-realnode}
# Sysctls the kubelet sets at start-up (it cannot be told to leave them).
SYSCTLS=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys
  kernel/keys/root_maxbytes)

log() { printf '[realnode] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
now_ms() { date +%s%3N; }
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
kubectl() { "$BIN/kubectl" --kubeconfig="$STATE/kubeconfig" "$@"; }
ctr_() { ctr --address "$SOCK" "$@"; }

# A recorded PID counts only while it still runs the binary recorded with it.
alive() {
  local pid exe
  pid=$(cat "$RN/pids/$1" 2>/dev/null) || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [[ "${exe% (deleted)}" == "$(cat "$RN/pids/$1.exe")" ]]
}

start() {
  local name=$1; shift
  # The lock descriptors (7: this script, 8: cluster.sh, 9: tools.sh) must not stay open in
  # long-lived processes, or the next ensure would wait for ever.
  setsid "$@" >"$RN/logs/$name.log" 2>&1 </dev/null 7>&- 8>&- 9>&- &
  echo $! >"$RN/pids/$name"
  readlink -f "$1" >"$RN/pids/$name.exe"
}

# wait_for NAME SECONDS CHECK...: until CHECK succeeds; fails (with NAME's log) if NAME dies or time runs out.
wait_for() {
  local name=$1 secs=$2; shift 2
  local deadline=$(( $(now_ms) + secs * 1000 ))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name" || (( $(now_ms) > deadline )); then
      tail -n 30 "$RN/logs/$name.log" >&2 || true
      return 1
    fi
    sleep 0.1
  done
}

preflight() {
  [[ -f "$STATE/kubeconfig" ]] || die "no control plane in $STATE: start one first (cargo run -p e2e --bin cluster -- ensure)"
  local missing=()
  for c in containerd containerd-shim-runc-v2 runc ctr docker-registry busybox; do
    command -v "$c" >/dev/null || missing+=("$c")
  done
  [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local ]] || missing+=(containernetworking-plugins)
  ((${#missing[@]} == 0)) || die "missing ${missing[*]}: run tests/harness/deps.sh"
  [[ -w /sys/fs/cgroup/cpu || -w /sys/fs/cgroup/cpu,cpuacct || -w /sys/fs/cgroup/cgroup.subtree_control ]] ||
    die "cgroups are not writable here: a real kubelet cannot run"
  if [[ -f $OWNER ]]; then
    local other; other=$(cat "$OWNER")
    if [[ $other != "$STATE" ]] && KUBE_PLAN_CLUSTER_STATE=$other "$0" status >/dev/null 2>&1; then
      die "a real node already runs for $other (one per machine); stop it: KUBE_PLAN_CLUSTER_STATE=$other $0 down"
    fi
  fi
}

start_registry() {
  local port; port=$(free_port)
  mkdir -p "$RN/registry"
  cat >"$RN/registry/config.yml" <<EOF
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $RN/registry/data}, delete: {enabled: true}}
http: {addr: 127.0.0.1:$port}
EOF
  start registry "$(command -v docker-registry)" serve "$RN/registry/config.yml"
  wait_for registry 30 curl -fsS "http://127.0.0.1:$port/v2/"
  echo "127.0.0.1:$port" >"$RN/registry.addr"
  local kind
  for kind in pause busybox distroless; do
    python3 "$HERE/oci-image.py" "127.0.0.1:$port" "$kind" 1 "$kind" >"$RN/registry/$kind.digest"
  done
  hosts_entry "127.0.0.1:$port"
}

# containerd reads one directory per registry host: plain HTTP for the loopback registry.
hosts_entry() {
  mkdir -p "$RN/certs.d/$1"
  printf 'server = "http://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' "$1" "$1" \
    >"$RN/certs.d/$1/hosts.toml"
}

start_containerd() {
  local registry; registry=$(cat "$RN/registry.addr")
  mkdir -p "$RN/containerd" "$RN/cni/net.d"
  # One bridge with no address on the host and no masquerading: the host gains no address or route,
  # and nothing touches iptables. Pull Pods need no network; the sandbox only needs an interface.
  cat >"$RN/cni/net.d/10-drop-e2e.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "drop-e2e", "plugins": [
  {"type": "bridge", "bridge": "drope2e0", "isGateway": false, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.7.0/24"}]], "dataDir": "$RN/cni/ipam"}},
  {"type": "loopback"}]}
EOF
  local cri='plugins."io.containerd.grpc.v1.cri"'
  cat >"$RN/containerd/config.toml" <<EOF
version = 2
root = "$RN/containerd/root"
state = "$RN/containerd/state"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[$cri]
  sandbox_image = "$registry/pause:1"
  # Without CAP_SYS_RESOURCE (containers, some CI sandboxes) no process may lower its oom_score_adj,
  # and the sandbox's default of -998 makes runc fail; keep scores at or above the parent's.
  restrict_oom_score_adj = true
  [$cri.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [$cri.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [$cri.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [$cri.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$RN/cni/net.d"
  [$cri.registry]
    config_path = "$RN/certs.d"
EOF
  start containerd "$(command -v containerd)" --config "$RN/containerd/config.toml"
  wait_for containerd 30 ctr_ version
}

start_kubelet() {
  for s in "${SYSCTLS[@]}"; do echo "$s=$(cat "/proc/sys/$s")"; done >"$RN/sysctl.orig"
  local port healthz; port=$(free_port); healthz=$(free_port)
  mkdir -p "$RN/kubelet/root" "$RN/kubelet/certs" "$RN/kubelet/pod-logs"
  cat >"$RN/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz
authentication: {anonymous: {enabled: false}, webhook: {enabled: false}, x509: {clientCAFile: $STATE/pki/ca.crt}}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://$SOCK
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
podLogsDir: $RN/kubelet/pod-logs
resolvConf: /etc/resolv.conf
clusterDNS: ["10.96.0.10"]
clusterDomain: cluster.local
serializeImagePulls: false
nodeStatusUpdateFrequency: 2s
syncFrequency: 5s
# Disk signals off ("0%" is the kubelet's way to ignore a threshold): the machine's disk is shared and
# sometimes nearly full, and a disk-pressure taint would silently take the test node out of every
# image's targets. The tests are about pulls, not about eviction.
evictionHard: {memory.available: "50Mi", nodefs.available: "0%", imagefs.available: "0%", nodefs.inodesFree: "0%", imagefs.inodesFree: "0%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
  start kubelet "$BIN/kubelet" --config="$RN/kubelet/config.yaml" --kubeconfig="$STATE/kubeconfig" \
    --root-dir="$RN/kubelet/root" --cert-dir="$RN/kubelet/certs" --hostname-override="$NODE" \
    --node-ip=127.0.0.1 --node-labels="$MARK=true" --register-with-taints="$MARK=true:NoSchedule" --v=2
  wait_for kubelet 120 curl -fsS "http://127.0.0.1:$healthz/healthz"
  wait_for kubelet 120 kubectl get node "$NODE"
  wait_for kubelet 120 kubectl wait node "$NODE" --for=condition=Ready --timeout=2s
}

up() {
  preflight
  local t0; t0=$(now_ms)
  BIN=$("$REPO/framework/tools/tools.sh" bindir)
  rm -rf "$RN"; mkdir -p "$RN/logs" "$RN/pids"
  echo "$STATE" >"$OWNER"
  # The cluster runs this before it stops: the node goes first, and puts the machine back.
  printf '#!/bin/sh\nKUBE_PLAN_CLUSTER_STATE=%q exec bash %q down\n' "$STATE" "$HERE/realnode.sh" >"$STATE/on-stop"
  chmod +x "$STATE/on-stop"
  start_registry || { down; die "the registry did not start"; }
  start_containerd || { down; die "containerd did not start"; }
  start_kubelet || { down; die "the kubelet did not start"; }
  log "node $NODE Ready in $(( ($(now_ms) - t0) / 100 ))00 ms (registry $(cat "$RN/registry.addr"))"
  env_lines
}

env_lines() {
  echo "REAL_NODE=$NODE"
  echo "REAL_NODE_REGISTRY=$(cat "$RN/registry.addr")"
  echo "REAL_NODE_CONTAINERD=$SOCK"
  echo "REAL_NODE_HOSTS_DIR=$RN/certs.d"
}

stop() {
  local name=$1 pid
  alive "$name" || { rm -f "$RN/pids/$name"; return 0; }
  pid=$(cat "$RN/pids/$name")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$RN/pids/$name"
}

down() {
  [[ -d "$RN" ]] || return 0
  BIN=${BIN:-$("$REPO/framework/tools/tools.sh" bindir 2>/dev/null || echo /nonexistent)}
  # The kubelet tears its Pods down first: their network namespaces go only through it (CNI DEL).
  if alive kubelet && alive containerd; then
    kubectl delete pods -A --field-selector "spec.nodeName=$NODE" --grace-period=0 --force --wait=false \
      >/dev/null 2>&1 || true
    local deadline=$(( $(now_ms) + 30000 ))
    while [[ -n $(ctr_ -n k8s.io containers ls -q 2>/dev/null) ]] && (( $(now_ms) < deadline )); do sleep 0.2; done
  fi
  stop kubelet
  kubectl delete node "$NODE" --wait=false >/dev/null 2>&1 || true
  if alive containerd; then
    # Whatever the kubelet left: kill the tasks so their shims exit, then remove the containers.
    local ns t
    for ns in k8s.io default; do
      for t in $(ctr_ -n "$ns" tasks ls -q 2>/dev/null); do ctr_ -n "$ns" tasks kill -s KILL "$t" >/dev/null 2>&1 || true; done
      for t in $(ctr_ -n "$ns" tasks ls -q 2>/dev/null); do ctr_ -n "$ns" tasks delete -f "$t" >/dev/null 2>&1 || true; done
      for t in $(ctr_ -n "$ns" containers ls -q 2>/dev/null); do ctr_ -n "$ns" containers delete "$t" >/dev/null 2>&1 || true; done
    done
  fi
  stop containerd
  stop registry
  # Shims of this containerd that outlived it (their PIDs are in its state directory).
  local f pid
  for f in "$RN"/containerd/state/io.containerd.runtime.v2.task/*/*/shim.pid; do
    [[ -f $f ]] || continue
    pid=$(cat "$f")
    [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == *containerd-shim* ]] && kill -KILL "$pid" 2>/dev/null || true
  done
  # Mounts under the state directory (overlay snapshots, Pod volumes), and network namespaces of
  # sandboxes that were never torn down.
  { grep -o " $RN/[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  local n
  for n in /run/netns/cni-* /var/run/netns/cni-*; do
    [[ -e $n ]] || continue
    umount "$n" 2>/dev/null || true; rm -f "$n"
  done
  ip link del drope2e0 2>/dev/null || true
  # The kubepods cgroups (cgroupfs driver: one tree per v1 hierarchy), empty once the tasks are gone.
  local h
  for h in /sys/fs/cgroup/*/; do
    [[ -d ${h}kubepods ]] && find "${h}kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  rm -f /var/lib/kubelet/device-plugins/kubelet.sock
  for f in /var/log/containers/*.log; do [[ -L $f && $(readlink "$f") == "$RN/"* ]] && rm -f "$f"; done
  rm -f /var/lib/cni/results/drop-e2e-* 2>/dev/null || true
  local d
  for d in /var/lib/kubelet /var/log/containers /var/log/pods /run/containerd /var/lib/cni /opt/containerd /run/netns; do
    [[ -d $d ]] && find "$d" -depth -type d -empty -delete 2>/dev/null || true
  done
  if [[ -f "$RN/sysctl.orig" ]]; then
    local k v
    while IFS='=' read -r k v; do [[ $(cat "/proc/sys/$k") == "$v" ]] || echo "$v" >"/proc/sys/$k"; done <"$RN/sysctl.orig"
  fi
  rm -rf "$RN"
  rm -f "$STATE/on-stop"
  [[ -f $OWNER && $(cat "$OWNER") == "$STATE" ]] && rm -f "$OWNER"
  log "down"
}

status() {
  local c rc=0
  for c in registry containerd kubelet; do
    if alive "$c"; then echo "$c: running (pid $(cat "$RN/pids/$c"))"; else echo "$c: stopped"; rc=1; fi
  done
  return $rc
}

ensure() {
  mkdir -p "$STATE"
  exec 7>"$STATE/realnode.lock"
  flock 7
  BIN=$("$REPO/framework/tools/tools.sh" bindir)
  if status >/dev/null 2>&1 && kubectl get node "$NODE" >/dev/null 2>&1; then
    env_lines
    return 0
  fi
  down
  up
}

cmd=${1:-}; shift || true
case "$cmd" in
  up) up ;;
  ensure) ensure ;;
  down) down ;;
  env) [[ -f "$RN/registry.addr" ]] || die "not up"; env_lines ;;
  status) status ;;
  *) die "usage: $0 up | ensure | down | env | status" ;;
esac
