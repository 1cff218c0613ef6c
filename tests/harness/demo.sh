#!/usr/bin/env bash
# The main job: bring up the local cluster with simulated nodes and show it.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIN=$("$HERE/tools.sh" ensure | tail -n1)
eval "$("$HERE/cluster.sh" ensure)"
"$BIN/kubectl" get nodes -o wide
echo
echo "Cluster is up. Use it with: export KUBECONFIG=$KUBECONFIG PATH=$BIN:\$PATH"
echo "Stop it with: make down"
