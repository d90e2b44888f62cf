#!/usr/bin/env bash
# The Python environment of the test suite: a venv over Debian's python3-torch (1.13.1) with the real
# MONAI and TensorBoard from PyPI, so that the compatibility tests load into MONAI's own classes.
# Prints the venv's python on stdout (progress on stderr). Idempotent: a venv that already has the
# pinned versions is reused. Usage: scripts/python_env.sh [VENV_DIR]   (default build/venv-py)
#
# MONAI 1.5.0 is installed with --no-deps: it declares torch>=2.4.1, but the classes the tests use
# (ViT, UNETR, MaskedAutoEncoderViT) import and run on Debian's torch 1.13, and a plain install would
# pull a second, multi-GB torch. TensorBoard keeps its own dependencies (protobuf, grpcio, ...).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$root/build/venv-py}"
monai_pin="monai==1.5.0"
pins=("einops==0.8.2" "tensorboard==2.21.0")

if [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$monai_pin" "${pins[@]}" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version
sys.exit(0 if all(version(p.split("==")[0]) == p.split("==")[1] for p in sys.argv[1:]) else 1)
PY
  echo "python_env: $venv up to date" >&2
else
  echo "python_env: creating $venv (Debian python3-torch + $monai_pin ${pins[*]})" >&2
  /usr/bin/python3 -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "$monai_pin" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}" >&2
fi
# The venv must see Debian's torch, not a wheel: the tests compare against the LibTorch we built with.
"$venv/bin/python" -c "import torch, monai, tensorboard; assert torch.__version__.startswith('1.13'), torch.__version__" >&2
echo "$venv/bin/python"
