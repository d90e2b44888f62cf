#!/usr/bin/env python3
"""Runs scripts/finetune_unetr.py as a user would, on an mae-export --format monai-unetr export.

The checkpoint is a freshly initialised model that UNETR can hold (12 layers, patch 16, hidden size
48, img 32^3; export_test_helper), trained on the Colin27 T1 of Debian's mricron-data at 3 mm. The
script fine-tunes UNETR on the AAL atlas (six region groups + background) for a few steps, from the
export and with --scratch, and must exit 0 with a last line of JSON holding a finite Dice in [0, 1],
the step count and the init; its preprocessing must reproduce mae3d's (--compare-features with
mae-export --features of the same image); the two inits must give different losses; a monai-vit
export is refused with exit 2 and a one-line message. The script's own geometry helpers are checked
directly: the NIfTI reader on ch2 and AAL (same grid, RAS), reorientation of an LPS grid, and the
nearest-neighbour resampling of a label map onto another grid. Exit 77 (skipped) only when torch
cannot be imported.
"""
import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time

try:
    import torch  # noqa: F401 - the script needs it
except Exception as exc:  # noqa: BLE001
    print(f"SKIP: cannot import torch with {sys.executable}: {exc}")
    sys.exit(77)

IMAGE = "/usr/share/mricron/templates/ch2.nii.gz"
ATLAS = "/usr/share/mricron/templates/aal.nii.gz"
CONFIG = {
    "seed": 5,
    "data": {"dataset": "unused.json", "orientation": "RAS", "spacing_mm": [3.0, 3.0, 3.0],
             "intensity": {"mode": "zscore_nonzero"}, "foreground_threshold": 0.0},
    "model": {"img_size": [32, 32, 32], "patch_size": [16, 16, 16], "hidden_size": 48, "mlp_dim": 96,
              "num_layers": 12, "num_heads": 4, "decoder_hidden_size": 24, "decoder_mlp_dim": 40,
              "decoder_num_layers": 1, "decoder_num_heads": 4},
}

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)
    return cond


def run(cmd):
    return subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_ok(cmd):
    r = run(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def finetune(args, encoder, *extra):
    cmd = [sys.executable, args.script, "--encoder", encoder, "--steps", args.steps, "--seed", 0,
           "--device", "cpu", "--threads", 1, *extra]
    start = time.monotonic()
    r = run(cmd)
    seconds = time.monotonic() - start
    print(f"$ {' '.join(map(str, cmd))}  ({seconds:.1f} s, exit {r.returncode})")
    print(r.stdout.rstrip())
    if r.stderr.strip():
        print(r.stderr.rstrip())
    return r


def check_result(r, init, steps):
    if not check(r.returncode == 0, f"{init}: exit 0 (got {r.returncode})"):
        return None
    lines = r.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        check(False, f"{init}: the last line is JSON ({lines[-1:]})")
        return None
    dice = result.get("dice")
    check(isinstance(dice, float) and math.isfinite(dice) and 0.0 <= dice <= 1.0, f"{init}: Dice in [0, 1] ({dice})")
    check(result.get("steps") == steps and result.get("init") == init, f"{init}: steps and init ({result})")
    check(len([l for l in lines if l.startswith("step ")]) == steps, f"{init}: one line per step")
    return result


def check_geometry(script):
    spec = importlib.util.spec_from_file_location("finetune_unetr", script)
    ft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ft)
    image, affine = ft.read_nifti(IMAGE)
    atlas, atlas_affine = ft.read_nifti(ATLAS)
    check(tuple(image.shape) == (181, 217, 181) and image.dtype == torch.uint8, f"ch2 read as {tuple(image.shape)}")
    check(tuple(atlas.shape) == tuple(image.shape) and torch.equal(atlas_affine, affine), "AAL on ch2's grid")
    check(ft.orientation_code(affine) == "RAS" and ft.spacing_of(affine) == [1.0, 1.0, 1.0], "ch2 is RAS at 1 mm")
    check(len(atlas.unique()) == 117, f"AAL holds 116 regions + background ({len(atlas.unique())})")
    # An LPS grid: reorienting to RAS flips i and j and gives back a RAS affine at the same points.
    lps = affine.clone()
    lps[:3, 0] *= -1
    lps[:3, 1] *= -1
    x = torch.arange(24.0).view(1, 2, 3, 4)
    (y,), ras = ft.reorient([x], lps, "RAS")
    check(ft.orientation_code(lps) == "LPS" and ft.orientation_code(ras) == "RAS", "LPS reoriented to RAS")
    check(torch.equal(y, x.flip(1).flip(2)), "LPS -> RAS flips i and j")
    corner = lps @ torch.tensor([1.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    check(torch.allclose(ras @ torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64), corner),
          "the reoriented affine maps voxel 0 to the old corner")
    # Labels onto another grid: the same grid is the identity, a 2 mm grid shifted by 1 mm takes voxels 1, 3, ...
    labels = torch.arange(6 * 8 * 10).view(6, 8, 10)
    grid = torch.eye(4, dtype=torch.float64)
    check(torch.equal(ft.resample_labels_onto(labels, grid, (6, 8, 10), grid), labels), "same-grid resampling")
    coarse = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    coarse[:3, 3] = 1.0
    out = ft.resample_labels_onto(labels, grid, (4, 4, 5), coarse)
    want = torch.zeros(4, 4, 5, dtype=labels.dtype)
    want[:3] = labels[1::2, 1::2, 1::2]
    check(torch.equal(out, want), "nearest-neighbour resampling onto a coarser grid, zero outside")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mae-export", required=True)
    ap.add_argument("--helper", required=True)
    ap.add_argument("--script", required=True, help="scripts/finetune_unetr.py")
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    if not os.path.exists(IMAGE) or not os.path.exists(ATLAS):
        print(f"FAIL: {IMAGE} or {ATLAS} is missing: install Debian's mricron-data")
        return 1
    check_geometry(args.script)
    work = os.path.abspath(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    cfg = os.path.join(work, "config.json")
    with open(cfg, "w") as f:
        json.dump(CONFIG, f)
    run_dir = os.path.join(work, "run")
    run_ok([args.helper, "checkpoint", run_dir, cfg])
    encoder = os.path.join(work, "encoder_unetr.pt")
    run_ok([args.mae_export, "--checkpoint", run_dir, "--format", "monai-unetr", "--out", encoder, "--threads", 1])
    features = os.path.join(work, "ch2_features.pt")
    run_ok([args.mae_export, "--checkpoint", run_dir, "--features", IMAGE, "--out", features, "--threads", 1])

    pretrained = check_result(finetune(args, encoder, "--compare-features", features), "pretrained", args.steps)
    scratch = check_result(finetune(args, encoder, "--scratch"), "scratch", args.steps)
    if pretrained and scratch:
        check(pretrained["loss"] != scratch["loss"], "pretrained and scratch runs differ")
        check(pretrained["classes"] == scratch["classes"] and len(pretrained["classes"]) == 7,
              f"seven classes ({pretrained['classes']})")

    vit = os.path.join(work, "encoder_vit.pt")
    run_ok([args.mae_export, "--checkpoint", run_dir, "--format", "monai-vit", "--out", vit, "--threads", 1])
    r = finetune(args, vit)
    err = r.stderr.strip()
    check(r.returncode == 2 and "monai-unetr" in err and len(err.splitlines()) == 1,
          f"a monai-vit export is refused with exit 2 and one line ({r.returncode}: {err})")

    if failures:
        print(f"{len(failures)} check(s) failed (files kept in {work})")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    print("fine-tuning checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
