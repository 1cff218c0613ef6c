#!/usr/bin/env bash
# A real local control plane without containers: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and KWOK
# (simulated nodes whose "kubelet" follows the stages in kwok/pod-stages.yaml).
#
#   cluster.sh up [--nodes N] [--real-nodes 0|1]
#                               start everything (builds the tools on first use), wait until N nodes are Ready;
#                               with --real-nodes 1, also a real kubelet and containerd (realnode.sh)
#   cluster.sh ensure [--nodes N]  reuse the cluster if every component runs, else (re)start it; prints the env line
#   cluster.sh down             stop every process this cluster started (by recorded PID) and remove its state
#   cluster.sh env              print `export KUBECONFIG=...` for a shell
#   cluster.sh status           say which components are running
#   cluster.sh logs COMPONENT   print a component's log (etcd, kube-apiserver, kube-controller-manager,
#                               kube-scheduler, kwok)
#
# Extra flags per component: ETCD_EXTRA_ARGS, KUBE_APISERVER_EXTRA_ARGS, KCM_EXTRA_ARGS, SCHEDULER_EXTRA_ARGS,
# KWOK_EXTRA_ARGS.
# Every server binds 127.0.0.1 on ports picked free at start. State (certificates, kubeconfig, logs, PIDs) lives in
# $DROP_E2E_STATE (default: <repo>/target/e2e-cluster); etcd's data lives on tmpfs.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
STATE=${DROP_E2E_STATE:-$REPO/target/e2e-cluster}
NODES=${NODES:-3}
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
elapsed() { printf '%d.%01d' $(( $1 / 1000 )) $(( ($1 % 1000) / 100 )); }
now_ms() { date +%s%3N; }

pid_of() { cat "$STATE/pids/$1" 2>/dev/null || true; }

