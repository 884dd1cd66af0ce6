#!/usr/bin/env bash
# The agent's control plane facing 1000 peer leases (VXLAN backend, embedded store): initial sync
# time, lease-event-to-kernel latency (median, p99), resident memory. Needs root.
# Usage: bench/agent-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p weft --bin weft --example agent_bench
# The benchmark removes what it made; this also catches an aborted run.
export WEFT_BENCH_PREFIX="wab$$"
cleanup() {
    pkill -f "/tmp/$WEFT_BENCH_PREFIX" 2>/dev/null || true
    ip netns delete "$WEFT_BENCH_PREFIX" 2>/dev/null || true
    rm -rf "/tmp/$WEFT_BENCH_PREFIX"
}
trap cleanup EXIT
echo "weft $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores"
target/release/examples/agent_bench "$PWD/target/release/weft"
