# Shared by the benchmark scripts (sourced): needs $runs and $secs ($weft and $lab for weft_lab).

# iperf3 from namespace $1 to address $2 (server in namespace $3); prints Gbit/s (median of runs).
measure() {
    local client="$1" addr="$2" server="$3" results=()
    for _ in $(seq "$runs"); do
        ip netns exec "$server" iperf3 -s -B "$addr" -1 -D >/dev/null 2>&1
        sleep 0.2
        results+=("$(ip netns exec "$client" iperf3 -c "$addr" -t "$secs" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')")
    done
    printf '%s\n' "${results[@]}" | sort -n | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR+1)/2)]}'
}

# The firewall weft's agent keeps, by hand in node namespace $1 (forward accept for the pod
# network, masquerade leaving it).
hand_firewall() {
    ip netns exec "$1" nft -f - <<'NFT'
table ip hand {
    chain forward {
        type filter hook forward priority 0; policy accept;
        ip saddr 198.19.0.0/16 accept
        ip daddr 198.19.0.0/16 accept
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        meta mark & 0x4000 == 0x4000 return
        ip saddr 198.19.0.0/16 ip daddr 198.19.0.0/16 return
        ip saddr 198.19.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
        ip saddr != 198.19.0.0/16 ip daddr 198.19.0.0/16 masquerade fully-random
    }
}
NFT
}

# A two-node `weft lab` on backend $1 with a pod each: pod-to-pod Gbit/s (median of runs).
weft_lab() {
    local backend="$1"
    "$weft" lab up --name "$lab" --backend "$backend" --nodes 2 --pods 1 >/dev/null
    local addr; addr=$("$weft" lab show --name "$lab" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pods"][1]["address"])')
    measure "$lab-node1-pod1" "$addr" "$lab-node2-pod1"
    "$weft" lab down --name "$lab" >/dev/null
}

# Two nodes by hand on a switch: namespaces $1sw (bridge sw0), $1n1 and $1n2 (eth0 at 198.18.0.2
# and .3, forwarding on) and empty pod namespaces $1p1 and $1p2; hand_nodes_down removes them.
hand_nodes() {
    local p="$1"
    ip netns add "${p}sw"; ip -n "${p}sw" link add sw0 type bridge; ip -n "${p}sw" link set sw0 up
    for i in 1 2; do
        local n="${p}n$i"
        ip netns add "$n"; ip netns add "${p}p$i"
        ip -n "${p}sw" link add "s$i" type veth peer name eth0 netns "$n"
        ip -n "${p}sw" link set "s$i" master sw0 up
        ip -n "$n" addr add "198.18.0.$((1 + i))/16" dev eth0; ip -n "$n" link set eth0 up; ip -n "$n" link set lo up
        ip netns exec "$n" sysctl -qw net.ipv4.ip_forward=1
    done
}

hand_nodes_down() {
    for ns in "$1p1" "$1p2" "$1n1" "$1n2" "$1sw"; do ip netns delete "$ns"; done
}
