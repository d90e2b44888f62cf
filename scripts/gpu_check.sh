#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and a PyTorch 2.x (python3 with torch importable)
# but no ITK, no Debian -dev packages and no network, it
#   1. builds the model-only targets (mae-bench, mae-selftest) against that PyTorch's LibTorch;
#   2. runs mae-bench on the GPU: preset A at batch 2 and 16 and preset B at its batch, in fp32 and
#      bf16, plus A at batch 16 in bf16 with the explicit attention path;
#   3. runs mae-selftest (presets tiny and B, fp32 and bf16, fused and explicit attention): a short
#      training run whose loss must fall and a save/resume round trip whose losses and weights must
#      equal an uninterrupted run's bit for bit;
#   4. prints ONE JSON summary on stdout, one line (progress goes to stderr; an indented copy and every
#      log are in BUILD_DIR/gpu_check/, and copied into $OUT when that folder is set), and exits 0
#      when everything passed, else 1.
#
# The header-only libraries (nlohmann_json, CLI11) come from build-gpu-deps/, which
# scripts/gpu_deps.sh unpacks from Debian's packages on a machine with apt; carry that folder along.
#
# Environment:
#   GPU_CHECK_DEVICE       cuda (default) or cpu: the same flow on the CPU with the tiny preset and
#                          fewer steps, to test this script on a machine without a GPU
#   PYTHON                 interpreter whose torch is built against (default python3)
#   BUILD_DIR              build folder (default build-gpu/, build-gpu-cpu/ for cpu); must be ignored
#   DEPS_DIR               unpacked headers (default build-gpu-deps/)
#   JOBS                   parallel compile jobs (default: all cores)
#   BUILD_LOCK             a file to hold with flock(1) while building (shared machines)
#   GPU_CHECK_THREADS      --threads of the programs (default 0 = all cores)
#   GPU_CHECK_TORCH_CMAKE  auto (default), official or shim: how CMake finds LibTorch. "official" is
#                          the wheel's own TorchConfig, which needs a CUDA toolkit (nvcc) for a CUDA
#                          wheel; "shim" replaces only its Caffe2Config.cmake by one that imports the
#                          same targets without searching for the toolkit (nothing here compiles
#                          CUDA code). auto: official when nvcc is found, else shim; and shim again
#                          when the official configure or build fails (the summary keeps that
#                          attempt under "superseded").
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kind="${GPU_CHECK_DEVICE:-cuda}"
case "$kind" in cuda | cpu) ;; *) echo "gpu_check: GPU_CHECK_DEVICE=$kind: use cuda or cpu" >&2; exit 2 ;; esac
py="${PYTHON:-python3}"
if [ "$kind" = cuda ]; then build="${BUILD_DIR:-$root/build-gpu}"; else build="${BUILD_DIR:-$root/build-gpu-cpu}"; fi
deps="${DEPS_DIR:-$root/build-gpu-deps}"
jobs="${JOBS:-$(nproc)}"
threads="${GPU_CHECK_THREADS:-0}"
torch_cmake="${GPU_CHECK_TORCH_CMAKE:-auto}"
out="$build/gpu_check"  # logs and the JSON pieces the summary is made of
t_start=$(date +%s.%N)

