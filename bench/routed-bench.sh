#!/usr/bin/env bash
# Routed mode (the bgp backend), measured in one run on this machine:
#  1. pod-to-pod TCP across two nodes: a `weft lab --backend bgp`, a host-gw lab, and the same
#     routed path built by hand (veth, /32 routes, proxy ARP, 169.254.1.1; a route per peer
#     block) — target: bgp within 5% of hand-built;
#  2. one pod's ADD: weft's routed + host-local, weft's bridge + host-local, and the reference
#     bridge + host-local — target: routed within 1.2x of weft's bridge;
#  3. convergence in a 50-node bgp lab: from a node's new block being claimed (the claim in its
#     agent's log) to every other node routing it (`ip monitor` in each node) — target < 1 s.
# All in namespaces this script makes and removes. Needs root, iperf3 and the reference plugins.
# Usage: bench/routed-bench.sh [SECONDS] [RUNS] [NODES]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-3}"
runs="${2:-5}"
nodes="${3:-50}"
export TZ=UTC
cargo build --release -q -p weft --bin weft
weft="$PWD/target/release/weft"
tag="wrb$$"
lab="${tag}l"
tmp=$(mktemp -d)

cleanup() {
    "$weft" lab down --name "$lab" >/dev/null 2>&1 || true
    pkill -f "iperf3 -s -B 198.1" 2>/dev/null || true
    pkill -f "ip -ts monitor route" 2>/dev/null || true
    for ns in $(ip netns list | awk '{print $1}' | grep "^$tag" || true); do ip netns delete "$ns"; done
    rm -rf "$tmp"
}
trap cleanup EXIT

source bench/lib.sh

# The routed path by hand: two nodes on a switch, one pod each behind a veth with the fixed
# MAC and proxy ARP, the pod's /32 routed to it, the peer's block routed via the peer.
hand_built_routed() {
    local p="${tag}h"
    hand_nodes "$p"
    for i in 1 2; do
        local n="${p}n$i" pod="${p}p$i" ip="198.19.$((10 + i)).2"
        ip -n "$n" link add veth0 address ee:ee:ee:ee:ee:ee type veth peer name eth0 netns "$pod"
        ip -n "$n" link set veth0 up
        ip netns exec "$n" sysctl -qw net.ipv4.conf.veth0.proxy_arp=1
        ip -n "$n" route add "$ip/32" dev veth0 scope link
        ip -n "$pod" addr add "$ip/32" dev eth0; ip -n "$pod" link set eth0 up; ip -n "$pod" link set lo up
        ip -n "$pod" route add 169.254.1.1 dev eth0 scope link
        ip -n "$pod" route add default via 169.254.1.1 dev eth0
        # As the routed plugin does: each end knows the other's MAC (no ARP either way; proxy
        # ARP would need a route to 169.254.1.1 elsewhere on the node).
        ip -n "$pod" neigh add 169.254.1.1 lladdr ee:ee:ee:ee:ee:ee dev eth0 nud permanent
        ip -n "$n" neigh add "$ip" lladdr "$(ip -n "$pod" -j link show eth0 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["address"])')" dev veth0 nud permanent
        hand_firewall "$n"
    done
    ip -n "${p}n1" route add 198.19.12.0/26 via 198.18.0.3
    ip -n "${p}n2" route add 198.19.11.0/26 via 198.18.0.2
    measure "${p}p1" "198.19.12.2" "${p}p2"
    hand_nodes_down "$p"
}

