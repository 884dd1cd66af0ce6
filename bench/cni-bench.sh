#!/usr/bin/env bash
# Compares weft's bridge + host-local chain with the reference plugins on this machine, in one
# run: ADD and DEL of 100 containers one after another, 50 at once, and with 3000 reservations
# already on disk. Prints medians and the weft/reference ratio. Needs root and the reference
# plugins (apt-get install containernetworking-plugins). Usage: bench/cni-bench.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
# The plugins are built the way they ship (scripts/build-static.sh): a static, position-dependent
# executable, as the reference's Go binaries are non-PIE; it starts 0.3-0.4 ms faster than a
# dynamically linked PIE.
host=$(rustc -vV | sed -n 's/^host: //p')
scripts/build-static.sh >/dev/null
cargo build --release -q -p weft --example cni_bench
bin=$(mktemp -d)
# The benchmark's own guards remove its namespaces; this catches an aborted run too.
export WEFT_BENCH_PREFIX="wb$$"
cleanup() {
    rm -rf "$bin" /tmp/"$WEFT_BENCH_PREFIX"*
    for ns in $(ip netns list | awk '{print $1}' | grep "^$WEFT_BENCH_PREFIX" || true); do ip netns delete "$ns"; done
}
trap cleanup EXIT
for p in bridge host-local portmap loopback ptp; do ln -s "$PWD/target/$host/release/weft" "$bin/$p"; done
echo "weft $(git rev-parse --short HEAD 2>/dev/null || echo '?'), reference: /usr/lib/cni ($(dpkg-query -W -f='${Version}' containernetworking-plugins 2>/dev/null || echo unknown)), $(nproc) cores, median of $runs runs"
target/release/examples/cni_bench --weft "$bin" --reference /usr/lib/cni --runs "$runs"
