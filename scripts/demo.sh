#!/usr/bin/env bash
# The README's run command: set-up and build, then
#   1. pretrain configs/demo.json on the brain MRI that Debian's mricron-data installs
#      (about three minutes on 2 cores; live progress line),
#   2. reconstruct the held-out volume (ch2bet) into NIfTI files and runs/demo/recon/montage.png,
#   3. export the encoder for MONAI's ViT (runs/demo/encoder_vit.pt + .json).
# Results go to runs/demo/, which is replaced on every run. Extra arguments go to mae-pretrain
# (e.g. --set train.max_steps=100 for a quicker look).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
cd "$root"

"$root/scripts/build.sh"
rm -rf runs/demo
"$build/apps/mae-pretrain" --config configs/demo.json "$@"
"$build/apps/mae-reconstruct" --checkpoint runs/demo --input /usr/share/mricron/templates/ch2bet.nii.gz \
  --out runs/demo/recon
"$build/apps/mae-export" --checkpoint runs/demo --format monai-vit --out runs/demo/encoder_vit.pt
echo
echo "demo: montage    runs/demo/recon/montage.png"
echo "demo: metrics    runs/demo/metrics.jsonl, runs/demo/recon/metrics.json"
echo "demo: encoder    runs/demo/encoder_vit.pt (load notes in runs/demo/encoder_vit.json)"