log() { echo "gpu_check: $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

mkdir -p "$out" || { echo "gpu_check: cannot create $out" >&2; exit 1; }
rm -f "$out"/*.jsonl "$out"/*.json "$out"/*.log
: >"$out/steps.jsonl"
# step NAME RC SECONDS LOG [JSON-OBJECT]: one record per step for the summary.
step() {
  printf '{"name": "%s", "rc": %s, "seconds": %s, "log": "%s"%s}\n' "$1" "$2" "$3" "$4" "${5:+, \"result\": $5}" \
    >>"$out/steps.jsonl"
}

# The summary, from whatever steps ran; exits with its verdict. Uses only Python's standard library.
finish() {
  "$py" - "$out" "$kind" "$(since "$t_start")" "$@" <<'PY'
import json, os, sys
out, kind, total = sys.argv[1], sys.argv[2], float(sys.argv[3])
fatal = sys.argv[4] if len(sys.argv) > 4 else ""
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else {}
steps = [json.loads(l) for l in open(os.path.join(out, "steps.jsonl")) if l.strip()]
info = load("info.json")
summary = {"gpu_check": kind, "pass": False}
for k in ("python", "torch", "torch_cuda", "cuda_available", "cuda_device", "gpu_count", "capability", "cpu_threads"):
    if k in info: summary[k] = info[k]
for k, v in load("build.json").items(): summary[k] = v
failures = []
bench, selftest = [], []
def tail(path, n=15):
    try:
        return open(path, errors="replace").read().splitlines()[-n:]
    except OSError:
        return []
for s in steps:
    name, rc = s["name"], s["rc"]
    if name.startswith(("bench", "selftest")):
        r = dict({"case": name.split("-", 1)[1], "rc": rc, "wall_s": s["seconds"]},
                 **(s.get("result") or {"error": tail(s["log"], 5)}))
        for k in ("losses", "resumed_losses", "selftest", "iters", "step_gflop"):
            r.pop(k, None)  # in the step's log; the summary stays short
        (bench if name.startswith("bench") else selftest).append(r)
    if s.get("superseded"):
        summary.setdefault("superseded", []).append({"step": name, "rc": rc, "log": s["log"], "tail": tail(s["log"], 8)})
    elif rc != 0:
        failures.append({"step": name, "rc": rc, "log": s["log"], "tail": tail(s["log"])})
summary["bench"] = bench
summary["selftest"] = selftest
if fatal:
    failures.append({"step": "setup", "error": fatal})
summary["failures"] = failures
summary["total_s"] = round(total, 1)
summary["pass"] = not failures and bool(bench) and bool(selftest)
summary["logs"] = out
text = json.dumps(summary)
open(os.path.join(out, "summary.json"), "w").write(json.dumps(summary, indent=1) + "\n")
print(text)
sys.exit(0 if summary["pass"] else 1)
PY
  local rc=$?
  # On the device machine $OUT is the folder whose files come back: the summary and every log.
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp -r "$out" "$OUT/" 2>/dev/null; fi
  exit $rc
}

# --- 1. What this machine has -------------------------------------------------------------------
log "probing $py"
if ! "$py" - >"$out/info.json" 2>"$out/probe.log" <<'PY'; then
import json, os, sys
import torch
d = {"python": sys.executable + " " + sys.version.split()[0], "torch": torch.__version__,
     "torch_cuda": torch.version.cuda, "torch_dir": os.path.dirname(torch.__file__),
     "cmake_prefix_path": torch.utils.cmake_prefix_path, "cxx11_abi": bool(torch.compiled_with_cxx11_abi()),
     "cpu_threads": os.cpu_count()}
d["cuda_available"] = torch.cuda.is_available()
if d["cuda_available"]:
    d["gpu_count"] = torch.cuda.device_count()
    d["cuda_device"] = torch.cuda.get_device_name(0)
    d["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
print(json.dumps(d))
PY
  step probe 1 0 "$out/probe.log"
  finish "$py cannot import torch (see $out/probe.log)"
fi
field() { "$py" -c "import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print('' if v is None else v)" "$out/info.json" "$1"; }
torch_dir="$(field torch_dir)"
log "torch $(field torch) (CUDA $(field torch_cuda)) at $torch_dir; GPU: $(field cuda_device)"
if [ "$kind" = cuda ] && [ "$(field cuda_available)" != True ]; then
  finish "torch.cuda.is_available() is False: no usable GPU or a CPU-only torch (GPU_CHECK_DEVICE=cpu runs on the CPU)"
fi
[ -f "$torch_dir/share/cmake/Torch/TorchConfig.cmake" ] || finish "$torch_dir/share/cmake/Torch/TorchConfig.cmake is missing"
command -v cmake >/dev/null || finish "cmake is not installed"
command -v c++ >/dev/null || command -v g++ >/dev/null || finish "no C++ compiler (c++ / g++)"
if command -v ninja >/dev/null; then generator=Ninja; else generator="Unix Makefiles"; fi

# --- 2. Header-only dependencies ----------------------------------------------------------------
nlohmann_dir="$deps/usr/share/cmake/nlohmann_json"
cli11_dir="$deps/usr/share/cmake/CLI11"
if [ ! -f "$nlohmann_dir/nlohmann_jsonConfig.cmake" ] || [ ! -f "$cli11_dir/CLI11Config.cmake" ]; then
  if command -v apt-get >/dev/null; then
    "$root/scripts/gpu_deps.sh" "$deps" >&2 || finish "scripts/gpu_deps.sh $deps failed"
  else
    finish "$deps has no nlohmann_json/CLI11: run scripts/gpu_deps.sh on a Debian machine and carry $deps along"
  fi
fi

# --- 3. Configure and build ---------------------------------------------------------------------
# The wheel keeps CUDA, cuDNN and NCCL in site-packages/nvidia/*/lib. libtorch_cuda.so finds them at
# run time through its own RPATH ($ORIGIN/../../nvidia/...), but GNU ld does not use that RPATH when
# it checks libtorch_cuda.so's dependencies at link time, and takes the first libnccl.so.2 on its
# default path instead (here the CUDA toolkit's older one: "undefined reference to ncclSignal").
# -rpath-link to the wheel's folders makes it check against the libraries that will be loaded.
link_flags=""
for dir in "$torch_dir"/../nvidia/*/lib; do
  [ -d "$dir" ] && link_flags+=" -Wl,-rpath-link,$(cd "$dir" && pwd)"
done

# shim: the wheel's own Caffe2 targets without its CUDA toolkit search (see the header).
write_shim() {
  mkdir -p "$build/torch-shim"
  cat >"$build/torch-shim/Caffe2Config.cmake" <<EOF
# Written by scripts/gpu_check.sh: the imported targets of $torch_dir/share/cmake/Caffe2,
# without public/cuda.cmake's search for a CUDA toolkit (model-only builds compile no CUDA code and
# link libtorch_cuda.so, which brings its own CUDA libraries).
set(_mae_caffe2 "$torch_dir/share/cmake/Caffe2")
file(STRINGS "\${_mae_caffe2}/Caffe2Targets.cmake" _mae_lines REGEX "INTERFACE_LINK_LIBRARIES")
string(REGEX MATCHALL "[A-Za-z0-9_]+::[A-Za-z0-9_]+" _mae_deps "\${_mae_lines}")
list(REMOVE_DUPLICATES _mae_deps)
file(GLOB _mae_cuda_include LIST_DIRECTORIES true "$torch_dir/../nvidia/*/include")
foreach(_t IN LISTS _mae_deps)
  if(NOT TARGET \${_t})
    add_library(\${_t} INTERFACE IMPORTED)
  endif()
endforeach()
if(TARGET torch::cudart AND _mae_cuda_include)
  set_target_properties(torch::cudart PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "\${_mae_cuda_include}")
endif()
include("\${_mae_caffe2}/Caffe2Targets.cmake")
set(Caffe2_MAIN_LIBS torch_library)
set(CAFFE2_INCLUDE_DIRS "$torch_dir/include")
set(Caffe2_FOUND TRUE)
EOF
}

