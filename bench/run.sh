#!/usr/bin/env bash
# Runs the benchmark suite on loopback and prints the result tables. Usage: bench/run.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
quick=false
[ "${1:-}" = "--quick" ] && quick=true
ulimit -n 65536 2>/dev/null || true

waiters=1000
$quick && waiters=300

echo "== machine: $(nproc) cores, $(uname -srm)"
echo "== building (release)"
cargo build --release --quiet --examples

echo
echo "== webhook fan-in"
./target/release/examples/bench_webhooks "$waiters" 2000