# A recorded PID counts as ours only while it still runs the binary we started (PIDs get reused).
alive() {
  local pid; pid=$(pid_of "$1")
  [[ -n "$pid" ]] || return 1
  local exe; exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  # A binary rebuilt while its process runs reads as "<path> (deleted)": still ours.
  [[ "${exe% (deleted)}" == "$(cat "$STATE/pids/$1.exe" 2>/dev/null)" ]]
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

tail_log() {
  log "last lines of $1's log ($STATE/logs/$1.log):"
  tail -n "${2:-40}" "$STATE/logs/$1.log" >&2 2>/dev/null || true
}

start() {
  local name=$1; shift
  local exe; exe=$(readlink -f "$1")
  # The lock descriptors (8: cluster, 9: tools) must not leak into long-lived components, or the
  # lock would stay held for as long as the cluster runs.
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null 8>&- 9>&- &
  local pid=$!
  echo "$pid" >"$STATE/pids/$name"
  echo "$exe" >"$STATE/pids/$name.exe"
  printf '%q ' "$@" >"$STATE/pids/$name.cmd"
  # Until the forked shell has exec'd setsid and then the component, /proc/PID/exe names bash or
  # setsid and `alive` would read the new process as dead. Wait for the exec (or for an early exit).
  local deadline=$(( $(now_ms) + 10000 ))
  until alive "$name"; do
    readlink "/proc/$pid/exe" >/dev/null 2>&1 || break
    (( $(now_ms) < deadline )) || break
    sleep 0.05
  done
}

# wait_for NAME SECONDS CHECK...: poll CHECK until it succeeds; if the process dies or time runs out, show its log.
wait_for() {
  local name=$1 secs=$2; shift 2
  local deadline=$(( $(now_ms) + secs * 1000 ))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name"; then
      tail_log "$name"
      stop_all
      die "$name exited during start-up"
    fi
    if (( $(now_ms) > deadline )); then
      tail_log "$name"
      stop_all
      die "$name not healthy after ${secs}s"
    fi
    sleep 0.2
  done
}

write_pki() {
  local p="$STATE/pki"
  mkdir -p "$p"
  (
    cd "$p"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=drop-e2e-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr \
      -subj "/O=system:masters/CN=drop-e2e-admin" 2>/dev/null
    cat >admin.ext <<'EOF'
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1
EOF
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile admin.ext \
      -out admin.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

write_kubeconfig() {
  local p="$STATE/pki"
  cat >"$STATE/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: drop-e2e
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 "$p/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 "$p/admin.crt")
    client-key-data: $(base64 -w0 "$p/admin.key")
contexts:
- name: drop-e2e
  context: {cluster: drop-e2e, user: admin}
current-context: drop-e2e
EOF
}

write_nodes() {
  local i
  for ((i = 0; i < NODES; i++)); do
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations: {kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}
  labels: {kubernetes.io/hostname: kwok-node-$i, kubernetes.io/os: linux, kubernetes.io/arch: amd64, type: kwok}
EOF
  done
}

up() {
  while [[ $# -gt 0 ]]; do
    case $1 in
      --nodes) NODES=$2; shift 2 ;;
      --real-nodes) REAL_NODES=$2; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  for c in "${COMPONENTS[@]}"; do
    alive "$c" && die "already up (state in $STATE); run '$0 down' first"
  done
  local t0 t; t0=$(now_ms)
  local bin; bin=$("$HERE/tools.sh" ensure | tail -n1)
  local cache; cache=$(dirname "$bin")
  t=$(now_ms); log "tools: $(elapsed $((t - t0))) s"

  rm -rf "$STATE"; mkdir -p "$STATE/logs" "$STATE/pids"
  ETCD_PORT=$(free_port); ETCD_PEER_PORT=$(free_port); API_PORT=$(free_port); KCM_PORT=$(free_port)
  SCHED_PORT=$(free_port); KWOK_PORT=$(free_port)
  local etcd_data="/dev/shm/drop-e2e-$(id -u)-$$"
  cat >"$STATE/ports.env" <<EOF
ETCD_PORT=$ETCD_PORT
API_PORT=$API_PORT
KCM_PORT=$KCM_PORT
SCHED_PORT=$SCHED_PORT
KWOK_PORT=$KWOK_PORT
ETCD_DATA=$etcd_data
EOF
  write_pki
  write_kubeconfig
  local p="$STATE/pki" kc="$STATE/kubeconfig"

  local s; s=$(now_ms)
  start etcd "$bin/etcd" --name=e2e --data-dir="$etcd_data" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync=true --quota-backend-bytes=1073741824 --log-level=warn ${ETCD_EXTRA_ARGS:-}
  wait_for etcd 30 curl -fsS "http://127.0.0.1:$ETCD_PORT/health"
  t=$(now_ms); log "etcd ready: $(elapsed $((t - s))) s"; s=$t

  start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --secure-port="$API_PORT" \
    --tls-cert-file="$p/admin.crt" --tls-private-key-file="$p/admin.key" --client-ca-file="$p/ca.crt" \
    --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$p/sa.pub" --service-account-signing-key-file="$p/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --allow-privileged=false --profiling=false --v=1 ${KUBE_APISERVER_EXTRA_ARGS:-}
  wait_for kube-apiserver 120 curl -fsS --cacert "$p/ca.crt" --cert "$p/admin.crt" --key "$p/admin.key" \
    "https://127.0.0.1:$API_PORT/readyz"
  t=$(now_ms); log "kube-apiserver ready: $(elapsed $((t - s))) s"; s=$t

  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig="$kc" --authentication-kubeconfig="$kc" --authorization-kubeconfig="$kc" \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" \
    --authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics \
    --leader-elect=false --root-ca-file="$p/ca.crt" --service-account-private-key-file="$p/sa.key" \
    --use-service-account-credentials=false \
    --node-monitor-period=5s --node-monitor-grace-period=40s --v=1 ${KCM_EXTRA_ARGS:-}
  wait_for kube-controller-manager 60 curl -fsSk "https://127.0.0.1:$KCM_PORT/healthz"
  t=$(now_ms); log "kube-controller-manager ready: $(elapsed $((t - s))) s"; s=$t

  # Only the operator's own Deployment (and the framework's example) need scheduling: pull Pods are
  # pinned with spec.nodeName.
  start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig="$kc" --authentication-kubeconfig="$kc" --authorization-kubeconfig="$kc" \
    --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" \
    --authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics \
    --leader-elect=false ${SCHEDULER_EXTRA_ARGS:-}
  wait_for kube-scheduler 60 curl -fsSk "https://127.0.0.1:$SCHED_PORT/healthz"
  t=$(now_ms); log "kube-scheduler ready: $(elapsed $((t - s))) s"; s=$t

  # kwok's own node stages (read from its module in the Go module cache) plus our pod stages.
  local stages="$cache/kwok-node-stages"
  {
    cat "$stages/fast/node-initialize.yaml"
    printf '\n---\n'
    cat "$stages/heartbeat-with-lease/node-heartbeat-with-lease.yaml"
    printf '\n---\n'
    cat "$HERE/kwok/pod-stages.yaml"
  } >"$STATE/kwok-stages.yaml"
  start kwok "$bin/kwok" --kubeconfig="$kc" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --node-lease-duration-seconds=40 --cidr=10.244.0.0/16 --node-ip=127.0.0.1 \
    --server-address="127.0.0.1:$KWOK_PORT" --config="$STATE/kwok-stages.yaml" ${KWOK_EXTRA_ARGS:-}
  wait_for kwok 60 curl -fsS "http://127.0.0.1:$KWOK_PORT/healthz"
  t=$(now_ms); log "kwok ready: $(elapsed $((t - s))) s"; s=$t

  if (( NODES > 0 )); then
    write_nodes | "$bin/kubectl" --kubeconfig="$kc" apply -f - >/dev/null
    # KWOK readies nodes at its own pace: allow a minute plus 0.1 s a node (1000 nodes: 160 s).
    # One list per poll counts the Ready ones (`kubectl wait` goes through the nodes one at a
    # time: 9 minutes for 5000 nodes).
    local ready=0 deadline=$(( $(now_ms) + (60 + NODES / 10) * 1000 ))
    while :; do
      ready=$("$bin/kubectl" --kubeconfig="$kc" get nodes -l type=kwok \
        -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
        grep -c '^True$' || true)
      (( ready >= NODES )) && break
      (( $(now_ms) < deadline )) ||
        { tail_log kwok; stop_all; die "simulated nodes did not become Ready ($ready of $NODES)"; }
      sleep 1
    done
  fi
  # KCM's service-account controller creates "default" in each namespace; Pods cannot be created before it.
  local deadline=$(( $(now_ms) + 30000 ))
  until "$bin/kubectl" --kubeconfig="$kc" -n default get serviceaccount default >/dev/null 2>&1; do
    (( $(now_ms) < deadline )) || { tail_log kube-controller-manager; stop_all; die "no default ServiceAccount"; }
    sleep 0.2
  done
  t=$(now_ms); log "$NODES nodes Ready: $(elapsed $((t - s))) s"
  case ${REAL_NODES:-0} in
    0) ;;
    1) DROP_E2E_STATE=$STATE "$HERE/realnode.sh" up >/dev/null || { stop_all; die "the real node did not start"; }
       t=$(now_ms); log "real node Ready" ;;
    *) die "--real-nodes: 0 or 1 (a real kubelet uses fixed paths of the machine)" ;;
  esac
  log "up in $(elapsed $((t - t0))) s"
  echo "export KUBECONFIG=$kc"
}

