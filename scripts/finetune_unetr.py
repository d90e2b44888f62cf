#!/usr/bin/env python3
"""Fine-tunes MONAI's UNETR from an mae3d encoder (mae-export --format monai-unetr) on a real label map.

The README's fine-tuning snippet as a script. It builds monai.networks.nets.UNETR from the export's
JSON (its constructor call, with out_channels = the number of classes), loads encoder_unetr.pt into
it (only vit.* is pretrained: no unexpected key and no missing vit.* key allowed; unused
cross-attention keys of another MONAI release are dropped, as the JSON's load snippet does),
repeats the training preprocessing that the JSON lists (reorientation, resampling, intensity,
foreground crop, float16 rounding, axis order) on the image and, with nearest-neighbour resampling,
on the label map, and runs a few steps of supervised training (AdamW, MONAI's DiceCELoss) on random
crops of the model's img_size.

Default data: Debian's mricron-data, the Colin27 T1 (ch2.nii.gz) and the AAL atlas (aal.nii.gz) on
the same grid, the AAL regions merged into six groups (frontal, temporal, parietal, occipital, deep
grey/insula/cingulate, cerebellum) plus background; --groups largest takes the N largest labels
of any atlas instead. A label map on another grid than the image is resampled onto it (nearest
neighbour, by the NIfTI affines).

Prints one line per step, then one JSON line: {"dice": mean Dice over the label groups, of a
sliding-window prediction of the whole (training) volume, "steps": N, "init": "pretrained" or
"scratch", ...}. --scratch runs the same thing (same seed: same decoder initialisation and crops)
from a random encoder. NIfTI-1 is read here (gzip + struct): no nibabel or ITK needed.

  build/venv-py/bin/python scripts/finetune_unetr.py --encoder runs/demo/encoder_unetr.pt --steps 50
"""
import argparse
import ast
import gzip
import json
import math
import os
import re
import struct
import sys
import time

import torch
import torch.nn.functional as F

TEMPLATES = "/usr/share/mricron/templates"

# AAL region name prefixes -> group; every AAL name must match exactly one.
AAL_GROUPS = [
    ("frontal", ("Precentral", "Frontal_", "Rolandic_Oper", "Supp_Motor_Area", "Olfactory", "Rectus",
                 "Paracentral_Lobule")),
    ("temporal", ("Temporal_", "Heschl", "Hippocampus", "ParaHippocampal", "Amygdala", "Fusiform")),
    ("parietal", ("Postcentral", "Parietal_", "SupraMarginal", "Angular", "Precuneus")),
    ("occipital", ("Calcarine", "Cuneus", "Lingual", "Occipital_")),
    ("deep-grey/insula/cingulate", ("Caudate", "Putamen", "Pallidum", "Thalamus", "Insula", "Cingulum_")),
    ("cerebellum", ("Cerebelum_", "Vermis_")),
]


class Failure(Exception):
    """A one-line error for the user."""


# --- NIfTI-1 -----------------------------------------------------------------------------------

NIFTI_TYPES = {2: (torch.uint8, 1), 4: (torch.int16, 2), 8: (torch.int32, 4), 16: (torch.float32, 4),
               64: (torch.float64, 8), 256: (torch.int8, 1), 512: (torch.int16, 2), 768: (torch.int32, 4)}


