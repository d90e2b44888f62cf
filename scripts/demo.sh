#!/usr/bin/env bash
# The README's run command: set-up and build, the demo's template volumes (scripts/demo_data.sh), then
#   1. pretrain configs/demo.json on T1 brain MRI installed offline: the ITK example subject and three
#      MNI152 templates (about two minutes on 2 cores; live progress line, a probe every 200 steps),
#   2. reconstruct the held-out subject (Colin27, ch2) into NIfTI files and runs/demo/recon/montage.png,
#   3. probe the encoder on that subject (mae-probe: grey matter / other brain fractions per patch,
#      pretrained vs random-init vs raw),
#   4. export the encoder for MONAI's ViT (runs/demo/encoder_vit.pt + .json).
# Results go to runs/demo/, which is replaced on every run. Extra arguments go to mae-pretrain
# (e.g. --set train.max_steps=100 for a quicker look).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
cd "$root"

"$root/scripts/build.sh"
"$root/scripts/demo_data.sh"
held_out=/usr/share/mricron/templates/ch2.nii.gz
labels=data/demo/volumes/colin27_tissue.nii.gz  # scripts/demo_data.sh: AAL regions (1), other brain (2)
rm -rf runs/demo
"$build/apps/mae-pretrain" --config configs/demo.json "$@"
"$build/apps/mae-reconstruct" --checkpoint runs/demo --input "$held_out" --out runs/demo/recon
"$build/apps/mae-probe" --checkpoint runs/demo --train "$held_out=$labels" --split checkerboard \
  --out runs/demo/probe.json
"$build/apps/mae-export" --checkpoint runs/demo --format monai-vit --out runs/demo/encoder_vit.pt
echo
echo "demo: montage    runs/demo/recon/montage.png (held-out subject: Colin27)"
echo "demo: metrics    runs/demo/metrics.jsonl, runs/demo/recon/metrics.json"
echo "demo: probe      runs/demo/probe.json (tissue fractions per patch of the held-out subject)"
echo "demo: encoder    runs/demo/encoder_vit.pt (load notes in runs/demo/encoder_vit.json)"
