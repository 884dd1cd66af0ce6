#!/usr/bin/env bash
# Builds weft the way it ships: one static, position-dependent executable with no runtime
# dependencies, for copying onto nodes (`weft cni install --dir /opt/cni/bin`). A static non-PIE
# binary needs no dynamic loader and no relocations at start, which is most of what a plugin
# call costs beyond the kernel's own work. Prints the path of the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
host=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps these flags off build scripts and proc macros, which must stay dynamic.
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
    cargo build --release -q -p weft --bin weft --target "$host"
echo "$PWD/target/$host/release/weft"
