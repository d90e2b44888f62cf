#!/usr/bin/env python3
"""Reads mae-pretrain's TensorBoard event files with the real tensorboard package.

Short real runs of mae-pretrain (tiny model, synthetic NIfTI volumes written here, one validation
volume, --threads 1) are read back with tensorboard's EventAccumulator, as TensorBoard's Python
loader reads a run folder:
  * every scalar at every logged step equals the metrics.jsonl record of that step (the float32 of
    the same double: exact), under the tags train/<field> and val/<field>, with no other tag;
  * the validation montage is an image at every validation step that decodes as a PNG (PIL) of the
    stated size, not blank;
  * a run stopped by SIGINT after a checkpoint and resumed, a run killed with SIGKILL after steps
    past its last checkpoint and resumed, and a finished run resumed from an earlier checkpoint
    all give each tag strictly increasing steps equal to metrics.jsonl's after the resume (values
    that differ between the two executions, like samples_per_s, show a stale point);
  * an EventAccumulator kept open across the SIGKILL and the resume (TensorBoard running meanwhile)
    ends with the same curves: the resumed run's SessionLog START purges what it had read;
  * output.tensorboard=false writes no event file and gives the same losses (the pictures take nothing
    from training's random streams); --dry-run and --check-data write nothing.
Exit 0 when all hold, 1 otherwise, 77 (skipped) when tensorboard cannot be imported.
"""
import argparse
import io
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except Exception as exc:  # noqa: BLE001 - any import failure means "cannot run here"
    print(f"SKIP: cannot import tensorboard with {sys.executable}: {exc}")
    sys.exit(77)
try:
    from PIL import Image
except Exception:  # noqa: BLE001
    Image = None

failures = []
IMAGE_TAG = "val/reconstruction"


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what, flush=True)
    return cond


def write_nifti(path, shape_dhw, seed, spacing=(1.0, 1.0, 1.0)):
    """A float32 NIfTI-1 volume (D, H, W) of smooth positive values, qform = scaled identity."""
    d, h, w = shape_dhw
    rng = random.Random(seed)
    waves = [(rng.uniform(0.1, 0.5), rng.uniform(0.1, 0.5), rng.uniform(0.1, 0.5), rng.uniform(0, 6)) for _ in range(3)]
    data = bytearray()
    for z in range(d):
        for y in range(h):
            for x in range(w):
                v = 2.0 + sum(math.sin(a * x + b * y + c * z + p) for a, b, c, p in waves) / 3.0
                data += struct.pack("<f", v)
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    hdr[38] = ord("r")
    struct.pack_into("<8h", hdr, 40, 3, w, h, d, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 16, 32)  # float32
    struct.pack_into("<8f", hdr, 76, 1.0, spacing[0], spacing[1], spacing[2], 0, 0, 0, 0)
    struct.pack_into("<f", hdr, 108, 352.0)  # vox_offset
    struct.pack_into("<f", hdr, 112, 1.0)  # scl_slope
    hdr[123] = 2  # mm
    struct.pack_into("<hh", hdr, 252, 1, 0)  # qform_code scanner, no sform
    hdr[344:348] = b"n+1\0"
    with open(path, "wb") as f:
        f.write(bytes(hdr) + b"\0\0\0\0" + bytes(data))