stop_all() {
  local i name pid f
  # The real node first: its Pods go through the API server, and it leaves machine state to restore.
  [[ -d "$STATE/realnode" ]] && { DROP_E2E_STATE=$STATE "$HERE/realnode.sh" down || true; }
  # Processes that joined the cluster (e.g. the demo's operator) stop first.
  for f in "$STATE"/pids/*; do
    name=$(basename "$f")
    [[ "$name" == *.exe || " ${COMPONENTS[*]} " == *" $name "* ]] && continue
    if alive "$name"; then kill -TERM "$(pid_of "$name")" 2>/dev/null || true; fi
  done
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    name=${COMPONENTS[$i]}
    alive "$name" || continue
    pid=$(pid_of "$name")
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$(( $(now_ms) + 10000 ))
    while kill -0 "$pid" 2>/dev/null && (( $(now_ms) < deadline )); do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [[ -f "$STATE/ports.env" ]]; then
    # shellcheck disable=SC1091
    local data; data=$(. "$STATE/ports.env"; echo "$ETCD_DATA")
    [[ "$data" == /dev/shm/drop-e2e-* ]] && rm -rf "$data"
  fi
}

down() {
  [[ -d "$STATE" ]] || { log "nothing to stop"; return 0; }
  stop_all
  rm -rf "$STATE"
  log "down"
}

status() {
  local c rc=0
  for c in "${COMPONENTS[@]}"; do
    if alive "$c"; then echo "$c: running (pid $(pid_of "$c"))"; else echo "$c: stopped"; rc=1; fi
  done
  return $rc
}

# `up`, started again (with new ports) when a component could not bind its port: a port chosen free
# can be taken before the component binds it, by another cluster starting at the same time or as a
# client's ephemeral port. At most three attempts; any other failure ends at once.
up_retrying() {
  local attempt
  for attempt in 1 2 3; do
    ( up "$@" ) && return 0
    grep -qs "address already in use" "$STATE"/logs/*.log || return 1
    log "a port was taken before its component could bind it; starting again (attempt $((attempt + 1)) of 3)"
  done
  return 1
}

# Reuse a healthy cluster; otherwise clean up whatever is left and start afresh. Serialised by a lock so
# parallel test processes end up sharing one cluster.
ensure() {
  mkdir -p "$(dirname "$STATE")"
  exec 8>"$STATE.lock"
  flock 8
  if status >/dev/null 2>&1 && [[ -f "$STATE/kubeconfig" ]]; then
    echo "export KUBECONFIG=$STATE/kubeconfig"
    return 0
  fi
  [[ -d "$STATE" ]] && stop_all
  up_retrying "$@"
}

# Stops one component and starts it again with the same command line (same ports, same data), as
# an upgrade or a crash-and-restart would; waits until it is healthy again. For the fault tests.
restart() {
  local name=${1:-}
  [[ -f "$STATE/pids/$name.cmd" ]] || die "no $name in $STATE to restart"
  if alive "$name"; then
    local pid; pid=$(pid_of "$name")
    kill "$pid"
    local deadline=$(( $(now_ms) + 30000 ))
    while alive "$name"; do
      (( $(now_ms) < deadline )) || { kill -9 "$pid" 2>/dev/null || true; }
      sleep 0.1
    done
  fi
  local cmdline; cmdline=$(cat "$STATE/pids/$name.cmd")
  eval "start $name $cmdline"
  case "$name" in
    kube-apiserver)
      local p="$STATE/pki" port
      port=$(grep -o 'https://127.0.0.1:[0-9]*' "$STATE/kubeconfig" | head -1 | sed 's/.*://')
      wait_for kube-apiserver 120 curl -fsS --cacert "$p/ca.crt" --cert "$p/admin.crt" --key "$p/admin.key" \
        "https://127.0.0.1:$port/readyz" ;;
    *) sleep 1; alive "$name" || { tail_log "$name"; die "$name exited after its restart"; } ;;
  esac
  log "$name restarted"
}

cmd=${1:-}; shift || true
case "$cmd" in
  up) up_retrying "$@" ;;
  ensure) ensure "$@" ;;
  down) down ;;
  env) [[ -f "$STATE/kubeconfig" ]] || die "not up"; echo "export KUBECONFIG=$STATE/kubeconfig" ;;
  status) status ;;
  logs) [[ -n "${1:-}" ]] || die "usage: $0 logs COMPONENT"; cat "$STATE/logs/$1.log" ;;
  restart) restart "$@" ;;
  *) die "usage: $0 up [--nodes N] [--real-nodes 0|1] | ensure [--nodes N] | down | env | status | logs COMPONENT | restart COMPONENT" ;;
esac