configure() {  # configure MODE LOG
  local caffe2="$torch_dir/share/cmake/Caffe2"
  if [ "$1" = shim ]; then write_shim; caffe2="$build/torch-shim"; fi
  # Torch_DIR and Caffe2_DIR explicitly: TorchConfig's own find_dependency(Caffe2 PATHS ...) searches
  # the system first and takes Debian's Caffe2 (LibTorch 1.13) where one is installed; the torch prefix
  # first on CMAKE_PREFIX_PATH, so its find_library(c10 / torch) do not find Debian's libc10.so either.
  cmake -S "$root" -B "$build" -G "$generator" -DCMAKE_BUILD_TYPE=Release -DMAE3D_MODEL_ONLY=ON \
    -DMAE3D_BUILD_TESTS=OFF -DTorch_DIR="$torch_dir/share/cmake/Torch" -DCaffe2_DIR="$caffe2" \
    -DCMAKE_PREFIX_PATH="$torch_dir;$deps/usr" -Dc10_LIBRARY="$torch_dir/lib/libc10.so" \
    -DTORCH_LIBRARY="$torch_dir/lib/libtorch.so" -Dnlohmann_json_DIR="$nlohmann_dir" -DCLI11_DIR="$cli11_dir" \
    -DCMAKE_EXE_LINKER_FLAGS="$link_flags" >"$2" 2>&1
}

