#!/usr/bin/python3
"""Hostile inputs, as a user would try them: broken and impossible files, configs, checkpoints,
signals and two runs in one folder, run through the built programs (mae-check-data, mae-pretrain,
mae-reconstruct, mae-export, mae-bench, mae-bench-data).

Every case states what a user must see: the exit status (2 bad input/config/checkpoint, 1 failure
while running, 130 stopped by Ctrl-C), words the one-line message must hold (the file or key it
names and what is wrong), and that nothing already written was lost. Never a crash (a status
above 128 that was not asked for), never a hang (each program gets a time limit).

Usage: /usr/bin/python3 scripts/hostile_inputs.py [--build build] [--keep] [-k SUBSTRING]
Needs Debian's python3-numpy, python3-pydicom and mricron-data (scripts/setup.sh installs them).
Prints one line per case and ends with "hostile: N passed, M failed".
"""

import argparse
import gzip
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CH2 = "/usr/share/mricron/templates/ch2.nii.gz"
CH2BET = "/usr/share/mricron/templates/ch2bet.nii.gz"

args = None
work = None
results = []  # (name, ok, detail)


def app(name):
    return os.path.join(args.build, "apps", name)


def run(cmd, timeout=120, env=None):
    """Runs cmd; returns (status, output). status < 0: killed by that signal; None: timed out."""
    e = dict(os.environ)
    e.setdefault("MAE3D_CACHE_DIR", os.path.join(work, "cache"))
    if env:
        e.update(env)
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, env=e)
        return p.returncode, p.stdout.decode("utf-8", "replace")
    except subprocess.TimeoutExpired as t:
        return None, (t.stdout or b"").decode("utf-8", "replace")


def case(name, status, out, expect_status, must=(), must_not=(), extra_ok=True, extra_detail=""):
    """Records one case: status in expect_status, every word of `must` in the output (case-insensitive)."""
    if args.k and args.k not in name:
        return
    if isinstance(expect_status, int):
        expect_status = (expect_status,)
    low = out.lower()
    problems = []
    if status is None:
        problems.append("timed out")
    elif status not in expect_status:
        problems.append(f"exit {status}, expected {'/'.join(map(str, expect_status))}")
    for w in must:
        if w.lower() not in low:
            problems.append(f"output lacks {w!r}")
    for w in must_not:
        if w.lower() in low:
            problems.append(f"output has {w!r}")
    if not extra_ok:
        problems.append(extra_detail or "check failed")
    last = [l for l in out.strip().splitlines() if l.strip()]
    detail = "; ".join(problems) if problems else (last[-1][:160] if last else "")
    results.append((name, not problems, detail))
    if problems or not args.failures_only:
        print(f"{'ok  ' if not problems else 'FAIL'} {name}: {detail}", flush=True)


def want(name):
    return not args.k or args.k in name


# ---------------------------------------------------------------- files


def nifti_header(shape, datatype=16, bitpix=32, pixdim=(1.0, 1.0, 1.0), vox_offset=352.0, qform_code=1,
                 sform_code=0, quatern=(0.0, 0.0, 0.0), qoffset=(0.0, 0.0, 0.0), srow=None, ndim=None,
                 endian="<"):
    """A NIfTI-1 single-file header (348 bytes + 4-byte extension flag)."""
    h = bytearray(352)
    dims = list(shape) + [1] * (7 - len(shape))
    struct.pack_into(endian + "i", h, 0, 348)
    struct.pack_into(endian + "8h", h, 40, ndim if ndim is not None else len(shape), *dims)
    struct.pack_into(endian + "hh", h, 70, datatype, bitpix)
    struct.pack_into(endian + "8f", h, 76, 1.0, *pixdim, *([1.0] * (7 - len(pixdim))))
    struct.pack_into(endian + "f", h, 108, vox_offset)
    struct.pack_into(endian + "f", h, 112, 1.0)  # scl_slope
    struct.pack_into(endian + "hh", h, 252, qform_code, sform_code)
    struct.pack_into(endian + "6f", h, 256, *quatern, *qoffset)
    if srow is None:
        srow = [[pixdim[0], 0, 0, 0], [0, pixdim[1], 0, 0], [0, 0, pixdim[2], 0]]
    for r in range(3):
        struct.pack_into(endian + "4f", h, 280 + 16 * r, *srow[r])
    h[344:348] = b"n+1\0"
    return bytes(h)


