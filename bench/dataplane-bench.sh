#!/usr/bin/env bash
# Pod-to-pod TCP throughput (iperf3) across two nodes, for weft's vxlan and host-gw backends
# (a `weft lab`), against the same path built by hand with `ip` commands (the kernel's limit)
# and against node-to-node over the bare underlay; then the udp backend (userspace forwarder)
# beside vxlan and the underlay, with 1 and 4 streams and the machine's CPU seconds per GB
# moved. All in namespaces this script makes and removes. Needs root and iperf3.
# Usage: bench/dataplane-bench.sh [SECONDS] [RUNS] [udp]   (udp: the second table only)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-3}"
runs="${2:-5}"
only="${3:-}"
cargo build --release -q -p weft --bin weft
weft="$PWD/target/release/weft"
tag="wdb$$"
lab="${tag}l"

cleanup() {
    "$weft" lab down --name "$lab" >/dev/null 2>&1 || true
    pkill -f "iperf3 -s -B 198.1" 2>/dev/null || true
    for ns in $(ip netns list | awk '{print $1}' | grep "^$tag" || true); do ip netns delete "$ns"; done
}
trap cleanup EXIT

source bench/lib.sh

# The same two-node path by hand: switch, two nodes, a bridge with one pod each, and the backend.
hand_built() {
    local backend="$1" p="${tag}h"
    hand_nodes "$p"
    for i in 1 2; do
        local n="${p}n$i" pod="${p}p$i" sub="198.19.$((10 + i))"
        local mtu=1500
        [ "$backend" = vxlan ] && mtu=1450
        ip -n "$n" link add cni0 mtu "$mtu" type bridge; ip -n "$n" addr add "$sub.1/24" dev cni0; ip -n "$n" link set cni0 up
        ip -n "$n" link add veth0 mtu "$mtu" type veth peer name eth0 netns "$pod"
        ip -n "$n" link set veth0 master cni0 up
        ip -n "$pod" addr add "$sub.2/24" dev eth0; ip -n "$pod" link set eth0 up; ip -n "$pod" link set lo up
        ip -n "$pod" route add default via "$sub.1"
        if [ "$backend" = vxlan ]; then
            ip -n "$n" link add weft.1 mtu 1450 type vxlan id 1 local "198.18.0.$((1 + i))" dev eth0 dstport 8472 nolearning
            ip -n "$n" addr add "$sub.0/32" dev weft.1; ip -n "$n" link set weft.1 up
        fi
    done
    # The same firewall as weft's agent keeps (forward accept, masquerade leaving the network).
    for i in 1 2; do hand_firewall "${p}n$i"; done
    for i in 1 2; do
        local n="${p}n$i" j=$((3 - i)); local peer_sub="198.19.$((10 + j))" peer_ip="198.18.0.$((1 + j))"
        if [ "$backend" = vxlan ]; then
            local mac; mac=$(ip -n "${p}n$j" -j link show weft.1 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["address"])')
            ip -n "$n" neigh replace "$peer_sub.0" lladdr "$mac" dev weft.1 nud permanent
            bridge -n "$n" fdb replace "$mac" dev weft.1 dst "$peer_ip" self permanent
            ip -n "$n" route replace "$peer_sub.0/24" via "$peer_sub.0" dev weft.1 onlink
        else
            ip -n "$n" route replace "$peer_sub.0/24" via "$peer_ip" dev eth0
        fi
    done
    measure "${p}p1" "198.19.12.2" "${p}p2"
    hand_nodes_down "$p"
}

underlay() {
    "$weft" lab up --name "$lab" --nodes 2 --pods 0 >/dev/null
    measure "$lab-node1" "198.18.0.3" "$lab-node2"
    "$weft" lab down --name "$lab" >/dev/null
}

# Busy CPU time of the whole machine so far, in seconds (all but idle and iowait).
cpu_busy() {
    awk '/^cpu / {print ($2 + $3 + $4 + $7 + $8 + $9) / 100}' /proc/stat
}

# iperf3 with $4 streams from namespace $1 to address $2 (server in $3): "Gbit/s CPU-s/GB" of
# the median run by throughput.
measure_cpu() {
    local client="$1" addr="$2" server="$3" streams="$4" results=()
    for _ in $(seq "$runs"); do
        ip netns exec "$server" iperf3 -s -B "$addr" -1 -D >/dev/null 2>&1
        sleep 0.2
        local before after json
        before=$(cpu_busy)
        json=$(ip netns exec "$client" iperf3 -c "$addr" -t "$secs" -P "$streams" -J)
        after=$(cpu_busy)
        results+=("$(python3 -c 'import json,sys; e=json.loads(sys.argv[1])["end"]["sum_received"]; gb=e["bytes"]/1e9; print("%.2f %.2f" % (e["bits_per_second"]/1e9, (float(sys.argv[3])-float(sys.argv[2]))/gb))' "$json" "$before" "$after")")
    done
    printf '%s\n' "${results[@]}" | sort -n | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}'
}

# The udp backend beside vxlan and the bare underlay: 1 and 4 streams.
userspace_table() {
    echo
    echo "| path | 1 stream (Gbit/s) | CPU s/GB | 4 streams (Gbit/s) | CPU s/GB | Gbit/s / vxlan's (1, 4) |"
    echo "|---|---:|---:|---:|---:|---:|"
    local -A one four
    "$weft" lab up --name "$lab" --nodes 2 --pods 0 >/dev/null
    one[underlay]=$(measure_cpu "$lab-node1" "198.18.0.3" "$lab-node2" 1)
    four[underlay]=$(measure_cpu "$lab-node1" "198.18.0.3" "$lab-node2" 4)
    "$weft" lab down --name "$lab" >/dev/null
    for backend in vxlan udp; do
        "$weft" lab up --name "$lab" --backend "$backend" --nodes 2 --pods 1 >/dev/null
        local addr; addr=$("$weft" lab show --name "$lab" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pods"][1]["address"])')
        one[$backend]=$(measure_cpu "$lab-node1-pod1" "$addr" "$lab-node2-pod1" 1)
        four[$backend]=$(measure_cpu "$lab-node1-pod1" "$addr" "$lab-node2-pod1" 4)
        "$weft" lab down --name "$lab" >/dev/null
    done
    for path in underlay vxlan udp; do
        python3 -c '
import sys
o, f, vo, vf, name = sys.argv[1].split(), sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split(), sys.argv[5]
label = "node to node, bare underlay" if name == "underlay" else "pod to pod, " + name
print("| %s | %s | %s | %s | %s | %.2f, %.2f |" % (label, o[0], o[1], f[0], f[1], float(o[0]) / float(vo[0]), float(f[0]) / float(vf[0])))
' "${one[$path]}" "${four[$path]}" "${one[vxlan]}" "${four[vxlan]}" "$path"
    done
}

echo "weft $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, iperf3 ${secs}s x ${runs} runs (median)"
if [ "$only" = udp ]; then
    userspace_table
    exit 0
fi
echo "One TCP stream:"
bare=$(underlay)
echo "| path | weft (Gbit/s) | hand-built (Gbit/s) | weft/hand-built | weft/bare underlay ($bare Gbit/s) |"
echo "|---|---:|---:|---:|---:|"
for backend in vxlan host-gw; do
    w=$(weft_lab "$backend")
    h=$(hand_built "$backend")
    python3 -c "print('| pod to pod, $backend | $w | $h | %.3f | %.3f |' % ($w / $h, $w / $bare))"
done
userspace_table
