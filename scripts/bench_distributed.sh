#!/usr/bin/env bash
# Data-parallel training speed on this machine: preset B's model (64^3 crops, patch 16, encoder
# 384 x 6 layers, decoder 384 x 4 layers; lib/model/presets.cpp) at its global batch of 4, trained on
# synthetic volumes by
#   1 rank  (all cores, batch 4),
#   2 ranks (one thread each, batch 2 each) with distributed.overlap on and off (gradient all-reduce
#           overlapped with the backward pass, or after it),
# and prints steps/s and the all-reduce share of the step (medians over the steps after warm-up,
# from metrics.jsonl). Builds nothing: uses build/apps/mae-pretrain (or $MAE_PRETRAIN).
#
#   scripts/bench_distributed.sh [--steps 40] [--warmup 5] [--keep DIR]
#
# About 2-3 minutes on 2 cores with the defaults.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${MAE_PRETRAIN:-$root/build/apps/mae-pretrain}
steps=40
warmup=5
keep=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "$0: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -x $bin ]] || { echo "$0: $bin not found; build it first (ninja -C build mae-pretrain)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "$0: needs python3 (writes the volumes, reads metrics.jsonl)" >&2; exit 2; }
((steps > warmup)) || { echo "$0: --steps must be larger than --warmup" >&2; exit 2; }

if [[ -n $keep ]]; then
  work=$keep
  mkdir -p "$work"
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/mae3d_bench_dist.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi
cores=$(nproc)

# Four 72^3 float32 volumes (smooth blobs plus noise), as NIfTI-1 .nii.gz, with the standard library.
python3 - "$work" <<'EOF'
import array, gzip, math, os, random, struct, sys

work = sys.argv[1]
n = 72
rng = random.Random(0)
with open(os.path.join(work, "list.txt"), "w") as lst:
    for v in range(4):
        h = bytearray(352)
        struct.pack_into("<i", h, 0, 348)
        struct.pack_into("<8h", h, 40, 3, n, n, n, 1, 1, 1, 1)
        struct.pack_into("<hh", h, 70, 16, 32)  # float32
        struct.pack_into("<8f", h, 76, 1.0, 1.5, 1.5, 1.5, 1.0, 1.0, 1.0, 1.0)
        struct.pack_into("<f", h, 108, 352.0)
        struct.pack_into("<f", h, 112, 1.0)
        struct.pack_into("<hh", h, 252, 0, 1)  # sform
        for r in range(3):
            row = [0.0] * 4
            row[r] = 1.5
            struct.pack_into("<4f", h, 280 + 16 * r, *row)
        h[344:348] = b"n+1\0"
        cx, cy, cz = (rng.uniform(20, 52) for _ in range(3))
        data = array.array("f", bytes(4 * n * n * n))
        i = 0
        for z in range(n):
            for y in range(n):
                base = ((y - cy) ** 2 + (z - cz) ** 2)
                for x in range(n):
                    data[i] = 100.0 * math.exp(-(base + (x - cx) ** 2) / 300.0) + rng.random() * 20.0
                    i += 1
        name = f"vol{v}.nii.gz"
        with gzip.open(os.path.join(work, name), "wb", compresslevel=1) as f:
            f.write(bytes(h) + data.tobytes())
        lst.write(name + "\n")
EOF

cat >"$work/config.json" <<EOF
{
  "device": "cpu",
  "seed": 0,
  "data": {"dataset": "$work/list.txt", "cache_dir": "$work/cache", "val_fraction": 0,
           "intensity": {"mode": "zscore_nonzero"}, "workers": 1},
  "model": {"img_size": [64, 64, 64], "patch_size": [16, 16, 16], "hidden_size": 384, "mlp_dim": 1536,
            "num_layers": 6, "num_heads": 6, "decoder_hidden_size": 384, "decoder_mlp_dim": 512,
            "decoder_num_layers": 4, "decoder_num_heads": 12, "masking_ratio": 0.75},
  "train": {"batch_size": 4, "max_steps": $steps, "log_every": 1, "checkpoint_every": 1000000,
            "lr_warmup_steps": 5},
  "output": {"dir": "$work/run", "tensorboard": false},
  "distributed": {"backend": "gloo", "timeout_s": 120}
}
EOF

# Preprocess once (the cache is shared by every run below).
"$bin" --config "$work/config.json" --check-data >"$work/check.log" 2>&1 ||
  { cat "$work/check.log" >&2; exit 1; }

results=()
run() {  # NAME RANKS THREADS BATCH OVERLAP
  local name=$1 ranks=$2 threads=$3 batch=$4 overlap=$5 out=$work/run_$1 rc=0
  local args=(--threads "$threads" --set "output.dir=$out" --set "train.batch_size=$batch"
    --set "distributed.overlap=$overlap")
  echo "bench_distributed: $name ($ranks rank(s) x $threads thread(s), batch $batch per rank, $steps steps)" >&2
  local t0=$SECONDS
  if ((ranks == 1)); then
    env -u RANK -u WORLD_SIZE -u LOCAL_RANK -u SLURM_PROCID -u SLURM_NTASKS -u SLURM_LOCALID \
      "$bin" --config "$work/config.json" "${args[@]}" >"$work/$name.log" 2>&1 || rc=$?
  else
    MAE_PRETRAIN=$bin "$root/scripts/launch_local.sh" "$ranks" "$work/config.json" "${args[@]}" \
      >"$work/$name.log" 2>&1 || rc=$?
  fi
  if ((rc != 0)); then
    echo "bench_distributed: $name failed (exit $rc):" >&2
    tail -n 30 "$work/$name.log" >&2
    exit 1
  fi
  results+=("$name|$ranks|$threads|$batch|$overlap|$((SECONDS - t0))|$out/metrics.jsonl")
}

run "1 rank" 1 "$cores" 4 true
((cores >= 2)) && run "1 rank, 1 thread" 1 1 4 true
run "2 ranks, overlap on" 2 1 2 true
run "2 ranks, overlap off" 2 1 2 false

printf '%s\n' "${results[@]}" | python3 -c '
import json, statistics, sys
warmup = int(sys.argv[1])
rows = []
for line in sys.stdin:
    name, ranks, threads, batch, overlap, wall, path = line.rstrip("\n").split("|")
    recs = [json.loads(l) for l in open(path) if l.strip()]
    recs = [r for r in recs if "step_s" in r and r.get("step", 0) > warmup]
    step_s = statistics.median(r["step_s"] for r in recs)
    share = statistics.median(r.get("allreduce_share", 0.0) for r in recs)
    ar = statistics.median(r.get("allreduce_s", 0.0) for r in recs)
    sps = statistics.median(r["samples_per_s"] for r in recs)
    ws = recs[-1].get("world_size", 1)
    rows.append((name, ranks, threads, int(batch) * int(ranks), ws, 1.0 / step_s, sps, ar, share, wall))
print("| run | ranks x threads | global batch | world_size | steps/s | samples/s | all-reduce s | all-reduce share | wall s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for n, r, t, gb, ws, st, sps, ar, sh, wall in rows:
    print(f"| {n} | {r} x {t} | {gb} | {ws} | {st:.2f} | {sps:.1f} | {ar:.4f} | {sh:.1%} | {wall} |")
' "$warmup"
