#!/usr/bin/env bash
# Runs every test of the workspace against a fresh local control plane, and stops it afterwards.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
start=$SECONDS
# The disk is shared with other jobs and is sometimes nearly full: say how much is free, so a
# failure for want of space shows as such.
free_disk() { df -h --output=avail "$REPO" | tail -1 | tr -d ' '; }
echo "[test] free disk at the start: $(free_disk)" >&2
# A CI run builds once from nothing: incremental compilation data (about 1 GB) would never be used.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi
# Everything is built first; the cluster tool is one of the e2e crate's binaries (the tests'
# own code for the cluster, from a shell).
cargo test --workspace --no-run "$@"
echo "[test] built in $((SECONDS - start)) s" >&2
CLUSTER="${CARGO_TARGET_DIR:-$REPO/target}/debug/cluster"
"$CLUSTER" down >/dev/null 2>&1 || true
trap '"$CLUSTER" down >/dev/null 2>&1 || true' EXIT
"$CLUSTER" ensure >/dev/null
echo "[test] control plane up after $((SECONDS - start)) s" >&2
cargo test --workspace --no-fail-fast "$@"
echo "[test] all tests finished in $((SECONDS - start)) s; free disk: $(free_disk)" >&2