def write_nifti(path, data=None, shape=(20, 20, 20), gz=None, **hdr):
    if data is None:
        data = (np.random.RandomState(0).rand(*shape[::-1]) * 100 + 1).astype("<f4")
    shape = data.shape[::-1]
    raw = nifti_header(shape, **hdr) + data.astype("<f4").tobytes()
    if gz if gz is not None else path.endswith(".gz"):
        raw = gzip.compress(raw)
    with open(path, "wb") as f:
        f.write(raw)
    return path


def write_mhd(path, data, compressed=False, cut=None):
    raw = data.astype("<f4").tobytes()
    if compressed:
        raw = zlib.compress(raw)
    if cut is not None:
        raw = raw[:cut]
    base = os.path.splitext(path)[0]
    ext = ".zraw" if compressed else ".raw"
    with open(base + ext, "wb") as f:
        f.write(raw)
    z, y, x = data.shape
    hdr = ["ObjectType = Image", "NDims = 3", f"DimSize = {x} {y} {z}", "ElementType = MET_FLOAT",
           "ElementSpacing = 1 1 1", "ElementByteOrderMSB = False"]
    if compressed:
        hdr += ["CompressedData = True", f"CompressedDataSize = {len(raw)}"]
    hdr.append(f"ElementDataFile = {os.path.basename(base + ext)}")
    with open(path, "w") as f:
        f.write("\n".join(hdr) + "\n")
    return path


def write_nrrd_gz(path, data, cut=None):
    z, y, x = data.shape
    body = gzip.compress(data.astype("<f4").tobytes())
    if cut is not None:
        body = body[:cut]
    hdr = (f"NRRD0004\ntype: float\ndimension: 3\nsizes: {x} {y} {z}\nspace: left-posterior-superior\n"
           "space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nendian: little\nencoding: gzip\n\n")
    with open(path, "wb") as f:
        f.write(hdr.encode() + body)
    return path


