#!/usr/bin/env bash
# Unpacks the header-only libraries a model-only build needs (nlohmann_json, CLI11) from Debian's
# packages into an ignored folder, for scripts/gpu_check.sh on a machine that has neither them nor a
# network. Run it on a Debian machine with apt; the folder then travels with the check. Nothing is
# installed: `apt-get download` fetches the .deb files and `dpkg-deb -x` unpacks them. Idempotent.
# Usage: scripts/gpu_deps.sh [DIR]   (default build-gpu-deps/ at the repository root)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$root/build-gpu-deps}"
packages=(nlohmann-json3-dev libcli11-dev)

# The config files the build looks for; both are relocatable (paths relative to the file).
have() {
  [ -f "$dir/usr/share/cmake/nlohmann_json/nlohmann_jsonConfig.cmake" ] &&
    [ -f "$dir/usr/share/cmake/CLI11/CLI11Config.cmake" ] &&
    [ -f "$dir/usr/include/nlohmann/json.hpp" ] && [ -f "$dir/usr/include/CLI/CLI.hpp" ]
}
if have; then
  echo "gpu_deps: $dir up to date" >&2
  exit 0
fi
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
  { echo "gpu_deps: needs apt-get and dpkg-deb (a Debian machine)" >&2; exit 2; }
mkdir -p "$dir/debs"
(
  cd "$dir/debs"
  # apt-get download works unprivileged; after a fresh container start the lists may be empty.
  if ! apt-get download "${packages[@]}" >&2; then
    echo "gpu_deps: apt-get download failed; refreshing the package lists (needs root)" >&2
    if [ "$(id -u)" = 0 ]; then apt-get update >&2; else sudo apt-get update >&2; fi
    apt-get download "${packages[@]}" >&2
  fi
)
for deb in "$dir"/debs/*.deb; do dpkg-deb -x "$deb" "$dir"; done
have || { echo "gpu_deps: unpacked, but the expected headers or CMake files are missing under $dir" >&2; exit 1; }
echo "gpu_deps: unpacked $(cd "$dir/debs" && ls ./*.deb | tr '\n' ' ')into $dir" >&2