def quaternion_affine(b, c, d, qfac, pixdim, offset):
    a = math.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    r = [[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]]
    scale = [pixdim[1], pixdim[2], pixdim[3] * (-1.0 if qfac < 0 else 1.0)]
    m = torch.eye(4, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            m[i, j] = r[i][j] * scale[j]
        m[i, 3] = offset[i]
    return m


def read_nifti(path):
    """(data (i, j, k) tensor, 4x4 voxel-to-RAS affine) of a 3D NIfTI-1 file (.nii or .nii.gz)."""
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise Failure(f"{path}: cannot read: {e}") from None
    if len(raw) < 348:
        raise Failure(f"{path}: not a NIfTI-1 file (only {len(raw)} bytes)")
    end = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    if struct.unpack(end + "i", raw[:4])[0] != 348 or raw[344:347] not in (b"n+1", b"ni1"):
        raise Failure(f"{path}: not a NIfTI-1 file")
    dim = struct.unpack(end + "8h", raw[40:56])
    datatype = struct.unpack(end + "h", raw[70:72])[0]
    pixdim = struct.unpack(end + "8f", raw[76:108])
    vox_offset = int(struct.unpack(end + "f", raw[108:112])[0])
    slope, inter = struct.unpack(end + "2f", raw[112:120])
    qform_code, sform_code = struct.unpack(end + "2h", raw[252:256])
    quatern = struct.unpack(end + "6f", raw[256:280])
    srow = struct.unpack(end + "12f", raw[280:328])
    if dim[0] < 3 or any(d != 1 for d in dim[4:dim[0] + 1]):
        raise Failure(f"{path}: {dim[0]}D image {dim[1:dim[0] + 1]}; only 3D volumes are supported")
    if datatype not in NIFTI_TYPES:
        raise Failure(f"{path}: NIfTI datatype {datatype} is not supported")
    dtype, size = NIFTI_TYPES[datatype]
    nx, ny, nz = dim[1:4]
    count = nx * ny * nz
    payload = raw[vox_offset if raw[344:347] == b"n+1" else 0:][:count * size]
    if raw[344:347] == b"ni1":
        raise Failure(f"{path}: a .hdr/.img pair; give a single-file .nii or .nii.gz")
    if len(payload) < count * size:
        raise Failure(f"{path}: truncated data ({len(payload)} of {count * size} bytes)")
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    if end == ">" and size > 1:
        data = data.view(-1, size).flip(1).reshape(-1)
    if datatype == 512:  # uint16: widen
        data = data.view(torch.int16).to(torch.int32) & 0xFFFF
    elif datatype == 768:  # uint32
        data = data.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    else:
        data = data.view(dtype)
    data = data.reshape(nz, ny, nx).permute(2, 1, 0).contiguous()  # file order: i fastest
    if slope not in (0.0, 1.0) or inter != 0.0:
        data = data.to(torch.float32) * (slope if slope != 0.0 else 1.0) + inter
    if sform_code > 0:
        affine = torch.eye(4, dtype=torch.float64)
        affine[:3, :] = torch.tensor(srow, dtype=torch.float64).view(3, 4)
    elif qform_code > 0:
        affine = quaternion_affine(*quatern[:3], pixdim[0], pixdim, quatern[3:])
    else:
        affine = torch.diag(torch.tensor([pixdim[1], pixdim[2], pixdim[3], 1.0], dtype=torch.float64))
    return data, affine


# --- geometry and preprocessing (as mae3d's lib/io and lib/data do it) ------------------------------

POSITIVE, NEGATIVE = "RAS", "LPI"  # letter of the +/- direction of each RAS world axis


def orientation_code(affine):
    """nibabel/MONAI-convention code (letter = where each index increases towards) of an affine."""
    d = affine[:3, :3]
    best, best_score = None, -1.0
    for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        score = 1.0
        for j in range(3):
            score *= abs(float(d[perm[j], j]))
        if score > best_score + 1e-12:
            best, best_score = perm, score
    return "".join(POSITIVE[a] if d[a, j] >= 0 else NEGATIVE[a] for j, a in enumerate(best))


def reorient(volumes, affine, code):
    """Permutes / flips (C, i, j, k) tensors so that the index axes point to `code`."""
    current = orientation_code(affine)
    code = code.upper()
    if current == code:
        return volumes, affine

    def axis_of(letter):
        return POSITIVE.index(letter) if letter in POSITIVE else NEGATIVE.index(letter)

    source = [next(i for i in range(3) if axis_of(current[i]) == axis_of(code[j])) for j in range(3)]
    flip = [current[source[j]] != code[j] for j in range(3)]
    sizes = volumes[0].shape[1:]
    new = torch.eye(4, dtype=torch.float64)
    first = [0.0, 0.0, 0.0]
    for j in range(3):
        new[:3, j] = affine[:3, source[j]] * (-1.0 if flip[j] else 1.0)
        if flip[j]:
            first[source[j]] = sizes[source[j]] - 1.0
    new[:3, 3] = affine[:3, :3] @ torch.tensor(first, dtype=torch.float64) + affine[:3, 3]
    out = []
    for v in volumes:
        v = v.permute(0, *[1 + s for s in source])
        dims = [1 + j for j in range(3) if flip[j]]
        out.append((v.flip(dims) if dims else v).contiguous())
    return out, new


def spacing_of(affine):
    return [float(affine[:3, j].norm()) for j in range(3)]


def gaussian_smooth(x, axis, sigma_vox):
    """x (C, i, j, k) smoothed along spatial `axis` (0..2) with a normalised Gaussian (edges replicated)."""
    radius = max(1, int(math.ceil(4.0 * sigma_vox)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma_vox) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    moved = x.movedim(axis + 1, -1)
    shape = moved.shape
    flat = moved.reshape(-1, 1, shape[-1])
    flat = F.pad(flat, (radius, radius), mode="replicate")
    out = F.conv1d(flat, kernel.view(1, 1, -1)).reshape(shape)
    return out.movedim(-1, axis + 1).contiguous()


def resample_axis(x, axis, positions, nearest):
    """Samples x (C, i, j, k) along spatial `axis` at continuous index `positions` (clamped to the grid)."""
    n = x.shape[axis + 1]
    p = positions.clamp(0, n - 1)
    if nearest:
        return x.index_select(axis + 1, torch.floor(p + 0.5).long().clamp(0, n - 1))
    lo = torch.floor(p).long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    w = (p - lo.to(p.dtype)).to(torch.float32)
    shape = [1, 1, 1, 1]
    shape[axis + 1] = -1
    w = w.view(shape)
    return x.index_select(axis + 1, lo) * (1 - w) + x.index_select(axis + 1, hi) * w


def resample(x, spacing, new_spacing, nearest):
    """mae3d's resample: same origin and direction, size round(extent / new spacing), linear with a
    Gaussian of sigma sqrt(s_new^2 - s_old^2) / (2 sqrt(2 ln 2)) mm before downsampling (labels: nearest).

    Returns (x, support): support marks the voxels mae3d's resample leaves nonzero. ITK's recursive
    (IIR) Gaussian spreads tiny nonzero values along the whole line of every smoothed axis, where this
    FIR Gaussian leaves exact zeros, and zscore_nonzero counts those voxels; support follows that rule
    (ITK's float underflow far from any signal, a few voxels, is not modelled)."""
    if not nearest:
        x = x.to(torch.float32)
    support = x != 0
    for axis in range(3):
        old, new = spacing[axis], new_spacing[axis]
        n = x.shape[axis + 1]
        if abs(old - new) < 1e-6:
            continue
        if not nearest and new > old and n >= 4:
            x = gaussian_smooth(x, axis, math.sqrt(new * new - old * old) / 2.3548200450309493 / old)
            support = support.any(axis + 1, keepdim=True).expand_as(support)
        m = max(1, round(n * old / new))
        positions = torch.arange(m, dtype=torch.float64) * (new / old)
        x = resample_axis(x, axis, positions, nearest)
        support = resample_axis(support.float(), axis, positions, nearest) > 0
    return x.contiguous(), support.contiguous()


def resample_labels_onto(labels, label_affine, shape, affine):
    """Nearest-neighbour resampling of a (i, j, k) label map onto the grid (shape, affine)."""
    to_label = torch.linalg.inv(label_affine) @ affine
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"), -1)
    idx = torch.floor(grid @ to_label[:3, :3].T + to_label[:3, 3] + 0.5).long()
    inside = ((idx >= 0) & (idx < torch.tensor(labels.shape))).all(-1)
    idx = torch.where(inside.unsqueeze(-1), idx, torch.zeros_like(idx))
    out = labels[idx[..., 0], idx[..., 1], idx[..., 2]]
    return torch.where(inside, out, torch.zeros_like(out))


def percentile(values, q):
    v = values.flatten().to(torch.float32).sort().values
    pos = min(max(q, 0.0), 100.0) / 100.0 * (v.numel() - 1)
    lo = int(math.floor(pos))
    frac = pos - lo
    return float(v[lo]) if frac == 0.0 or lo + 1 >= v.numel() else float(v[lo] + frac * (v[lo + 1] - v[lo]))


def intensity(x, c, nonzero=None):
    """mae3d's intensity modes; zscore_nonzero over `nonzero` (default: x != 0)."""
    mode = c.get("mode", "none")
    x = x.to(torch.float32)
    if mode == "ct_window":
        y = (x - c["a_min"]) * ((c["b_max"] - c["b_min"]) / (c["a_max"] - c["a_min"])) + c["b_min"]
        return y.clamp(c["b_min"], c["b_max"]) if c["clip"] else y
    if mode == "zscore_nonzero":
        y = x.clone()
        for ch in range(y.shape[0]):
            mask = y[ch] != 0 if nonzero is None else nonzero[ch]
            if not mask.any():
                continue
            vals = y[ch][mask].double()
            sd = float(((vals - vals.mean()) ** 2).mean().sqrt())
            y[ch][mask] = ((vals - vals.mean()) / (sd if sd > 0 else 1.0)).float()
        return y
    if mode == "percentile":
        y = x.clone()
        for ch in range(y.shape[0]):
            lo, hi = percentile(y[ch], c["lower_percentile"]), percentile(y[ch], c["upper_percentile"])
            if not hi > lo:
                y[ch].fill_(c["b_min"])
                continue
            y[ch] = (y[ch] - lo) * ((c["b_max"] - c["b_min"]) / (hi - lo)) + c["b_min"]
            if c["clip"]:
                y[ch].clamp_(c["b_min"], c["b_max"])
        return y
    if mode == "none":
        return x
    raise Failure(f"preprocessing: intensity mode {mode!r} is not known")


def pad_value(c):
    return c["b_min"] if c.get("mode") in ("ct_window", "percentile") else 0.0


def preprocess(image, labels, affine, p):
    """mae3d's training preprocessing (the export JSON's "preprocessing") of image and labels, both
    (1, i, j, k); returns them in (C, i, j, k) order."""
    if p.get("orientation"):
        (image, labels), affine = reorient([image, labels], affine, p["orientation"])
    support = None
    spacing = spacing_of(affine)
    if p.get("spacing_mm") and any(abs(a - b) >= 1e-6 for a, b in zip(spacing, p["spacing_mm"])):
        image, support = resample(image, spacing, p["spacing_mm"], nearest=False)
        labels, _ = resample(labels, spacing, p["spacing_mm"], nearest=True)
    image = intensity(image, p["intensity"], support)
    if p.get("foreground_threshold") is not None:
        fg = (image > p["foreground_threshold"]).any(0)
        if fg.any():
            box = []
            for axis in range(3):
                hit = fg.movedim(axis, 0).reshape(fg.shape[axis], -1).any(1).nonzero().flatten()
                box.append((int(hit.min()), int(hit.max()) + 1))
            image = image[:, box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]]
            labels = labels[:, box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]]
    if image.numel() and image.abs().max() <= 65000.0:  # the training cache stores float16
        image = image.half().float()
    return image.contiguous(), labels.contiguous()


