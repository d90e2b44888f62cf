"""mae-pretrain under the real torchrun (torch.distributed.run of the test Python's torch), with the
rendezvous backends users pick: "static" and "c10d". torchrun's agent hosts the TCPStore on the
MASTER_PORT it hands the ranks (TORCHELASTIC_USE_AGENT_STORE=True), so every rank must join it as
a client. A build against LibTorch 2.x trains (world_size 2 in metrics.jsonl, one checkpoint
folder, rank 0 alone writing); a build against 1.13 must refuse at once with exit 2 and a message
naming the variable instead of hanging. Exit 77 (skipped) when this Python's torch is older than 2
(Debian's torchrun 1.13 does not start under Python 3.11).

    test_torchrun.py --mae-pretrain PATH --libtorch-version X.Y.Z --work-dir DIR
"""
import argparse
import array
import gzip
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time


def write_volume(path, n, seed):
    """A small float32 NIfTI-1 volume (noise around a blob) with the standard library only."""
    h = bytearray(352)
    struct.pack_into("<i", h, 0, 348)
    struct.pack_into("<8h", h, 40, 3, n, n, n, 1, 1, 1, 1)
    struct.pack_into("<hh", h, 70, 16, 32)
    struct.pack_into("<8f", h, 76, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", h, 108, 352.0)
    struct.pack_into("<f", h, 112, 1.0)
    struct.pack_into("<hh", h, 252, 0, 1)
    for r in range(3):
        row = [0.0] * 4
        row[r] = 1.0
        struct.pack_into("<4f", h, 280 + 16 * r, *row)
    h[344:348] = b"n+1\0"
    rng = random.Random(seed)
    data = array.array("f", [50.0 + rng.random() * 100.0 for _ in range(n * n * n)])
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(bytes(h) + data.tobytes())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mae-pretrain", required=True)
    ap.add_argument("--libtorch-version", required=True)
    ap.add_argument("--work-dir", required=True)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("skipped: this Python has no torch (torchrun)")
        return 77
    if int(torch.__version__.split(".")[0]) < 2:
        print(f"skipped: torch {torch.__version__}'s torchrun; the test needs torch >= 2")
        return 77

    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    with open(os.path.join(work, "list.txt"), "w") as lst:
        for v in range(4):
            write_volume(os.path.join(work, f"vol{v}.nii.gz"), 20, v)
            lst.write(f"vol{v}.nii.gz\n")
    config = {
        "device": "cpu",
        "seed": 3,
        "data": {"dataset": os.path.join(work, "list.txt"), "cache_dir": os.path.join(work, "cache"),
                 "val_fraction": 0, "intensity": {"mode": "zscore_nonzero"}, "workers": 1},
        "model": {"img_size": [16, 16, 16], "patch_size": [8, 8, 8], "hidden_size": 24, "mlp_dim": 48,
                  "num_layers": 1, "num_heads": 2, "decoder_hidden_size": 12, "decoder_mlp_dim": 24,
                  "decoder_num_layers": 1, "decoder_num_heads": 2},
        "train": {"batch_size": 1, "max_steps": 4, "log_every": 1, "checkpoint_every": 4, "lr": 1e-3,
                  "lr_warmup_steps": 1},
        "output": {"dir": os.path.join(work, "run"), "tensorboard": False},
        "distributed": {"timeout_s": 30},
    }
    config_path = os.path.join(work, "config.json")
    with open(config_path, "w") as f:
        json.dump(config, f)

    joins = not args.libtorch_version.startswith("1.")
    failures = []
    for backend in ("static", "c10d"):
        port = free_port()
        out_dir = os.path.join(work, "run_" + backend)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--rdzv-backend", backend]
        if backend == "static":
            cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port), "--node-rank", "0"]
        else:
            cmd += ["--rdzv-endpoint", f"127.0.0.1:{port}"]
        cmd += ["--no-python", args.mae_pretrain, "--config", config_path, "--threads", "1",
                "--set", "output.dir=" + out_dir]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                 "MASTER_ADDR", "MASTER_PORT")}
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired as e:
            failures.append(f"{backend}: torchrun did not finish within 180 s: {e.stderr}")
            continue
        seconds = time.monotonic() - t0
        text = p.stdout + p.stderr
        print(f"--- rdzv backend {backend}: torchrun exit {p.returncode} after {seconds:.1f} s")
        if joins:
            if p.returncode != 0:
                failures.append(f"{backend}: torchrun exited {p.returncode}:\n{text[-3000:]}")
                continue
            with open(os.path.join(out_dir, "metrics.jsonl")) as f:
                records = [json.loads(line) for line in f]
            steps = [r["step"] for r in records]
            if steps != [1, 2, 3, 4] or any(r["world_size"] != 2 for r in records):
                failures.append(f"{backend}: metrics.jsonl steps {steps}, world sizes "
                                f"{[r['world_size'] for r in records]}")
            ckpts = sorted(os.listdir(os.path.join(out_dir, "checkpoints")))
            if ckpts != ["latest", "step_00000004"]:
                failures.append(f"{backend}: checkpoints {ckpts}")
            print(f"    losses {[round(r['loss'], 6) for r in records]}")
        else:
            if p.returncode == 0 or "TORCHELASTIC_USE_AGENT_STORE" not in text:
                failures.append(f"{backend}: a LibTorch {args.libtorch_version} build must refuse torchrun's "
                                f"agent store naming TORCHELASTIC_USE_AGENT_STORE; exit {p.returncode}:\n"
                                f"{text[-3000:]}")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
