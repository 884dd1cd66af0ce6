#!/usr/bin/env bash
# Installs what the tests talk to (the reference CNI plugins, podman + runc, nftables, busybox for
# container root filesystems, etcd, strace) and runs the whole suite: formatting, lints, unit tests and the
# root integration tests on the real kernel. Every integration test works in network namespaces
# it creates and removes itself. Needs root (and apt for the packages).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: the integration tests create network namespaces and need root" >&2
    exit 1
fi

packages=(
    containernetworking-plugins # the reference plugins, for the differential tests
    nftables iptables iproute2  # nft for weft's rules; iptables-save to watch the reference's
    podman runc busybox-static  # a real container runtime, end to end
    etcd-server etcd-client     # a real etcd for the etcd lease store (and etcdctl to read it back)
    protobuf-compiler libprotobuf-dev # building the etcd client
    strace                      # the kill-point tests kill plugins at each system call
    ethtool                     # offloads off on an uplink, for the udp forwarder's kernel-cut sends
    bird2 gobgpd frr            # BGP peers for the speaker's interop tests
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
fi

cargo fmt --all -- --check
cargo clippy --all-targets -q -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "weft: %d passed, %d failed\n", p, f }' "$log"