# --- labels ------------------------------------------------------------------------------------

def label_names(path):
    names = {}
    for line in open(path):
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


def group_labels(labels, groups, names_path, num_largest):
    """(grouped int64 map, class names with background first)."""
    present = [int(v) for v in labels.unique() if v != 0]
    out = torch.zeros_like(labels, dtype=torch.int64)
    if groups == "largest":
        counts = sorted(((int((labels == v).sum()), v) for v in present), reverse=True)[:num_largest]
        for cls, (_, v) in enumerate(counts, start=1):
            out[labels == v] = cls
        return out, ["background"] + [f"label {v}" for _, v in counts]
    if not os.path.exists(names_path):
        raise Failure(f"--groups aal-lobes: no region names at {names_path}; give --label-names or --groups largest")
    names = label_names(names_path)
    for v in present:
        name = names.get(v)
        if name is None:
            raise Failure(f"{names_path}: label {v} of the atlas has no name")
        base = re.sub(r"_[LR]$", "", name)
        hits = [g for g, (_, prefixes) in enumerate(AAL_GROUPS) if any(base.startswith(x) for x in prefixes)]
        if len(hits) != 1:
            raise Failure(f"{names_path}: region {name} (label {v}) matches {len(hits)} AAL groups, not one")
        out[labels == v] = hits[0] + 1
    return out, ["background"] + [g for g, _ in AAL_GROUPS]


