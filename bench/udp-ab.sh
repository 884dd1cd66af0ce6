#!/usr/bin/env bash
# A/B of the udp backend: one or more weft binaries (each optionally with VAR=VALUE settings,
# "BINARY:VAR=VALUE,VAR=VALUE") alternated round by round, each in a fresh 2-node `weft lab`
# with a pod per node; one iperf3 run pod to pod per round and entry, with the machine's context
# switches per second and CPU seconds per GB moved. Alternating cancels the drift of a shared
# machine that back-to-back runs of one build and then the other would not.
# Usage: bench/udp-ab.sh [-r ROUNDS] [-t SECONDS] [-P STREAMS] [-b BACKEND] ENTRY...
#   e.g. bench/udp-ab.sh -r 4 /tmp/weft-before target/release/weft
#        bench/udp-ab.sh target/release/weft:WEFT_SOMETHING=1 target/release/weft
set -euo pipefail
rounds=3 secs=4 streams=1 backend=udp
while getopts "r:t:P:b:" o; do
    case "$o" in
        r) rounds="$OPTARG" ;; t) secs="$OPTARG" ;; P) streams="$OPTARG" ;; b) backend="$OPTARG" ;;
        *) sed -n '2,9p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { sed -n '2,9p' "$0"; exit 2; }
lab="wab$$"
current=""
cleanup() { [ -n "$current" ] && "$current" lab down --name "$lab" >/dev/null 2>&1 || true; }
trap cleanup EXIT
busy() { awk '/^cpu / {print ($2 + $3 + $4 + $7 + $8 + $9)}' /proc/stat; }
switches() { awk '/^ctxt/ {print $2}' /proc/stat; }
echo "| round | entry | Gbit/s | retransmits | context switches/s | CPU s/GB |"
echo "|---:|---|---:|---:|---:|---:|"
for round in $(seq "$rounds"); do
    for entry in "$@"; do
        bin="${entry%%:*}" settings=""
        [ "$entry" != "$bin" ] && settings="${entry#*:}"
        current="$bin"
        env ${settings//,/ } "$bin" lab up --name "$lab" --backend "$backend" --nodes 2 --pods 1 >/dev/null
        addr=$("$bin" lab show --name "$lab" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pods"][1]["address"])')
        ip netns exec "$lab-node2-pod1" iperf3 -s -B "$addr" -1 -D >/dev/null 2>&1
        sleep 0.3
        c1=$(switches) u1=$(busy)
        out=$(ip netns exec "$lab-node1-pod1" iperf3 -c "$addr" -t "$secs" -P "$streams" -J)
        c2=$(switches) u2=$(busy)
        python3 -c '
import json, sys
e = json.loads(sys.argv[1])["end"]
gb = e["sum_received"]["bytes"] / 1e9
secs, c1, c2, u1, u2 = map(float, sys.argv[5:10])
print("| %s | %s | %.2f | %d | %d | %.2f |" % (sys.argv[2], sys.argv[3], e["sum_received"]["bits_per_second"] / 1e9,
      e["sum_sent"].get("retransmits", 0), (c2 - c1) / secs, (u2 - u1) / 100 / gb))
' "$out" "$round" "$entry" "" "$secs" "$c1" "$c2" "$u1" "$u2"
        "$bin" lab down --name "$lab" >/dev/null
        current=""
    done
done
