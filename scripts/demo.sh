#!/usr/bin/env bash
# The README's first command: builds weft and shows its main job — a 3-node VXLAN cluster on this
# machine (the embedded lease store), every pod connected to every other one, a node's routes,
# FDB and neighbours as `ip`/`bridge` show them — then takes the cluster down again. Needs root;
# everything lives in network namespaces it makes and removes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/demo.sh: the lab creates network namespaces and needs root" >&2
    exit 1
fi
# Building the etcd client needs protoc.
if ! command -v protoc >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q protobuf-compiler libprotobuf-dev nftables
fi
command -v nft >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q nftables; }
cargo build --release
weft=target/release/weft
trap '"$weft" lab down --name demo >/dev/null 2>&1 || true' EXIT
"$weft" lab up --name demo --nodes 3 --pods 2
"$weft" lab check --name demo
"$weft" lab show --name demo node1
