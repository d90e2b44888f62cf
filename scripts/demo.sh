#!/usr/bin/env bash
# The README's run command: set-up, build, then pretrain configs/demo.json on the brain MRI that
# Debian's mricron-data installs (a few minutes on 2 cores), reconstruct a validation volume into a
# montage and export the encoder for MONAI. Results go to runs/demo/ (replaced on every run).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
cd "$root"

"$root/scripts/build.sh"
rm -rf runs/demo
"$build/apps/mae-pretrain" --config configs/demo.json "$@"