# --- model -------------------------------------------------------------------------------------

def unetr_kwargs(desc, num_classes, feature_size):
    """The keyword arguments of the JSON's exact constructor call, out_channels = num_classes."""
    ctor = desc["monai"]["constructor"]
    call = ast.parse(ctor, mode="eval").body
    if not (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "UNETR"):
        raise Failure(f"export JSON: the constructor is not a UNETR call: {ctor}")
    kwargs = {}
    for kw in call.keywords:
        kwargs[kw.arg] = num_classes if kw.arg == "out_channels" else ast.literal_eval(kw.value)
    if feature_size is not None:
        kwargs["feature_size"] = feature_size
    return kwargs


def load_encoder(net, path, desc):
    """Loads the vit.* weights; returns (loaded, dropped) key counts."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    own = net.state_dict()
    # Unused cross-attention layers differ by MONAI release: drop the ones this MONAI does not build.
    dropped = [k for k in sd if k not in own and "cross_attn" in k]
    sd = {k: v for k, v in sd.items() if k not in dropped}
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if unexpected:
        raise Failure(f"{path}: keys UNETR does not have: {', '.join(unexpected[:5])}")
    keyless = not desc["cross_attention_keys"]["included"]
    vit_missing = [k for k in missing if k.startswith("vit.") and not (keyless and "cross_attn" in k)]
    if vit_missing:
        raise Failure(f"{path}: UNETR's encoder keys missing from the export: {', '.join(vit_missing[:5])}")
    return len(sd), len(dropped)


def dice_scores(pred, target, num_classes):
    """Dice per foreground class of hard label maps (nan where the class is absent from target)."""
    scores = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        denom = int(p.sum() + t.sum())
        scores.append(float("nan") if not t.any() else 2.0 * int((p & t).sum()) / denom)
    return scores


def nanmean(values):
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True, help="encoder_unetr.pt from mae-export --format monai-unetr")
    ap.add_argument("--export-json", help="its description (default: the .json beside --encoder)")
    ap.add_argument("--image", default=f"{TEMPLATES}/ch2.nii.gz", help="NIfTI-1 image (default: Colin27 T1)")
    ap.add_argument("--labels", default=f"{TEMPLATES}/aal.nii.gz", help="NIfTI-1 label map (default: AAL)")
    ap.add_argument("--label-names", help="region names 'index name ...' per line (default: LABELS .nii.txt)")
    ap.add_argument("--groups", choices=("aal-lobes", "largest"), default="aal-lobes",
                    help="aal-lobes: six AAL region groups; largest: the --num-largest largest labels")
    ap.add_argument("--num-largest", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--feature-size", type=int, help="UNETR feature_size (default: the JSON's constructor, 16)")
    ap.add_argument("--scratch", action="store_true", help="random encoder instead of the pretrained one")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: PyTorch's default)")
    ap.add_argument("--compare-features", metavar="FEATURES.pt",
                    help="mae-export --features of --image with the same checkpoint: report (and require, within "
                         "--compare-tolerance) that this script's preprocessing gives mae3d's windows")
    ap.add_argument("--compare-tolerance", type=float, default=0.05)
    args = ap.parse_args()
    start = time.monotonic()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNETR

    json_path = args.export_json or os.path.splitext(args.encoder)[0] + ".json"
    try:
        desc = json.load(open(json_path))
    except (OSError, ValueError) as e:
        raise Failure(f"{json_path}: cannot read the export description: {e}") from None
    if desc.get("format") != "monai-unetr":
        raise Failure(f"{json_path}: format {desc.get('format')!r}; export with mae-export --format monai-unetr")
    arch, prep = desc["architecture"], desc["preprocessing"]
    if arch["in_channels"] != 1:
        raise Failure(f"{json_path}: {arch['in_channels']} input channels; this script reads one image")
    img_size = arch["img_size"]  # in the export's axis order

    image, image_affine = read_nifti(args.image)
    labels, label_affine = read_nifti(args.labels)
    if tuple(labels.shape) != tuple(image.shape) or not torch.allclose(label_affine, image_affine, atol=1e-4):
        print(f"{args.labels}: not on the grid of {args.image}; resampled onto it (nearest neighbour)")
        labels = resample_labels_onto(labels, label_affine, image.shape, image_affine)
    names_path = args.label_names or re.sub(r"\.nii(\.gz)?$", ".nii.txt", args.labels)
    labels, classes = group_labels(labels.to(torch.int64), args.groups, names_path, args.num_largest)
    image, labels = preprocess(image.unsqueeze(0), labels.unsqueeze(0), image_affine, prep)
    if arch["axis_order"] == "native":  # (C, i, j, k) -> mae3d's (C, D, H, W)
        image, labels = image.permute(0, 3, 2, 1).contiguous(), labels.permute(0, 3, 2, 1).contiguous()
    print(f"{args.image}: preprocessed to {tuple(image.shape[1:])} ({arch['axis_order']} axis order), "
          f"{len(classes)} classes: {', '.join(classes)}")

    if args.compare_features:
        f = torch.load(args.compare_features, map_location="cpu", weights_only=True)
        w, o = f["windows"], f["origins"]
        whole = [int((o[:, a] + w.shape[2 + a]).max()) for a in range(3)]
        off, diff = 1.0, float("inf")
        order = json.load(open(os.path.splitext(args.compare_features)[0] + ".json"))["axis_order"]["order"]
        if order != arch["axis_order"]:
            raise Failure(f"{args.compare_features}: features in {order} axis order, the export in {arch['axis_order']}")
        if whole == list(image.shape[1:]) and list(w.shape[2:]) == list(img_size):
            theirs = torch.zeros_like(image)
            for n, (x, y, z) in enumerate(o.tolist()):
                theirs[:, x:x + w.shape[2], y:y + w.shape[3], z:z + w.shape[4]] = w[n]
            d = (theirs - image).abs()
            diff, off = float(d.max()), float((d > args.compare_tolerance).float().mean())
        print(f"preprocessing vs mae3d's --features windows: shape {list(image.shape[1:])} vs {whole}, "
              f"max |diff| {diff:.3g}, {100 * off:.2f} % of voxels off by more than {args.compare_tolerance}")
        if not off <= 0.01:
            raise Failure(f"{args.compare_features}: this script's preprocessing differs from mae3d's "
                          f"(shape {list(image.shape[1:])} vs {whole}, {100 * off:.2f} % of voxels off by more "
                          f"than {args.compare_tolerance})")

    pad = [max(0, s - n) for s, n in zip(img_size, image.shape[1:])]
    if any(pad):
        spec = [v for a in reversed(range(3)) for v in (pad[a] // 2, pad[a] - pad[a] // 2)]
        image = F.pad(image, spec, value=pad_value(prep["intensity"]))
        labels = F.pad(labels, spec, value=0)

    torch.manual_seed(args.seed)
    net = UNETR(**unetr_kwargs(desc, len(classes), args.feature_size))
    init = "scratch" if args.scratch else "pretrained"
    if not args.scratch:
        loaded, dropped = load_encoder(net, args.encoder, desc)
        print(f"{args.encoder}: {loaded} tensors loaded into UNETR.vit"
              + (f" ({dropped} unused cross-attention keys of another MONAI release dropped)" if dropped else ""))
    device = torch.device(args.device)
    net.to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-5)
    crops = torch.Generator().manual_seed(args.seed)
    loss_value = float("nan")
    for step in range(1, args.steps + 1):
        xs, ys = [], []
        for _ in range(args.batch_size):
            o = [int(torch.randint(0, n - s + 1, (1,), generator=crops)) for n, s in zip(image.shape[1:], img_size)]
            sl = (slice(None),) + tuple(slice(a, a + s) for a, s in zip(o, img_size))
            xs.append(image[sl])
            ys.append(labels[sl])
        x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
        net.train()
        logits = net(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        batch_dice = nanmean(dice_scores(logits.argmax(1).cpu(), y[:, 0].cpu(), len(classes)))
        print(f"step {step}/{args.steps}  loss {loss_value:.4f}  dice {batch_dice:.4f}", flush=True)

    net.eval()
    with torch.no_grad():
        logits = sliding_window_inference(image.unsqueeze(0).to(device), roi_size=img_size, sw_batch_size=1,
                                          predictor=net, overlap=0.25)
    per_class = dice_scores(logits.argmax(1)[0].cpu(), labels[0], len(classes))
    dice = nanmean(per_class)
    if math.isnan(dice):
        raise Failure(f"{args.labels}: none of the classes is in the preprocessed label map")
    print(json.dumps({"dice": dice, "steps": args.steps, "init": init, "loss": loss_value,
                      "dice_per_class": {c: None if math.isnan(d) else d for c, d in zip(classes[1:], per_class)},
                      "classes": classes,
                      "evaluated_on": "sliding-window prediction of the whole (training) volume",
                      "seconds": round(time.monotonic() - start, 1)}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failure as e:
        print(f"finetune_unetr: {e}", file=sys.stderr)
        sys.exit(2)