class Runs:
    def __init__(self, binary, work):
        self.binary = binary
        self.work = work
        self.data = os.path.join(work, "data")
        os.makedirs(self.data, exist_ok=True)
        entries = []
        for i in range(4):
            name = f"v{i}.nii"
            write_nifti(os.path.join(self.data, name), (18, 20, 17), seed=i, spacing=(1.0, 1.2, 1.5))
            entries.append({"image": name})
        with open(os.path.join(self.data, "dataset.json"), "w") as f:
            json.dump({"training": entries[:3], "validation": entries[3:]}, f)
        self.config = {
            "seed": 7,
            "device": "cpu",
            "data": {"dataset": os.path.join(self.data, "dataset.json"), "cache_dir": os.path.join(work, "cache"),
                     "workers": 0, "intensity": {"mode": "zscore_nonzero"}},
            "model": {"img_size": [16, 16, 16], "patch_size": [4, 4, 4], "hidden_size": 24, "mlp_dim": 48,
                      "num_layers": 1, "num_heads": 2, "decoder_hidden_size": 12, "decoder_mlp_dim": 24,
                      "decoder_num_layers": 1, "decoder_num_heads": 2, "dropout_rate": 0.1},
            "train": {"batch_size": 2, "max_steps": 16, "lr": 2e-3, "lr_warmup_steps": 2, "log_every": 2,
                      "checkpoint_every": 4, "keep_last": 10},
            "output": {"dir": os.path.join(work, "unused")},
        }
        self.config_path = os.path.join(work, "config.json")
        with open(self.config_path, "w") as f:
            json.dump(self.config, f, indent=2)

    def args(self, run, *sets, resume=None):
        a = [self.binary, "--config", self.config_path, "--threads", "1", "--log-level", "warn",
             "--set", f"output.dir={run}"]
        for s in sets:
            a += ["--set", s]
        if resume is not None:
            a += ["--resume"] + ([resume] if resume else [])
        return a

    def run(self, run, *sets, resume=None, expect=0):
        p = subprocess.run(self.args(run, *sets, resume=resume), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=300)
        check(p.returncode == expect, f"{run}: exit {p.returncode}, expected {expect}:\n{p.stdout[-3000:]}")
        return p

    def start(self, run, *sets):
        return subprocess.Popen(self.args(run, *sets), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def tag_of(key):
    for group in ("val", "probe"):
        if key.startswith(group + "_") and len(key) > len(group) + 1:
            return group + "/" + key[len(group) + 1:]
    return "train/" + key


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def expected_scalars(records):
    out = {}
    for rec in records:
        for key, value in rec.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                out.setdefault(tag_of(key), []).append((rec["step"], f32(float(value))))
    return out


def event_files(run):
    return sorted(n for n in os.listdir(run) if n.startswith("events.out.tfevents."))


def accumulator(run):
    acc = EventAccumulator(run, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def check_run(run, what, acc=None):
    """The curves TensorBoard shows for `run` equal metrics.jsonl; returns the accumulator."""
    acc = acc or accumulator(run)
    records = metrics(run)
    expected = expected_scalars(records)
    tags = acc.Tags()
    check(sorted(tags["scalars"]) == sorted(expected),
          f"{what}: scalar tags {sorted(tags['scalars'])}, metrics.jsonl gives {sorted(expected)}")
    for tag, points in expected.items():
        if tag not in tags["scalars"]:
            continue
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        steps = [s for s, _ in got]
        check(all(a < b for a, b in zip(steps, steps[1:])), f"{what}: {tag} steps not strictly increasing: {steps}")
        check(got == points, f"{what}: {tag} is {got}, metrics.jsonl has {points}")
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/data_wait_s",
                 "train/data_wait_share", "train/step_s", "train/epoch", "val/loss"):
        check(name in expected, f"{what}: metrics.jsonl gives no {name}")
    val_steps = [r["step"] for r in records if r.get("val_loss") is not None]
    check(IMAGE_TAG in tags["images"], f"{what}: no image {IMAGE_TAG}; images: {tags['images']}")
    if IMAGE_TAG in tags["images"]:
        images = acc.Images(IMAGE_TAG)
        check([e.step for e in images] == val_steps,
              f"{what}: images at steps {[e.step for e in images]}, validations at {val_steps}")
        for e in images:
            png = e.encoded_image_string
            check(png[:8] == b"\x89PNG\r\n\x1a\n", f"{what}: image at step {e.step} is not a PNG")
            if Image is not None:
                im = Image.open(io.BytesIO(png))
                im.load()
                check(im.size == (e.width, e.height) and im.mode == "RGB",
                      f"{what}: image at step {e.step}: {im.size} {im.mode}, event says {(e.width, e.height)}")
                lo, hi = im.convert("L").getextrema()
                check(hi - lo > 50, f"{what}: image at step {e.step} is nearly blank ({lo}..{hi})")
            else:
                w, h = struct.unpack(">II", png[16:24])
                check((w, h) == (e.width, e.height), f"{what}: PNG {w}x{h}, event says {e.width}x{e.height}")
    return acc


def wait_for(cond, seconds=120):
    end = time.time() + seconds
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def latest_step(run):
    try:
        with open(os.path.join(run, "checkpoints", "latest")) as f:
            return int(f.read().strip()[len("step_"):])
    except (OSError, ValueError):
        return -1


def logged_steps(run):
    try:
        return [r["step"] for r in metrics(run)]
    except (OSError, ValueError):
        return []  # a line being written


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mae-pretrain", required=True)
    ap.add_argument("--work-dir", required=True)
    args = ap.parse_args()
    shutil.rmtree(args.work_dir, ignore_errors=True)
    os.makedirs(args.work_dir)
    runs = Runs(args.mae_pretrain, args.work_dir)
    t0 = time.time()

    # A finished run: 16 steps, validation at every checkpoint (4, 8, 12, 16).
    a = os.path.join(args.work_dir, "a")
    runs.run(a)
    check(len(event_files(a)) == 1, f"fresh run: event files {event_files(a)}")
    check_run(a, "fresh run")
    # Resumed from an earlier checkpoint: steps 9..16 are computed again.
    before = {r["step"]: r for r in metrics(a)}
    runs.run(a, resume=os.path.join(a, "checkpoints", "step_00000008"))
    after = {r["step"]: r for r in metrics(a)}
    check(any(before[s]["samples_per_s"] != after[s]["samples_per_s"] for s in after if s > 8),
          "resume from step 8: the re-run steps have the same timings, so stale points would not show")
    check(len(event_files(a)) == 2, f"resume from step 8: event files {event_files(a)}")
    check_run(a, "resumed from step 8")
    # A dry run and a data check change nothing, not even the event files.
    snapshot = {n: open(os.path.join(a, n), "rb").read() for n in event_files(a)}
    subprocess.run(runs.args(a, resume="") + ["--dry-run"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(runs.args(a) + ["--check-data"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    check({n: open(os.path.join(a, n), "rb").read() for n in event_files(a)} == snapshot,
          "--dry-run / --check-data changed the event files")
    fresh = os.path.join(args.work_dir, "dry")
    p = subprocess.run(runs.args(fresh) + ["--dry-run"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    check(p.returncode == 0 and not os.path.exists(fresh), f"--dry-run: exit {p.returncode}, folder written")
    p = subprocess.run(runs.args(fresh) + ["--check-data"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    check(p.returncode == 0 and not os.path.exists(fresh), f"--check-data: exit {p.returncode}, folder written")

    # output.tensorboard=false: no event file, and the same losses (drawing the pictures takes
    # nothing from the random streams training uses; dropout draws from the global generator).
    off = os.path.join(args.work_dir, "off")
    runs.run(off, "output.tensorboard=false")
    check(event_files(off) == [] and len(metrics(off)) > 0, f"output.tensorboard=false: {os.listdir(off)}")
    off_losses = {r["step"]: (r["loss"], r["val_loss"]) for r in metrics(off)}
    on_losses = {s: (r["loss"], r["val_loss"]) for s, r in before.items()}
    check(off_losses == on_losses, f"losses differ with output.tensorboard=false:\n{off_losses}\n{on_losses}")

    # SIGINT after a checkpoint, then resume to 6 steps beyond.
    b = os.path.join(args.work_dir, "sigint")
    proc = runs.start(b, "train.max_steps=1000000", "train.log_every=1", "train.checkpoint_every=5",
                      "train.val_every=5")
    ok = wait_for(lambda: latest_step(b) >= 5 and len(logged_steps(b)) >= 7)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    check(ok and proc.returncode == 130, f"SIGINT: exit {proc.returncode}:\n{out[-2000:]}")
    stopped = latest_step(b)
    check(stopped >= 7, f"SIGINT: latest checkpoint at step {stopped}")
    runs.run(b, "train.log_every=1", "train.checkpoint_every=5", "train.val_every=5",
             f"train.max_steps={stopped + 6}", resume="")
    check(len(event_files(b)) == 2, f"SIGINT + resume: event files {event_files(b)}")
    check_run(b, "SIGINT + resume")

    # SIGKILL with steps logged after the last checkpoint; a TensorBoard reads the folder meanwhile.
    c = os.path.join(args.work_dir, "sigkill")
    sets = ["train.log_every=1", "train.checkpoint_every=5", "train.val_every=5"]
    proc = runs.start(c, "train.max_steps=1000000", *sets)
    ok = wait_for(lambda: latest_step(c) >= 5 and max(logged_steps(c) or [0]) >= latest_step(c) + 2)
    proc.kill()
    proc.communicate(timeout=120)
    check(ok, "SIGKILL: no steps logged after a checkpoint")
    killed_at = max(logged_steps(c))
    saved = latest_step(c)
    live = accumulator(c)  # has read the steps after the checkpoint
    orphans = [e.step for e in live.Scalars("train/loss") if e.step > saved]
    check(len(orphans) >= 2, f"SIGKILL: the open TensorBoard read no steps after checkpoint {saved}: {orphans}")
    runs.run(c, *sets, f"train.max_steps={saved + 8}", resume="")
    print(f"SIGKILL at step {killed_at}, checkpoint {saved}, resumed to {saved + 8}", flush=True)
    check_run(c, "SIGKILL + resume")
    live.Reload()
    check_run(c, "SIGKILL + resume, TensorBoard open meanwhile", acc=live)

    print(f"{time.time() - t0:.1f} s", flush=True)
    if failures:
        print(f"{len(failures)} failure(s)")
        return 1
    print("all TensorBoard checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
