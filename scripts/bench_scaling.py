#!/usr/bin/env python3
"""How the training step's cost grows with the crop: preset A's ViT-B (patch 16) at several crops,
batches and precisions, one mae-bench process per point so that each peak RSS is that point's own.

Usage: /usr/bin/python3 scripts/bench_scaling.py [--build build] [--crops 64 96 128 160]
         [--batches 1 2 4 8] [--precisions fp32 bf16] [--warmup 1] [--iters 3]
         [--monai build/venv-py/bin/python] [--monai-batches 2]
Prints one JSON line per point (mae-bench's own line), then a Markdown table: step time, GFLOP/s,
the share of the same process's matrix-product rate (mfu), peak RSS, the overhead above the fp32
optimizer-state floor (also net of the process's RSS at start), and attention's share of the FLOPs. With --monai, MONAI's
MaskedAutoEncoderViT (scripts/bench_pytorch.py with that python) at the same crops in fp32, for
the batches of --monai-batches.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_scaling: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--crops", type=int, nargs="+", default=[64, 96, 128, 160])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--monai", help="python with MONAI (and the torch the build uses) to time MONAI alongside")
    ap.add_argument("--monai-batches", type=int, nargs="+", default=[2])
    args = ap.parse_args()
    bench = os.path.join(args.build, "apps", "mae-bench")
    rows, monai = [], {}
    for precision in args.precisions:
        for crop in args.crops:
            for batch in args.batches:
                r = run_json([bench, "--preset", "A", "--img", str(crop), "--batch", str(batch), "--precision",
                              precision, "--warmup", str(args.warmup), "--iters", str(args.iters)])
                print(json.dumps(r), flush=True)
                rows.append(r)
    if args.monai:
        for crop in args.crops:
            for batch in args.monai_batches:
                r = run_json([args.monai, os.path.join(ROOT, "scripts", "bench_pytorch.py"), "--preset", "A", "--img",
                              str(crop), "--batch", str(batch), "--warmup", str(args.warmup), "--iters",
                              str(args.iters)])
                print(json.dumps(r), flush=True)
                monai[(crop, batch)] = r

    print()
    print("| crop | tokens enc/dec | batch | precision | step s | GFLOP/s | mfu | peak RSS MB | over floor MB |"
          " net of start MB | attention | MONAI fp32 step s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        crop = r["img"][0] if isinstance(r["img"], list) else r["img"]
        m = monai.get((crop, r["batch"])) if r["precision"] == "fp32" else None
        ms = f"{m['step_s']:.3g} ({m['step_s'] / r['step_s']:.2f}x)" if m and "step_s" in m else ""
        print(f"| {crop}³ | {r['encoder_tokens']}/{r['decoder_tokens']} | {r['batch']} | {r['precision']} |"
              f" {r['step_s']:.3g} | {r['gflops']:.0f} | {r['mfu']:.2f} | {r['peak_rss_mb']:.0f} |"
              f" {r['overhead_mb']:.0f} | {r['net_overhead_mb']:.0f} | {100 * r['attention_share']:.1f} % | {ms} |")


if __name__ == "__main__":
    main()
