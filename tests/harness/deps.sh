#!/usr/bin/env bash
# Installs the Debian packages the harness and the e2e suites use, if any is missing.
set -euo pipefail
need=()
# prometheus (with promtool) and docker-registry are the real servers the discovery suites query;
# containerd, runc, the CNI plugins and a static busybox (for the images it runs) make the real node;
# lua5.4 runs the Argo CD health checks (deploy/argocd) against real objects.
for pair in openssl:openssl curl:curl python3:python3 flock:util-linux setsid:util-linux \
  prometheus:prometheus promtool:prometheus docker-registry:docker-registry htpasswd:apache2-utils \
  containerd:containerd ctr:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins \
  busybox:busybox-static lua5.4:lua5.4; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "[deps] installing: ${need[*]}" >&2
  mapfile -t need < <(printf "%s\n" "${need[@]}" | sort -u)
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "[deps] error: Go >= 1.26 is required to build the control-plane binaries" >&2; exit 1; }
command -v cargo >/dev/null || { echo "[deps] error: a Rust toolchain (cargo) is required" >&2; exit 1; }
