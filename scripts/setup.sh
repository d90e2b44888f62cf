#!/usr/bin/env bash
# Installs everything mae3d needs to build, test and run its demo on Debian 12.
# Idempotent and non-interactive; run as root (or with sudo available).
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libtorch-dev libinsighttoolkit5-dev libcli11-dev libspdlog-dev nlohmann-json3-dev libgtest-dev libgloo-dev
  libopenblas0-openmp libgdcm-tools
  # oneDNN for the model's float32 products (lib/model/linear.h); LibTorch 1.13 already runs bf16 on it
  libdnnl-dev ocl-icd-opencl-dev
  # tests and demo data
  python3 python3-venv python3-torch python3-numpy mricron-data python3-pydicom insighttoolkit5-examples
)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  # --no-install-recommends keeps the pthread OpenBLAS out; the OpenMP build was equal or faster here.
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: all packages present"
fi

# Debian's LibTorch calls whatever libblas.so.3 is; the reference BLAS is ~25x slower.
blas=$(readlink -f "$(ldconfig -p | awk '/libblas\.so\.3 .*x86-64|libblas\.so\.3 .*AArch64|libblas\.so\.3 /{print $NF; exit}')" 2>/dev/null || true)
if [[ "$blas" == *openblas* ]]; then
  echo "setup: libblas.so.3 -> $blas (OpenBLAS, good)"
else
  echo "setup: WARNING: libblas.so.3 resolves to '${blas:-nothing}', not OpenBLAS; matrix products will be ~25x slower." >&2
  echo "setup:          fix with: update-alternatives --config libblas.so.3-$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)" >&2
fi