mode="$torch_cmake"
if [ "$mode" = auto ]; then
  if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || [ "$(field torch_cuda)" = "" ]; then
    mode=official
  else
    mode=shim
  fi
fi

clean_build() { find "$build" -mindepth 1 -maxdepth 1 ! -name gpu_check -exec rm -rf {} +; }
# configure_and_build MODE: sets configure_s, build_s; returns 0, 1 (configure failed), 2 (build failed).
configure_and_build() {
  local t0 rc
  # A build folder configured for another torch or the other CMake config starts afresh.
  if [ -f "$build/CMakeCache.txt" ] && [ "$(cat "$build/.gpu_check_stamp" 2>/dev/null)" != "$torch_dir $1" ]; then
    log "$build was configured for another torch or CMake config; starting afresh"
    clean_build
  fi
  t0=$(now)
  log "configuring $build ($generator, LibTorch through the $1 CMake config)"
  configure "$1" "$out/configure.log"
  rc=$?
  configure_s=$(since "$t0")
  build_s=0
  step "configure-$1" $rc "$configure_s" "$out/configure.log"
  [ $rc -eq 0 ] || return 1
  echo "$torch_dir $1" >"$build/.gpu_check_stamp"
  t0=$(now)
  log "building mae-bench and mae-selftest with $jobs jobs"
  local build_cmd=(cmake --build "$build" -j "$jobs" --target mae-bench mae-selftest)
  if [ -n "${BUILD_LOCK:-}" ]; then build_cmd=(flock "$BUILD_LOCK" "${build_cmd[@]}"); fi
  "${build_cmd[@]}" >"$out/build.log" 2>&1
  rc=$?
  build_s=$(since "$t0")
  step "build-$1" $rc "$build_s" "$out/build.log"
  [ $rc -eq 0 ] || return 2
}
t_build=$(now)
configure_and_build "$mode"
rc=$?
if [ $rc -ne 0 ] && [ "$torch_cmake" = auto ] && [ "$mode" = official ]; then
  failed="$out/$([ $rc -eq 1 ] && echo configure || echo build).log"
  log "the official TorchConfig's $([ $rc -eq 1 ] && echo configure || echo build) failed; retrying with the shim. Tail of $failed:"
  tail -n 8 "$failed" >&2
  for f in configure build; do [ -f "$out/$f.log" ] && mv "$out/$f.log" "$out/$f-official.log"; done
  # The official attempt stays in the summary as "superseded": the shim's result decides.
  "$py" - "$out" <<'PY'
import json, os, sys
path = os.path.join(sys.argv[1], "steps.jsonl")
steps = [json.loads(l) for l in open(path) if l.strip()]
for s in steps:
    if s["name"].endswith("-official"):
        s["superseded"] = True
        s["log"] = s["log"][: -len(".log")] + "-official.log"
open(path, "w").write("".join(json.dumps(s) + "\n" for s in steps))
PY
  clean_build
  mode=shim
  configure_and_build "$mode"
  rc=$?
