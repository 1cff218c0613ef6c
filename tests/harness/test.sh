#!/usr/bin/env bash
# Runs every test of the workspace against a fresh local control plane, and stops it afterwards.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
start=$SECONDS
"$HERE/cluster.sh" down >/dev/null 2>&1 || true
trap '"$HERE/cluster.sh" down >/dev/null 2>&1 || true' EXIT
"$HERE/cluster.sh" ensure >/dev/null
echo "[test] control plane up after $((SECONDS - start)) s" >&2
cargo test --workspace --no-fail-fast "$@"
echo "[test] all tests finished in $((SECONDS - start)) s" >&2
