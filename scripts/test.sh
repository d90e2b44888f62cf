#!/usr/bin/env bash
# The test command: set-up, configure, build, then every test with ctest.
# Usage: scripts/test.sh [ctest arguments...]   e.g. scripts/test.sh -L model, or -LE slow
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"

"$root/scripts/setup.sh"
# The Python tests run in a venv with the real MONAI and TensorBoard over Debian's torch.
python="$("$root/scripts/python_env.sh")"
"$root/scripts/build.sh" -DMAE3D_PYTHON="$python"
cd "$build"
# Tests use one intra-op thread each, so two run side by side on two cores.
ctest --output-on-failure -j "${CTEST_JOBS:-$(nproc)}" --timeout 900 "$@"
