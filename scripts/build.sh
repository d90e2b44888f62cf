#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), then configures and builds mae3d into build/.
# Usage: scripts/build.sh [extra cmake -D options...]   (BUILD_DIR overrides the folder)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"

"$root/scripts/setup.sh"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
# Each LibTorch translation unit needs ~1 GiB to compile; two jobs fit every machine we target.
ninja -C "$build" -j "${JOBS:-$(nproc)}"
