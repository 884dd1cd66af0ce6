#!/usr/bin/env bash
# BGP receivers compared on this machine in one run: the same sender feeds N /32 routes over one
# eBGP session to `weft bgp run --install` and to BIRD 2 (kernel protocol on); time until the
# kernel holds every route, time until every route is withdrawn again, resident memory, medians
# of RUNS runs, and the weft/BIRD ratio. Needs root and bird2.
# Usage: bench/bgp-bench.sh [RUNS [N...]]   (default: 3 runs of 1, 10000 and 100000 routes)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p weft --bin weft --example bgp_bench
export WEFT_BENCH_PREFIX="wbb$$"
cleanup() {
    for ns in $(ip netns list | awk '{print $1}' | grep "^$WEFT_BENCH_PREFIX" || true); do ip netns delete "$ns"; done
    pkill -f "/tmp/$WEFT_BENCH_PREFIX" 2>/dev/null || true
    rm -rf /tmp/"$WEFT_BENCH_PREFIX"*
}
trap cleanup EXIT
runs="${1:-3}"
shift || true
echo "weft $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(bird --version 2>&1 | head -1), $(nproc) cores, median of $runs runs"
target/release/examples/bgp_bench "$PWD/target/release/weft" "$runs" "$@"
