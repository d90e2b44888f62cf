#!/usr/bin/env bash
# The test suite against LibTorch 2.x: the LibTorch inside PyPI's (CUDA-enabled) torch wheel, with
# Debian's ITK and the other Debian libraries as in scripts/test.sh.
#   1. a venv (build/venv-lt2, or $MAE3D_VENV) with the pinned torch, MONAI and TensorBoard;
#   2. configure + build mae3d against that LibTorch into build-lt2/ (or $LT2_BUILD_DIR), CUDA code
#      compiled with the machine's nvcc when there is one;
#   3. the whole ctest suite, the Python tests run with the venv's python.
# Usage: scripts/test_libtorch2.sh [ctest arguments...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MAE3D_VENV:-$root/build/venv-lt2}"
build="${LT2_BUILD_DIR:-$root/build-lt2}"
# torch 2.15.0 is the newest wheel on PyPI; MONAI 1.6.1 is the newest release and declares
# torch>=2.8, so it installs beside this torch without pulling another one.
pins=("torch==2.15.0" "monai==1.6.1" "einops==0.8.2" "tensorboard==2.21.0")

"$root/scripts/setup.sh"

t0=$(date +%s)
if [ -x "$venv/bin/python" ] && "$venv/bin/python" - "${pins[@]}" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version
pins = [p.split("==") for p in sys.argv[1:]]
sys.exit(0 if all(version(name).split("+")[0] == want for name, want in pins) else 1)
PY
  echo "test_libtorch2: $venv up to date (${pins[*]})"
else
  echo "test_libtorch2: installing ${pins[*]} into $venv (several GB on a fresh machine)"
  python=$(command -v python3.11 || command -v python3)
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
fi
t1=$(date +%s)

prefix=$("$venv/bin/python" -c "import torch; print(torch.utils.cmake_prefix_path)")
torch_root="$(cd "$prefix/../.." && pwd)"  # site-packages/torch
echo "test_libtorch2: torch $("$venv/bin/python" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda)")" \
  "($((t1 - t0)) s for the venv)"
cuda_args=()
if [ -z "$(command -v nvcc || true)" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  cuda_args+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
fi
# CMAKE_PREFIX_PATH (not only Torch_DIR): TorchConfig looks up libtorch.so by name, and the system
# paths would otherwise give Debian's 1.13 library.
mkdir -p "$build"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$torch_root" \
  -DMAE3D_PYTHON="$venv/bin/python" "${cuda_args[@]}" >"$build/configure.log" 2>&1 ||
  { tail -40 "$build/configure.log"; exit 1; }
grep -E "Found Torch|PyPI torch|CUDA detected|torch wheel" "$build/configure.log" || true
ninja -C "$build" -j "${JOBS:-$(nproc)}"
t2=$(date +%s)
echo "test_libtorch2: build $((t2 - t1)) s"
cd "$build"
ctest --output-on-failure -j "${CTEST_JOBS:-$(nproc)}" --timeout 900 "$@"
echo "test_libtorch2: ctest $(($(date +%s) - t2)) s"
