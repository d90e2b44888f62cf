#!/usr/bin/env python3
"""End-to-end training benchmark: samples/s, data-wait share and the end-to-end step compared
with the model-only step of mae-bench, all measured in one run on this machine.

Usage: /usr/bin/python3 scripts/bench_train.py [--build build] [--steps 40] [--skip-a] [--precision fp32|bf16]
Prints one JSON line per configuration:
  demo: configs/demo.json as shipped (real brain MRI, small model), through mae-pretrain;
  A:    the foundation benchmark's preset A (96^3, ViT-B, batch 2) trained on the same MRI at 1 mm,
        through `mae-bench --end-to-end`, which times the trainer and then the same model's step
        alone in one process (e2e_over_model_only is their ratio).
The demo's volumes are installed first (scripts/demo_data.sh) and the volume cache is warmed
(mae-pretrain --check-data), so data-wait measures the loader.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESET_A_MODEL = [
    "model.img_size=[96,96,96]", "model.patch_size=[16,16,16]", "model.hidden_size=768", "model.mlp_dim=3072",
    "model.num_layers=12", "model.num_heads=12", "model.decoder_hidden_size=384", "model.decoder_mlp_dim=512",
    "model.decoder_num_layers=4", "model.decoder_num_heads=12", "model.masking_ratio=0.75",
]


def run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_train: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}")
    return proc.stdout


def train(build, name, config, overrides, steps, out_dir):
    pretrain = os.path.join(build, "apps", "mae-pretrain")
    common = ["--config", config, "--set", f"output.dir={out_dir}", "--set", f"train.max_steps={steps}",
              "--set", "train.log_every=1", "--set", "train.checkpoint_every=1000000", "--set", "data.val_fraction=0"]
    for o in overrides:
        common += ["--set", o]
    run([pretrain] + common + ["--check-data"])  # warm the cache
    run([pretrain] + common)
    records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    steady = [r for r in records if r["step"] > 3]  # the first steps carry start-up costs
    step_s = statistics.median(r["step_s"] for r in steady)
    wait = sum(r["data_wait_s"] for r in steady) / sum(r["step_s"] for r in steady)
    return {"config": name, "steps": steps, "step_s": round(step_s, 4),
            "samples_per_s": round(statistics.median(r["samples_per_s"] for r in steady), 3),
            "data_wait_share": round(wait, 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="train.precision of the A run")
    args = ap.parse_args()
    subprocess.run([os.path.join(ROOT, "scripts", "demo_data.sh")], check=True, stdout=sys.stderr)  # the demo's volumes
    with tempfile.TemporaryDirectory(prefix="mae3d_bench_") as tmp:
        print(json.dumps(train(args.build, "demo", "configs/demo.json", [], args.steps, os.path.join(tmp, "demo"))),
              flush=True)
        if args.skip_a:
            return
        a_steps = max(8, args.steps // 3)
        cmd = [os.path.join(args.build, "apps", "mae-bench"), "--end-to-end", "configs/mri_96.json",
               "--warmup", "3", "--iters", str(a_steps)]
        for o in PRESET_A_MODEL + ["data.dataset=data/demo/dataset.json", "train.batch_size=2",
                                   f"train.precision={args.precision}"]:
            cmd += ["--set", o]
        e2e = json.loads(run(cmd).strip().splitlines()[-1])
        e2e["config"] = "A"
        print(json.dumps(e2e), flush=True)


if __name__ == "__main__":
    main()
