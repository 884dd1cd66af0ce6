#!/usr/bin/env bash
# Times `weft lab up`, a full `weft lab check` and `weft lab down` for labs of 10, 50 and 100
# nodes with one pod each (the release build, the embedded store), and the machine's neighbour
# table before and after (its table_fulls must not move). Needs root. Usage: bench/lab-bench.sh
# [RUNS] [SIZES...]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
shift || true
sizes=("${@:-10 50 100}")
read -r -a sizes <<< "${sizes[*]}"
cargo build --release -q -p weft
weft=target/release/weft
name="lb$$"
trap '$weft lab down --name "$name" >/dev/null 2>&1 || true' EXIT
fulls() {
    local sum=0 hex
    for hex in $(awk 'NR > 1 { print $NF }' /proc/net/stat/arp_cache); do sum=$((sum + 16#$hex)); done
    echo "$sum"
}
now() { date +%s%N; }
# Median of milliseconds, printed as seconds.
median() { sort -n | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.2f", m / 1000 }'; }
echo "weft $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, median of $runs runs, one pod per node"
echo "| nodes | up (s) | check, all pairs (s) | pairs | down (s) | table_fulls before → after |"
echo "|---:|---:|---:|---:|---:|---|"
for n in "${sizes[@]}"; do
    ups=(); checks=(); downs=()
    before=$(fulls)
    for _ in $(seq "$runs"); do
        t0=$(now); $weft lab up --name "$name" --nodes "$n" --pods 1 >/dev/null; t1=$(now)
        $weft lab check --name "$name" >/dev/null; t2=$(now)
        $weft lab down --name "$name" >/dev/null; t3=$(now)
        ups+=($(((t1 - t0) / 1000000))); checks+=($(((t2 - t1) / 1000000))); downs+=($(((t3 - t2) / 1000000)))
    done
    after=$(fulls)
    printf '| %d | %s | %s | %d | %s | %s → %s |\n' "$n" \
        "$(printf '%s\n' "${ups[@]}" | median)" "$(printf '%s\n' "${checks[@]}" | median)" $((n * (n - 1))) \
        "$(printf '%s\n' "${downs[@]}" | median)" "$before" "$after"
done