def write_dicom_series(folder, n=12, spacing=2.0, shift=None, duplicate=False):
    """A synthetic axial MR series written with pydicom; shift=(slice, mm) moves one slice."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.RandomState(1)
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.PatientName = "Synthetic^Phantom"
        ds.PatientID = "0"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        z = i * spacing
        if shift and shift[0] == i:
            z += shift[1]
        if duplicate and i == n - 1:
            z = (n - 2) * spacing
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = spacing
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = (rng.rand(16, 16) * 1000 + 10).astype("<u2").tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(os.path.join(folder, f"slice{i:03d}.dcm"), write_like_original=False)
    return folder


TINY_MODEL = {"img_size": [16, 16, 16], "patch_size": [4, 4, 4], "hidden_size": 24, "mlp_dim": 48,
              "num_layers": 1, "num_heads": 2, "decoder_hidden_size": 12, "decoder_mlp_dim": 24,
              "decoder_num_layers": 1, "decoder_num_heads": 2}


def tiny_config(name, dataset, **over):
    cfg = {"seed": 0, "device": "cpu", "threads": 1,
           "data": {"dataset": dataset, "val_fraction": 0, "workers": 1, "cache_dir": os.path.join(work, "cache")},
           "model": dict(TINY_MODEL),
           "train": {"batch_size": 2, "max_steps": 6, "log_every": 1, "checkpoint_every": 3, "keep_last": 5},
           "output": {"dir": os.path.join(work, "runs", name)}}
    for k, v in over.items():
        sec, key = k.split("__") if "__" in k else (None, k)
        (cfg[sec] if sec else cfg)[key] = v
    path = os.path.join(work, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return path, cfg


def tree_state(folder):
    """Every file under folder with its content hash: what 'nothing changed' compares."""
    state = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                state[os.path.relpath(p, folder)] = hashlib.sha1(fh.read()).hexdigest()
    return state


def check_data(path_or_list, *extra):
    return run([app("mae-check-data"), "--dataset", path_or_list, "--threads", "1", *extra], timeout=120)


# ---------------------------------------------------------------- cases


def cases_files():
    d = os.path.join(work, "files")
    os.makedirs(d)
    ch2 = open(CH2, "rb").read()
    # Truncated compressed streams, at several points.
    for frac in (0.06, 0.5, 0.99):
        p = os.path.join(d, f"trunc_{int(frac * 100)}.nii.gz")
        open(p, "wb").write(ch2[: int(len(ch2) * frac)])
        s, o = check_data(p, "--no-cache")
        case(f"truncated .nii.gz at {frac:.0%}", s, o, 2, [os.path.basename(p), "trunc"])
    vol = (np.random.RandomState(2).rand(24, 24, 24) * 100 + 1).astype("<f4")
    full = gzip.compress(nifti_header((24, 24, 24)) + vol.tobytes())
    p = os.path.join(d, "bad_crc.nii.gz")
    open(p, "wb").write(full[:-8] + b"\xde\xad\xbe\xef" + full[-4:])
    s, o = check_data(p, "--no-cache")
    case("gzip with a bad CRC", s, o, 2, ["bad_crc.nii.gz"])
    p = write_mhd(os.path.join(d, "trunc_z.mhd"), vol, compressed=True, cut=2000)
    s, o = check_data(p, "--no-cache")
    case("truncated MetaImage .zraw", s, o, 2, ["trunc_z"])
    p = write_nrrd_gz(os.path.join(d, "trunc.nrrd"), vol, cut=3000)
    s, o = check_data(p, "--no-cache")
    case("truncated gzip NRRD", s, o, 2, ["trunc.nrrd"])
    # Missing voxel data in uncompressed files.
    raw = nifti_header((24, 24, 24)) + vol.tobytes()
    p = os.path.join(d, "half.nii")
    open(p, "wb").write(raw[: 352 + len(vol.tobytes()) // 2])
    s, o = check_data(p, "--no-cache")
    case("uncompressed .nii cut to half", s, o, 2, ["half.nii"])
    p = os.path.join(d, "offset.nii")
    open(p, "wb").write(nifti_header((24, 24, 24), vox_offset=1e7) + vol.tobytes())
    s, o = check_data(p, "--no-cache")
    case("vox_offset past the end of the file", s, o, 2, ["offset.nii"])
    p = os.path.join(d, "huge.nii")
    open(p, "wb").write(nifti_header((1000, 1000, 1000)))
    t = time.time()
    s, o = check_data(p, "--no-cache")
    case("352-byte header claiming 1000^3 voxels", s, o, 2, ["huge.nii"], extra_ok=time.time() - t < 20,
         extra_detail=f"took {time.time() - t:.1f} s")
    p = write_mhd(os.path.join(d, "short.mhd"), vol, cut=1000)
    s, o = check_data(p, "--no-cache")
    case("MetaImage with a short data file", s, o, 2, ["short"])
    # Impossible geometry.
    for label, kw in [("pixdim 0", dict(pixdim=(1.0, 0.0, 1.0))), ("pixdim NaN", dict(pixdim=(1.0, float("nan"), 1.0))),
                      ("pixdim inf", dict(pixdim=(float("inf"), 1.0, 1.0))), ("pixdim -1", dict(pixdim=(1.0, 1.0, -1.0))),
                      ("pixdim 1e30", dict(pixdim=(1.0, 1.0, 1e30))),
                      ("quatern NaN", dict(quatern=(0.0, float("nan"), 0.0))),
                      ("qoffset NaN", dict(qoffset=(float("nan"), 0.0, 0.0))),
                      ("sform inf with a valid qform", dict(sform_code=1, srow=[[1, 0, 0, float("inf")], [0, 1, 0, 0], [0, 0, 1, 0]])),
                      ("sform NaN", dict(sform_code=1, qform_code=0, srow=[[float("nan"), 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]))]:
        p = write_nifti(os.path.join(d, "geom_" + label.split()[0] + "_" + str(abs(hash(label)) % 1000) + ".nii.gz"),
                        data=vol, **kw)
        s, o = check_data(p, "--no-cache")
        case(f"NIfTI {label}", s, o, 2, [os.path.basename(p)])
    # A non-finite sform must not crash any program that reads volumes.
    bad = write_nifti(os.path.join(d, "sform_nan.nii.gz"), data=vol, sform_code=1,
                      srow=[[float("nan"), 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    return d, vol, bad


def cases_geometry_config(d, vol):
    good = write_nifti(os.path.join(d, "good.nii.gz"), data=vol)
    cfg, _ = tiny_config("spacing", good, data__spacing_mm=[1e30, 1e30, 1e30])
    s, o = run([app("mae-pretrain"), "--config", cfg, "--dry-run"])
    case("data.spacing_mm 1e30", s, o, 2, ["spacing_mm"])
    one = os.path.join(d, "one_voxel.nii.gz")
    write_nifti(one, data=np.ones((1, 1, 1), "<f4"))
    s, o = check_data(one, "--no-cache")
    case("1x1x1 volume is not called 2D", s, o, 2, ["one_voxel", "single voxel"], must_not=["is 2D"])
    return good


def cases_dicom():
    base = os.path.join(work, "dicom")
    for label, kw, expect in [("jitter 0.5%", dict(shift=(5, 0.01)), 0), ("jitter 3.5% (GE-like)", dict(shift=(5, 0.07)), 0),
                              ("slice moved 20%", dict(shift=(5, 0.4)), 2), ("one slice missing", dict(shift=(5, 2.0)), 2),
                              ("duplicate position", dict(duplicate=True), 2)]:
        folder = write_dicom_series(os.path.join(base, label.split()[0] + str(abs(hash(label)) % 1000)), **kw)
        listing = os.path.join(base, os.path.basename(folder) + ".json")
        json.dump({"training": [{"image": folder}]}, open(listing, "w"))
        s, o = check_data(listing, "--no-cache")
        case(f"DICOM {label}", s, o, expect, [] if expect == 0 else [os.path.basename(folder), "slice"],
             must_not=["nonuniformity", "ITK"] if expect else [])
    # A folder holding one DICOM series, given directly as data.dataset, is that series.
    folder = write_dicom_series(os.path.join(base, "direct"))
    cfg, _ = tiny_config("dicom_direct", folder, train__batch_size=1)
    s, o = run([app("mae-pretrain"), "--config", cfg, "--dry-run"])
    case("a DICOM folder as data.dataset", s, o, 0, must_not=["lists no training volumes"])


def cases_data_lists(d, vol, good):
    # The same file listed twice.
    lst = os.path.join(d, "twice.txt")
    other = write_nifti(os.path.join(d, "other.nii.gz"), data=vol * 2)
    open(lst, "w").write(f"{good}\n{other}\n{good}\n")
    cfg, _ = tiny_config("twice", lst, data__val_fraction=0.34)
    s, o = run([app("mae-pretrain"), "--config", cfg, "--dry-run"])
    case("the same file listed twice", s, o, 2, ["good.nii.gz"])
    # All-zero and constant volumes.
    for label, data in [("all-zero", np.zeros((24, 24, 24), "<f4")), ("constant", np.full((24, 24, 24), 7, "<f4"))]:
        p = write_nifti(os.path.join(d, f"v_{label[:3]}.nii.gz"), data=data)
        s, o = check_data(p, "--no-cache")
        case(f"{label} volume is reported", s, o, (0, 2), [os.path.basename(p), "constant"])
    # Cache hit on changed content with the old mtime restored.
    p = os.path.join(d, "changing.nii")
    open(p, "wb").write(nifti_header((24, 24, 24)) + np.full((24, 24, 24), 7, "<f4").tobytes())
    s1, o1 = check_data(p)
    st = os.stat(p)
    ramp = np.arange(24 * 24 * 24, dtype="<f4").reshape(24, 24, 24) % 1001
    open(p, "wb").write(nifti_header((24, 24, 24)) + ramp.tobytes())
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    s2, o2 = check_data(p)
    case("cache on same-size content with the old mtime", s2, o2, (0, 2), must_not=["[7, 7]"],
         extra_ok="1000" in o2 or "1e+03" in o2, extra_detail="new range not shown")
    # A symlink loop in a dataset folder.
    f = os.path.join(d, "loopdir")
    os.makedirs(f)
    shutil.copy(good, os.path.join(f, "a.nii.gz"))
    os.symlink("loop", os.path.join(f, "loop"))
    s, o = check_data(f, "--no-cache")
    case("symlink loop in a dataset folder", s, o, 2, ["loop"], must_not=["filesystem error"])
    # A file name with a newline.
    p = os.path.join(d, "new\nline.nii.gz")
    shutil.copy(CH2BET, p)
    p2 = os.path.join(d, "new\nline_trunc.nii.gz")
    open(p2, "wb").write(open(CH2, "rb").read()[:100000])
    ds = os.path.join(d, "newline.json")
    json.dump({"training": [{"image": p}, {"image": p2}]}, open(ds, "w"))
    s, o = check_data(ds, "--no-cache")
    lines_ok = all(not l.startswith("line") for l in o.splitlines())
    case("file name with a newline stays on one line", s, o, 2, extra_ok=lines_ok, extra_detail="a line was split")
    # check-data summary counts refusals by cause.
    ds = os.path.join(d, "mixed.txt")
    open(ds, "w").write("\n".join([good, os.path.join(d, "trunc_50.nii.gz"), os.path.join(d, "trunc_99.nii.gz"),
                                   os.path.join(d, "half.nii")]) + "\n")
    s, o = check_data(ds, "--no-cache")
    case("check-data summary by cause", s, o, 2, ["trunc"])


def cases_config(good):
    cfg, tree = tiny_config("cfg", good)
    text = json.dumps(tree)
    dup = text.replace('"max_steps": 6', '"lr": 5.0, "max_steps": 6, "lr": 0.001')
    p = os.path.join(work, "dup.json")
    open(p, "w").write(dup)
    s, o = run([app("mae-pretrain"), "--config", p, "--dry-run"])
    case("duplicate key train.lr", s, o, 2, ["train.lr", "twice"])
    p = os.path.join(work, "dup2.json")
    open(p, "w").write(text[:-1] + ', "data": {"dataset": "x"}}')
    s, o = run([app("mae-pretrain"), "--config", p, "--dry-run"])
    case("two data sections", s, o, 2, ['"data" appears twice'])
    for setting, word in [("train.batch_size=1.5", "batch_size"), ("threads=true", "threads"),
                          ("data.time_point=18446744073709551615", "time_point"), ("threads=4294967296", "threads"),
                          ("seed=1e30", "1e+30"), ("model.img_size=[16,16", "[16,16"), ("train.lr=-1", "lr"),
                          ("train.lr=1e400", "lr")]:
        s, o = run([app("mae-pretrain"), "--config", cfg, "--dry-run", "--set", setting])
        case(f"--set {setting}", s, o, 2, [word], must_not=["another type"])
    s, o = run([app("mae-pretrain"), "--config", work, "--dry-run"])
    case("--config is a folder", s, o, 2, [os.path.basename(work)], must_not=["underflow"])
    # Refused before anything is allocated: by the size bounds of model.img_size, or by the memory
    # estimate for sizes within them.
    for size, patch, word in [("[4096,4096,4096]", 16, "img_size"), ("[1024,1024,1024]", 16, "model."),
                              ("[1024,1024,1024]", 32, "memory")]:
        s, o = run([app("mae-pretrain"), "--config", cfg, "--dry-run", "--set", f"model.img_size={size}",
                    "--set", f"model.patch_size=[{patch},{patch},{patch}]"], timeout=60)
        case(f"--dry-run model.img_size={size} patch {patch} is refused", s, o, 2, [word])
    s, o = run([app("mae-bench"), "--device", "banana"])
    case("mae-bench --device banana", s, o, 2, ["banana"])
    s, o = run([app("mae-bench"), "--iters", "0"])
    case("mae-bench --iters 0", s, o, 2, ["iters"], extra_ok=len(o) < 2000, extra_detail=f"{len(o)} characters")
    s, o = run([app("mae-bench-data"), "--mri", "/nonexistent"])
    case("mae-bench-data --mri /nonexistent", s, o, 2, ["/nonexistent"])


def train(name, dataset, extra=(), **over):
    cfg, tree = tiny_config(name, dataset, **over)
    s, o = run([app("mae-pretrain"), "--config", cfg, *extra], timeout=300)
    if s != 0:
        if not args.failures_only:
            print(f"  (set-up run {name} failed: exit {s}: {o.strip().splitlines()[-1:]})")
    return cfg, tree["output"]["dir"]


def ckpt(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


def copy_run(src, name):
    dst = os.path.join(work, "runs", name)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def resume(cfg, run_dir, path=None, extra=()):
    cmd = [app("mae-pretrain"), "--config", cfg, "--set", f"output.dir={run_dir}", "--resume"]
    if path:
        cmd.append(path)
    return run(cmd + list(extra), timeout=300)


def cases_checkpoints(d, vol, bad_sform):
    lst = os.path.join(d, "train.txt")
    vols = [write_nifti(os.path.join(d, f"t{i}.nii.gz"), data=(np.random.RandomState(10 + i).rand(20, 20, 20) + 1).astype("<f4"))
            for i in range(2)]
    open(lst, "w").write("\n".join(vols) + "\n")
    cfg, A = train("A", lst)
    _, B = train("B", lst, seed=5)
    _, B2 = train("B2", lst)  # the same config as A, another run
    wide = dict(TINY_MODEL, hidden_size=48, mlp_dim=96)
    _, W = train("W", lst, model=wide)
    cfg10, _ = tiny_config("A", lst, train__max_steps=12)

    # A model.pt of another architecture.
    R = copy_run(A, "arch")
    shutil.copy(os.path.join(ckpt(W, 6), "model.pt"), os.path.join(ckpt(R, 6), "model.pt"))
    s, o = run([app("mae-export"), "--checkpoint", R, "--format", "monai-vit", "--out", os.path.join(work, "x.pt")])
    case("export: model.pt of another architecture", s, o, 2, ["model.pt"], must_not=["mat1"])
    s, o = run([app("mae-export"), "--checkpoint", R, "--features", vols[0], "--out", os.path.join(work, "f.pt")])
    case("features: model.pt of another architecture", s, o, 2, ["model.pt"], must_not=["mat1"])
    s, o = run([app("mae-reconstruct"), "--checkpoint", R, "--input", vols[0], "--out", os.path.join(work, "rec")])
    case("reconstruct: model.pt of another architecture", s, o, 2, ["model.pt"], must_not=["mat1"])
    s, o = resume(cfg10, R)
    case("resume: model.pt of another architecture", s, o, 2, ["model.pt"], must_not=["mat1"])

    # Parts of another run or step.
    for part in ("model.pt", "optimizer.pt", "rng.pt"):
        if not os.path.exists(os.path.join(ckpt(A, 6), part)):
            continue
        R = copy_run(A, "mix_" + part)
        shutil.copy(os.path.join(ckpt(B, 6), part), os.path.join(ckpt(R, 6), part))
        s, o = resume(cfg10, R)
        case(f"resume: {part} of another run", s, o, 2, [part])
    R = copy_run(A, "mix_step")
    shutil.copy(os.path.join(ckpt(A, 3), "model.pt"), os.path.join(ckpt(R, 6), "model.pt"))
    s, o = resume(cfg10, R)
    case("resume: model.pt of another step", s, o, 2, ["model.pt"])
    R = copy_run(A, "mix_meta")
    m = json.load(open(os.path.join(ckpt(R, 6), "meta.json")))
    m["step"] = 7
    json.dump(m, open(os.path.join(ckpt(R, 6), "meta.json"), "w"))
    s, o = resume(cfg10, R)
    case("resume: meta.json step 7 beside trainer_state step 6", s, o, 2, ["step"])

    # Numbers in trainer_state.json.
    for field, value in [("loader_epoch", 4611686018427387904), ("loader_epoch", 2 ** 63 - 2), ("loader_epoch", 2 ** 63 - 1),
                         ("step", -5), ("step", 1.5), ("step", True)]:
        R = copy_run(A, f"state_{field}_{abs(hash(str(value))) % 1000}")
        p = os.path.join(ckpt(R, 6), "trainer_state.json")
        st = json.load(open(p))
        if field not in st:
            case(f"trainer_state {field}={value}", 2, f"no field {field} in trainer_state.json", 2,
                 extra_ok=False, extra_detail=f"no field {field}")
            continue
        st[field] = value
        json.dump(st, open(p, "w"))
        s, o = resume(cfg10, R)
        case(f"resume: trainer_state.json {field}={value}", s, o, 2, ["trainer_state.json", field])

    # A dry run changes nothing; a foreign resume deletes nothing.
    R = copy_run(A, "dry")
    before = tree_state(R)
    s, o = resume(cfg10, R, ckpt(R, 3), extra=["--dry-run"])
    case("--dry-run --resume an earlier checkpoint changes nothing", s, o, (0, 2), extra_ok=tree_state(R) == before,
         extra_detail="the run folder changed")
    before = tree_state(R)
    s, o = resume(cfg10, R, ckpt(B2, 3))
    case("--resume another run's checkpoint deletes nothing of this run", s, o, (0, 2),
         extra_ok=all(k in tree_state(R) for k in before), extra_detail="files of this run were deleted")
    s, o = run([app("mae-pretrain"), "--config", cfg, "--set", f"output.dir={os.path.join(work, 'never')}", "--dry-run"])
    case("--dry-run creates no run folder", s, o, 0, extra_ok=not os.path.exists(os.path.join(work, "never")),
         extra_detail="folder created")
    if not os.path.exists("/config.json") and not os.path.exists("/train.log"):
        s, o = run([app("mae-pretrain"), "--config", cfg, "--set", "output.dir=/", "--dry-run"])
        case("--dry-run with output.dir=/ writes nothing", s, o, (0, 2),
             extra_ok=not os.path.exists("/config.json") and not os.path.exists("/train.log"), extra_detail="wrote in /")
        for f in ("/config.json", "/train.log"):
            if os.path.exists(f):
                os.remove(f)

    # Diverged checkpoint.
    huge = [write_nifti(os.path.join(d, f"h{i}.nii.gz"), data=((np.random.RandomState(i).rand(20, 20, 20) + 1) * 1e20).astype("<f4"))
            for i in range(2)]
    hl = os.path.join(d, "huge.txt")
    open(hl, "w").write("\n".join(huge) + "\n")
    _, D = train("D", hl, data__intensity={"mode": "none"}, data__cache_dir="")
    div = [p for p in os.listdir(os.path.join(D, "checkpoints")) if p.startswith("diverged")] if os.path.isdir(os.path.join(D, "checkpoints")) else []
    if div:
        s, o = run([app("mae-export"), "--checkpoint", os.path.join(D, "checkpoints", div[0]), "--format", "monai-vit",
                    "--out", os.path.join(work, "div.pt")])
        case("export of a diverged checkpoint", s, o, 2, ["diverged"])
        path = os.path.join(D, "checkpoints", div[0])
        s, o = run([app("mae-reconstruct"), "--checkpoint", path, "--input", vols[0], "--out", os.path.join(work, "rec_d")])
        case("reconstruct of a diverged checkpoint says so", s, o.replace(path, "CKPT"), (0, 2), ["diverged"])
    else:
        case("diverged checkpoint written", 1, "no diverged checkpoint", 0, extra_ok=False)

    # Non-finite sform through every program.
    s, o = run([app("mae-reconstruct"), "--checkpoint", A, "--input", bad_sform, "--out", os.path.join(work, "r2")])
    case("reconstruct --input with a NaN sform", s, o, 2, ["sform_nan"])
    s, o = run([app("mae-export"), "--checkpoint", A, "--features", bad_sform, "--out", os.path.join(work, "f2.pt")])
    case("export --features with a NaN sform", s, o, 2, ["sform_nan"])
    bl = os.path.join(d, "with_bad.txt")
    open(bl, "w").write("\n".join(vols + [bad_sform]) + "\n")
    c2, _ = tiny_config("badlist", bl)
    s, o = run([app("mae-pretrain"), "--config", c2])
    case("pretrain pre-flight with a NaN sform reports the file", s, o, 2, ["sform_nan"])
    s, o = run([app("mae-bench-data"), "--mri", bad_sform])
    case("mae-bench-data with a NaN sform", s, o, (1, 2), ["sform_nan"])
    s, o = run([app("mae-reconstruct"), "--checkpoint", A, "--input", vols[0], "--out", os.path.join(work, "r3"),
                "--overlap", "0.999"], timeout=60)
    case("reconstruct --overlap 0.999", s, o, (0, 2), ["overlap"])
    return lst, vols, A


def cases_concurrency(lst, A):
    cfg, tree = tiny_config("live", lst, train__max_steps=100000, train__checkpoint_every=1, train__keep_last=1)
    run_dir = tree["output"]["dir"]
    env = dict(os.environ, MAE3D_CACHE_DIR=os.path.join(work, "cache"))
    first = subprocess.Popen([app("mae-pretrain"), "--config", cfg], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    t = time.time()
    while not os.path.exists(os.path.join(run_dir, "checkpoints", "latest")) and time.time() - t < 60:
        time.sleep(0.1)
    s, o = run([app("mae-pretrain"), "--config", cfg], timeout=60)
    case("a second mae-pretrain in the same folder", s, o, 2, [str(first.pid)])
    failures = []
    for i in range(20):
        s, o = run([app("mae-export"), "--checkpoint", run_dir, "--format", "monai-vit", "--out",
                    os.path.join(work, f"live{i}.pt")], timeout=60)
        if s != 0:
            failures.append(o.strip().splitlines()[-1:] if o.strip() else s)
    case("20 exports of a run that is training", 0, f"{20 - len(failures)} of 20 exported", 0,
         extra_ok=not failures, extra_detail=f"{len(failures)} failed: {failures[:2]}")
    first.send_signal(signal.SIGINT)
    try:
        out = first.communicate(timeout=60)[0].decode("utf-8", "replace")
        st = first.returncode
    except subprocess.TimeoutExpired:
        first.kill()
        out, st = "", None
    case("SIGINT to the training run", st, out, 130, ["resume"])

    # SIGINT at random early moments. The handlers are installed from the executable's
    # .preinit_array, after the dynamic loader has mapped LibTorch and ITK; a signal that lands while
    # the loader is still at work (tens of ms on a loaded machine) ends the process by the default
    # action before any of its code ran. That is a clean end too, as long as nothing was written.
    bad = []
    for delay in (0.02, 0.1, 0.2, 0.3, 0.45):
        c, tr = tiny_config(f"early{int(delay * 100)}", lst)
        p = subprocess.Popen([app("mae-pretrain"), "--config", c], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out = p.communicate(timeout=120)[0].decode("utf-8", "replace")
        untouched = not out.strip() and not os.path.exists(tr["output"]["dir"])
        if p.returncode not in (130, 0) and not (p.returncode == -signal.SIGINT and untouched):
            bad.append(f"{delay}s: exit {p.returncode}" + ("" if untouched else f" after writing: {out.strip()[-200:]!r}"))
    case("SIGINT in the first 0.45 s is a handled exit", 0, "", 0, extra_ok=not bad, extra_detail="; ".join(bad))

    # SIGINT during the pre-flight.
    # 30 distinct volumes (ch2 with one voxel changed each), upsampled: a pre-flight of many seconds.
    many = os.path.join(work, "files", "many")
    os.makedirs(many, exist_ok=True)
    raw = bytearray(gzip.decompress(open(CH2, "rb").read()))
    for i in range(30):
        raw[-1 - i] = (raw[-1 - i] + 1) % 256
        open(os.path.join(many, f"ch2_{i}.nii"), "wb").write(raw)
    c, _ = tiny_config("preflight", many, data__spacing_mm=[0.7, 0.7, 0.7], data__cache_dir="")
    p = subprocess.Popen([app("mae-pretrain"), "--config", c, "--threads", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=env)
    # The signal goes when the pre-flight has begun, not after a fixed time, which on a fast and
    # quiet machine could already be past its end.
    lines = []
    for raw_line in p.stdout:
        lines.append(raw_line.decode("utf-8", "replace"))
        if "pre-flight check of" in lines[-1]:
            break
    p.send_signal(signal.SIGINT)
    out = "".join(lines) + p.communicate(timeout=120)[0].decode("utf-8", "replace")
    # Had the pre-flight ended first, the run would stop in training: a checkpoint, not exit 130.
    case("SIGINT during the pre-flight", p.returncode, out, 130, must_not=["checkpoint  (", "continue with --resume"])


def main():
    global args, work
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("-k", default="", help="only cases whose name holds this")
    ap.add_argument("--failures-only", action="store_true",
                    help="print only the failed cases and the summary (as ctest runs it: a failure is then the first thing shown)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="mae3d_hostile_")
    os.makedirs(os.path.join(work, "runs"))
    try:
        d, vol, bad = cases_files()
        for prog in ("mae-check-data",):
            s, o = check_data(bad, "--no-cache")
            case("check-data with a NaN sform", s, o, 2, ["sform_nan"])
        good = cases_geometry_config(d, vol)
        cases_dicom()
        cases_data_lists(d, vol, good)
        cases_config(good)
        lst, vols, A = cases_checkpoints(d, vol, bad)
        cases_concurrency(lst, A)
    finally:
        if args.keep:
            print("scratch:", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    passed = sum(1 for r in results if r[1])
    failed = [r for r in results if not r[1]]
    print(f"hostile: {passed} passed, {len(failed)} failed" + "".join(f"\n  FAIL {n}: {d}" for n, _, d in failed))
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