fi
nvcc="$(command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; })"
[ -n "$nvcc" ] && nvcc="$nvcc ($("$nvcc" --version 2>/dev/null | grep -o 'release [0-9.]*'))"
"$py" - "$mode" "$generator" "$jobs" "$configure_s" "$build_s" "$nvcc" "$out/build.json" <<'PY'
import json, sys
mode, generator, jobs, configure_s, build_s, nvcc, path = sys.argv[1:]
json.dump({"torch_cmake": mode, "nvcc": nvcc or None, "generator": generator, "jobs": int(jobs),
           "configure_s": float(configure_s), "build_s": float(build_s)}, open(path, "w"))
PY
[ $rc -ne 1 ] || finish "cmake configure failed (see $out/configure.log)"
[ $rc -ne 2 ] || finish "build failed (see $out/build.log)"
log "built in ${build_s}s (configure ${configure_s}s; $(since "$t_build")s in all)"

# --- 4. Bench and selftest ----------------------------------------------------------------------
bin="$build/apps"
limit=300  # seconds per program run: a hang fails its case, not the whole check
command -v timeout >/dev/null || timeout() { shift; "$@"; }
run_case() {  # run_case NAME PROGRAM ARGS...: the program's last stdout line is its JSON result
  local name="$1"; shift
  local t0 logf="$out/$name.log" rc result
  t0=$(now)
  log "$name: $(basename "$1") ${*:2}"
  timeout "$limit" "$@" >"$logf.out" 2>"$logf"
  rc=$?
  cat "$logf.out" >>"$logf"
  result="$(grep '^{' "$logf.out" | tail -n 1)"
  rm -f "$logf.out"
  if [ -n "$result" ] && ! "$py" -c "import json,sys; json.loads(sys.argv[1])" "$result" 2>/dev/null; then result=""; fi
  [ $rc -eq 124 ] && echo "gpu_check: killed after ${limit}s" >>"$logf"
  step "$name" $rc "$(since "$t0")" "$logf" "$result"
  [ $rc -eq 0 ] || log "$name failed (rc $rc): $(tail -n 1 "$logf")"
}

# bench NAME ARGS... / selftest NAME ARGS...: one case, on the check's device with its thread count.
bench() { local name="$1"; shift; run_case "bench-$name" "$bin/mae-bench" "${dev[@]}" "${iters[@]}" "$@"; }
selftest() { local name="$1"; shift; run_case "selftest-$name" "$bin/mae-selftest" "${dev[@]}" "$@"; }
if [ "$kind" = cuda ]; then
  dev=(--device cuda --threads "$threads")
  iters=(--warmup 3 --iters 10)
  bench A-b2-fp32 --preset A --batch 2 --precision fp32
  bench A-b16-fp32 --preset A --batch 16 --precision fp32
  bench A-b2-bf16 --preset A --batch 2 --precision bf16
  bench A-b16-bf16 --preset A --batch 16 --precision bf16
  bench A-b16-bf16-explicit --preset A --batch 16 --precision bf16 --attention explicit
  bench B-fp32 --preset B --precision fp32
  bench B-bf16 --preset B --precision bf16
  selftest tiny-fp32 --preset tiny --precision fp32
  selftest tiny-bf16 --preset tiny --precision bf16
  selftest B-fp32 --preset B --precision fp32
  selftest B-bf16 --preset B --precision bf16
  selftest B-fp32-explicit --preset B --precision fp32 --attention explicit
else
  dev=(--device cpu --threads "$threads")
  iters=(--warmup 1 --iters 3)
  bench tiny-b2-fp32 --preset tiny --batch 2 --precision fp32
  bench tiny-b4-fp32 --preset tiny --batch 4 --precision fp32
  bench tiny-b2-bf16 --preset tiny --batch 2 --precision bf16
  bench tiny-b4-bf16 --preset tiny --batch 4 --precision bf16
  bench tiny-b4-bf16-explicit --preset tiny --batch 4 --precision bf16 --attention explicit
  selftest tiny-fp32 --preset tiny --precision fp32
  selftest tiny-bf16 --preset tiny --precision bf16
fi
finish