# One pod's ADD (and its DEL, not timed), $runs x 30 pods, for three chains; prints the table.
add_latency() {
    local bin="$tmp/bin" node="${tag}a"
    mkdir -p "$bin"
    for p in bridge host-local routed; do ln -sf "$weft" "$bin/$p"; done
    ip netns add "$node"
    ip netns exec "$node" python3 - "$bin" "$tmp" "$tag" "$runs" <<'PY'
import json, os, statistics, subprocess, sys, time
bin_dir, tmp, tag, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
chains = {
    "weft routed + host-local": (bin_dir, {"type": "routed", "mtu": 1500}),
    "weft bridge + host-local": (bin_dir, {"type": "bridge", "bridge": "cni0", "isGateway": True}),
    "reference bridge + host-local": ("/usr/lib/cni", {"type": "bridge", "bridge": "cni1", "isGateway": True}),
}
def call(path, cmd, cid, netns, conf):
    env = dict(os.environ, CNI_COMMAND=cmd, CNI_CONTAINERID=cid, CNI_NETNS=netns, CNI_IFNAME="eth0",
               CNI_PATH=path, WEFT_CNI_LOCK_DIR=f"{tmp}/locks")
    t = time.perf_counter()
    out = subprocess.run([f"{path}/{conf['type']}"], input=json.dumps(conf).encode(), env=env, capture_output=True)
    if out.returncode != 0:
        sys.exit(f"{cmd} failed: {out.stdout.decode()} {out.stderr.decode()}")
    return time.perf_counter() - t
medians = {}
for k, (name, (path, plugin)) in enumerate(chains.items()):
    conf = dict(plugin, cniVersion="1.0.0", name=f"bench{k}",
                ipam={"type": "host-local", "dataDir": f"{tmp}/ipam{k}", "ranges": [[{"subnet": f"198.19.{100 + k}.0/24"}]]})
    times = []
    for r in range(runs):
        pods = [f"{tag}c{k}r{r}p{i}" for i in range(30)]
        for pod in pods:
            subprocess.run(["ip", "netns", "add", pod], check=True)
        for pod in pods:
            times.append(call(path, "ADD", pod, f"/var/run/netns/{pod}", conf))
        for pod in pods:
            call(path, "DEL", pod, f"/var/run/netns/{pod}", conf)
            subprocess.run(["ip", "netns", "delete", pod], check=True)
    medians[name] = statistics.median(times) * 1000
bridge = medians["weft bridge + host-local"]
print("| chain | ADD median (ms) | / weft bridge |")
print("|---|---:|---:|")
for name, m in medians.items():
    print(f"| {name} | {m:.2f} | {m / bridge:.2f} |")
PY
    ip netns delete "$node"
}

# A node of a $nodes-node bgp lab (blocks of /28) claims a second block: how long until every
# other node routes it.
convergence() {
    "$weft" lab up --name "$lab" --backend bgp --nodes "$nodes" --pods 1 --block-size 28 >/dev/null
    local dir="/run/weft-lab/$lab" i monitors=()
    for i in $(seq 2 "$nodes"); do
        ip -n "$lab-node$i" -ts monitor route >"$tmp/mon$i" 2>/dev/null &
        monitors+=("$!")
    done
    sleep 1
    # Eight more pods on node1 (nine of a /28's fifteen addresses): the keeper claims another.
    local conf; conf=$(printf '{"cniVersion":"1.0.0","name":"lab","type":"weft","subnetFile":"%s","dataDir":"%s"}' "$dir/node1/subnet.env" "$dir/node1/cni")
    for i in $(seq 101 108); do
        ip netns add "$lab-node1-pod$i"
        echo "$conf" | ip netns exec "$lab-node1" env CNI_COMMAND=ADD CNI_CONTAINERID="x$i" CNI_NETNS="/var/run/netns/$lab-node1-pod$i" \
            CNI_IFNAME=eth0 CNI_PATH="$dir/bin" WEFT_CNI_LOCK_DIR="$dir/node1/cni-locks" "$dir/bin/weft" >/dev/null
    done
    local claimed=""
    for _ in $(seq 100); do
        claimed=$(grep -h "claimed block" "$dir/node1/agent.log" | tail -1 || true)
        [ -n "$claimed" ] && break
        sleep 0.05
    done
    [ -n "$claimed" ] || { echo "node1 claimed no block"; return 1; }
    sleep 3
    kill "${monitors[@]}" 2>/dev/null || true
    wait "${monitors[@]}" 2>/dev/null || true
    python3 - "$claimed" "$tmp" "$nodes" <<'PY'
import datetime, re, sys
line, tmp, nodes = sys.argv[1], sys.argv[2], int(sys.argv[3])
at = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
block = re.search(r"claimed block (\S+)", line).group(1)
delays = []
for i in range(2, nodes + 1):
    seen = None
    for l in open(f"{tmp}/mon{i}"):
        m = re.match(r"\[(\S+)\]\s*(\S+)", l)
        if m and m.group(2) == block and "proto 202" in l:
            seen = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
            break
    if seen is None:
        sys.exit(f"node{i} never routed {block}")
    delays.append((seen - at).total_seconds() * 1000)
delays.sort()
print(f"block {block} claimed by node1: routed by all {nodes - 1} other nodes after {delays[-1]:.0f} ms "
      f"(median node {delays[len(delays) // 2]:.0f} ms)")
PY
    "$weft" lab down --name "$lab" >/dev/null
}

echo "weft $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, iperf3 ${secs}s x ${runs} runs (median)"
echo "Pod-to-pod TCP, one stream:"
echo "| path | Gbit/s | / hand-built routed |"
echo "|---|---:|---:|"
h=$(hand_built_routed)
for backend in bgp host-gw; do
    w=$(weft_lab "$backend")
    python3 -c "print('| weft $backend | $w | %.3f |' % ($w / $h))"
done
echo "| hand-built routed | $h | 1.000 |"
echo
echo "One pod's ADD ($runs x 30 pods each):"
add_latency
echo
echo "Convergence, $nodes nodes:"
convergence
