#!/usr/bin/env python3
"""Checks mae-export's files against MONAI's own classes, as a MONAI user loads them.

For checkpoints of freshly initialised models written by export_test_helper (small non-cubic models
with conv and perceptron patch embedding, a non-cubic 12-layer model that UNETR can hold, and ViT-B
96^3), in both axis orders (--axis-order monai, the default, and native, built from the img_size /
patch_size the export's JSON gives):
  - every --format loads with torch.load(weights_only=True) (PyTorch >= 2.6's default, which refuses
    TorchScript's pickled type tags) as a plain dict[str, Tensor] (float32, contiguous) and
    load_state_dict(strict=True) into monai.networks.nets.ViT / MaskedAutoEncoderViT built by the
    JSON's constructor call, with exactly their state_dict's keys in its order; monai-unetr loads
    into UNETR with no unexpected key and no missing vit.* key (its decoder stays untrained). The
    exact export uses the cross-attention layout of the installed MONAI (1.4 - 1.5: norm_cross_attn
    and cross_attn linears, >= 1.6: norm_cross_attn only, 1.3: none);
  - the JSON's own loading snippet runs for the default and the keyless exports and loads the weights;
  - MONAI's ViT and UNETR.vit on the --features windows reproduce the --features tokens;
  - MONAI's MaskedAutoEncoderViT, fed the window and the visible patches that mae3d's own forward
    drew (export_test_helper predict; MONAI's mask draw, torch.multinomial, returns them), reproduces
    mae3d's prediction and mask, its axis order rewritten here by hand for the monai export;
  - the two feature files are each other's axis permutation, and the command line's errors give the
    right exit status with a one-line message.
MONAI must be importable (a missing MONAI is a failure); exit 77 (skipped) only when torch cannot be
imported.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

try:
    import torch
except Exception as exc:  # noqa: BLE001 - any import failure means "cannot run here"
    print(f"SKIP: cannot import torch with {sys.executable}: {exc}")
    sys.exit(77)

try:
    import monai
    from monai.networks.blocks.transformerblock import TransformerBlock
    from monai.networks.nets import UNETR, MaskedAutoEncoderViT, ViT
except Exception as exc:  # noqa: BLE001
    print(f"FAIL: cannot import MONAI with {sys.executable} (torch {torch.__version__}): {exc}")
    sys.exit(1)

# Non-cubic image, patch and grid (16, 24, 32) / (4, 8, 16) / (4, 3, 2): none reads the same reversed.
SMALL = {
    "seed": 1,
    "data": {"dataset": "unused.json", "orientation": "RAS", "intensity": {"mode": "zscore_nonzero"}},
    "model": {"img_size": [16, 24, 32], "patch_size": [4, 8, 16], "hidden_size": 48, "mlp_dim": 96,
              "num_layers": 2, "num_heads": 4, "decoder_hidden_size": 24, "decoder_mlp_dim": 40,
              "decoder_num_layers": 1, "decoder_num_heads": 4, "qkv_bias": True},
    "volume": (40, 36, 33),
}
MLP = {
    "seed": 3,
    "data": SMALL["data"],
    "model": dict(SMALL["model"], proj_type="perceptron", pos_embed_type="learnable",
                  decoder_pos_embed_type="learnable"),
    "volume": (40, 36, 33),
}
# What UNETR holds (12 layers, patch 16), non-cubic: grid (2, 3, 4).
U12 = {
    "seed": 4,
    "data": SMALL["data"],
    "model": {"img_size": [32, 48, 64], "patch_size": [16, 16, 16], "hidden_size": 48, "mlp_dim": 96,
              "num_layers": 12, "num_heads": 4, "decoder_hidden_size": 24, "decoder_mlp_dim": 40,
              "decoder_num_layers": 2, "decoder_num_heads": 4},
    "volume": (40, 52, 70),
}
VITB = {
    "seed": 2,
    "data": {"dataset": "unused.json", "orientation": "", "intensity": {"mode": "none"}},
    "model": {},  # defaults: ViT-B 96^3, patch 16, decoder 384 / 512 / 4 / 12
    "volume": (100, 96, 96),
}
CONFIGS = {"small": SMALL, "mlp": MLP, "u12": U12, "vitb": VITB}
MODEL_DEFAULTS = {"in_channels": 1, "img_size": [96, 96, 96], "patch_size": [16, 16, 16], "hidden_size": 768,
                  "mlp_dim": 3072, "num_layers": 12, "num_heads": 12, "decoder_hidden_size": 384,
                  "decoder_mlp_dim": 512, "decoder_num_layers": 4, "decoder_num_heads": 12, "qkv_bias": False,
                  "proj_type": "conv"}
NETWORKS = {"monai-vit": ViT, "monai-unetr": UNETR, "monai-mae": MaskedAutoEncoderViT}
NUM_CLASSES = 3
TOLERANCE = 1e-4  # float32 LibTorch vs float32 PyTorch, post-LayerNorm values of order 1

failures = []
measured = {}


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)
    return cond


def installed_cross_layout():
    """The --cross-attention-keys value whose keys the installed MONAI's TransformerBlock holds."""
    keys = list(TransformerBlock(8, 16, 2).state_dict())
    if any(k.startswith("cross_attn.") for k in keys):
        return "true"
    if any(k.startswith("norm_cross_attn.") for k in keys):
        return "norm"
    return "false"


def load(path):
    """torch.load as PyTorch >= 2.6 does by default (weights_only): plain tensors and containers only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def run(cmd):
    return subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_ok(cmd):
    r = run(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def build_network(desc):
    """The MONAI network of an export, built by the exact constructor call its JSON gives."""
    ctor = desc["monai"]["constructor"]
    net = eval(ctor, {"__builtins__": {}}, {"ViT": ViT, "UNETR": UNETR, "MaskedAutoEncoderViT": MaskedAutoEncoderViT,
                                           "num_classes": NUM_CLASSES})  # noqa: S307 - our own export's text
    return net.eval()


def describe_difference(name, got, want):
    only_got = [k for k in got if k not in set(want)]
    only_want = [k for k in want if k not in set(got)]
    print(f"  {name}: only exported {only_got[:6]}, only in MONAI {only_want[:6]}")


def check_strict_load(sd, desc, fmt, name):
    """load_state_dict into the real class: strict for ViT / MaskedAutoEncoderViT, vit.* for UNETR."""
    net = build_network(desc)
    own = list(net.state_dict())
    if fmt == "monai-unetr":
        want = [k for k in own if k.startswith("vit.")]
        try:
            missing, unexpected = net.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # shape mismatches raise even with strict=False
            check(False, f"{name}: UNETR.load_state_dict ({str(e).splitlines()[0]})")
            return None
        check(not unexpected, f"{name}: no unexpected key in UNETR ({unexpected[:4]})")
        vit_missing = [k for k in missing if k.startswith("vit.")]
        check(not vit_missing, f"{name}: no missing vit.* key ({vit_missing[:4]})")
        check(missing and all(not k.startswith("vit.") for k in missing), f"{name}: only the decoder stays fresh")
    else:
        want = own
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            check(False, f"{name}: {type(net).__name__}.load_state_dict(strict=True) ({str(e).splitlines()[0]})")
            describe_difference(name, list(sd), want)
            return None
    if not check(list(sd) == want, f"{name}: keys in MONAI's state_dict order"):
        describe_difference(name, list(sd), want)
    loaded = net.state_dict()
    check(all(torch.equal(loaded[k], v) for k, v in sd.items()), f"{name}: the network holds the exported values")
    return net


def check_file(path, desc, m, fmt, cross, axis_order, name):
    sd = load(path)
    check(type(sd) is dict, f"{name}: torch.load gives a dict (got {type(sd).__name__})")
    check(all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in sd.values()), f"{name}: float32")
    check(all(v.is_contiguous() for v in sd.values()), f"{name}: contiguous")
    check(desc["format"] == fmt and desc["num_tensors"] == len(sd), f"{name}: description format and count")
    check(desc["cross_attention_keys"]["value"] == cross, f"{name}: description cross-attention value")
    check([t["name"] for t in desc["tensors"]] == list(sd), f"{name}: description tensor list")
    check([t["shape"] for t in desc["tensors"]] == [list(v.shape) for v in sd.values()], f"{name}: description shapes")
    img, pt = m["img_size"], m["patch_size"]
    if axis_order == "monai":
        img, pt = img[::-1], pt[::-1]
    check(desc["axis_order"]["order"] == axis_order, f"{name}: description axis order")
    check(desc["architecture"]["img_size"] == img and desc["architecture"]["patch_size"] == pt,
          f"{name}: description img_size / patch_size in {axis_order} order")
    check(f"img_size={tuple(img)}" in desc["monai"]["constructor"], f"{name}: constructor img_size {tuple(img)}")
    if m["proj_type"] == "conv":
        kernel = [k for k in sd if k.endswith("patch_embedding.patch_embeddings.weight")]
        check(kernel and list(sd[kernel[0]].shape[2:]) == pt, f"{name}: conv kernel in {axis_order} order")
    nca = [k for k in sd if k.endswith("norm_cross_attn.weight")]
    linears = [k for k in sd if ".cross_attn." in k]
    check(bool(nca) == (cross != "false") and bool(linears) == (cross == "true"), f"{name}: cross-attention keys")
    check(all(torch.equal(sd[k], torch.ones_like(sd[k])) for k in nca), f"{name}: norm_cross_attn weights one")
    check(all(not sd[k].any() for k in linears + [k.replace("weight", "bias") for k in nca]),
          f"{name}: cross-attention linears and norm biases zero")
    return sd


def check_snippet(desc, sd, name):
    """Runs the JSON's loading snippet as written and checks that the network got the weights."""
    m = desc["architecture"]
    x = torch.randn(1, m["in_channels"], *m["img_size"])
    ns = {"x": x}
    try:
        with torch.no_grad():
            exec(desc["monai"]["load"], ns)  # noqa: S102 - our own export's snippet
    except Exception as e:  # noqa: BLE001
        check(False, f"{name}: the JSON's load snippet runs ({type(e).__name__}: {str(e).splitlines()[0]})")
        return
    held = ns["net"].state_dict()
    check(all(torch.equal(held[k], v) for k, v in sd.items() if k in held), f"{name}: snippet loaded the weights")
    check(all(k in held or "cross_attn" in k for k in sd), f"{name}: snippet dropped only cross-attention keys")


def tokens_to_monai(t, grid):
    """(B, N, X) in the raster of mae3d's (gD, gH, gW) grid -> the raster of (gW, gH, gD)."""
    b, n, x = t.shape
    return t.reshape(b, *grid, x).permute(0, 3, 2, 1, 4).reshape(b, n, x)


def voxels_to_monai(t, patch, channels):
    """(..., P*C) patch voxels in (pD pH pW c) order -> (pW pH pD c)."""
    lead = t.shape[:-1]
    return t.reshape(-1, *patch, channels).permute(0, 3, 2, 1, 4).reshape(*lead, -1)


def index_to_monai(visible, grid):
    """Token indices of mae3d's (gD, gH, gW) raster -> their index in the (gW, gH, gD) raster."""
    gd, gh, gw = grid
    d, h, w = visible // (gh * gw), (visible // gw) % gh, visible % gw
    return (w * gh + h) * gd + d


class DrawnMask:
    """Makes MONAI's MaskedAutoEncoderViT keep `visible` (B, K): its mask draw, torch.multinomial,
    returns them (after checking that MONAI asks for B rows of N tokens and K of them)."""

    def __init__(self, visible, num_tokens):
        self.visible, self.num_tokens, self.calls = visible, num_tokens, []

    def __enter__(self):
        self.original = torch.multinomial

        def draw(weights, num_samples, replacement=False, **kwargs):
            self.calls.append((tuple(weights.shape), num_samples, replacement))
            return self.visible.clone()

        torch.multinomial = draw
        return self

    def __exit__(self, *exc):
        torch.multinomial = self.original
        return False

    def asked_for_ours(self):
        b, k = self.visible.shape
        return self.calls == [((b, self.num_tokens), k, False)]


def check_mae_parity(net, ours, m, axis_order, name):
    x, visible, mask, pred = ours["x"], ours["visible"], ours["mask"], ours["pred"]
    grid = [i // p for i, p in zip(m["img_size"], m["patch_size"])]
    n = grid[0] * grid[1] * grid[2]
    if axis_order == "monai":
        x = x.permute(0, 1, 4, 3, 2)
        visible = index_to_monai(visible, grid)
        mask = tokens_to_monai(mask.unsqueeze(-1), grid).squeeze(-1)
        pred = voxels_to_monai(tokens_to_monai(pred, grid), m["patch_size"], m["in_channels"])
    with torch.no_grad(), DrawnMask(visible, n) as drawn:
        monai_pred, monai_mask = net(x)
    check(drawn.asked_for_ours(), f"{name}: MONAI draws {visible.shape[1]} of {n} tokens per window ({drawn.calls})")
    check(torch.equal(monai_mask.float(), mask), f"{name}: MONAI's mask is mae3d's")
    if not check(monai_pred.shape == pred.shape, f"{name}: prediction shape {tuple(monai_pred.shape)}"):
        return
    diff = (monai_pred.double() - pred.double()).abs().max().item()
    measured[name] = diff
    print(f"{name}: MONAI MaskedAutoEncoderViT vs mae3d forward on the same window and visible patches: "
          f"max |diff| = {diff:.2e}")
    check(diff < TOLERANCE, f"{name}: MONAI's prediction is mae3d's (max diff {diff:.2e})")


def export(args, run_dir, out, fmt, cross, axis_order):
    # The default axis order is monai: pass --axis-order only for native.
    return run([args.mae_export, "--checkpoint", run_dir, "--out", out, "--format", fmt,
                "--cross-attention-keys", cross, "--threads", "1",
                *(["--axis-order", axis_order] if axis_order != "monai" else [])])


def test_config(label, cfg, args, work, layout):
    m = dict(MODEL_DEFAULTS, **cfg["model"])
    m.setdefault("pos_embed_type", "sincos")
    cfg_path = os.path.join(work, f"{label}.json")
    with open(cfg_path, "w") as f:
        json.dump({"seed": cfg["seed"], "data": cfg["data"], "model": cfg["model"]}, f)
    run_dir = os.path.join(work, f"{label}_run")
    run_ok([args.helper, "checkpoint", run_dir, cfg_path])
    vol = os.path.join(work, f"{label}_volume.nii.gz")
    run_ok([args.helper, "volume", vol, *cfg["volume"]])
    predictions = os.path.join(work, f"{label}_pred.pt")
    run_ok([args.helper, "predict", run_dir, predictions, cfg["seed"]])
    ours = load(predictions)
    check(list(ours) == ["x", "visible", "mask", "pred"], f"{label}: helper predictions")

    unetr_ok = m["num_layers"] == 12 and all(p == 16 for p in m["patch_size"])
    nets = {}
    # The exact export for the installed MONAI in both orders; the other layouts through the JSON's snippet.
    runs = [(fmt, layout, o) for o in ("monai", "native") for fmt in NETWORKS]
    runs += [(fmt, cross, "monai") for cross in ("true", "false") if cross != layout for fmt in NETWORKS]
    for fmt, cross, axis_order in runs:
        name = f"{label} {fmt} cross={cross} axes={axis_order}"
        out = os.path.join(work, f"{label}_{fmt}_{cross}_{axis_order}.pt")
        start = time.monotonic()
        r = export(args, run_dir, out, fmt, cross, axis_order)
        seconds = time.monotonic() - start
        if fmt == "monai-unetr" and not unetr_ok:
            check(r.returncode == 2 and "monai-unetr" in r.stderr, f"{name}: refused with exit 2 ({r.stderr.strip()})")
            check(not os.path.exists(out), f"{name}: refused without writing")
            continue
        if not check(r.returncode == 0, f"{name}: exit 0 ({r.stderr.strip()})"):
            continue
        print(f"{name}: exported in {seconds:.2f} s ({os.path.getsize(out) / 2**20:.1f} MiB)")
        desc = json.load(open(os.path.splitext(out)[0] + ".json"))
        sd = check_file(out, desc, m, fmt, cross, axis_order, name)
        check_snippet(desc, sd, name)
        if cross == layout:
            nets[fmt, axis_order] = check_strict_load(sd, desc, fmt, name)
        os.remove(out)
        os.remove(os.path.splitext(out)[0] + ".json")

    img, pt = m["img_size"], m["patch_size"]
    grid = [i // p for i, p in zip(img, pt)]
    n = grid[0] * grid[1] * grid[2]
    feats = {}
    for axis_order in ("monai", "native"):
        name = f"{label} axes={axis_order}"
        feat = os.path.join(work, f"{label}_features_{axis_order}.pt")
        run_ok([args.mae_export, "--checkpoint", run_dir, "--features", vol, "--out", feat, "--threads", "1",
                *(["--axis-order", axis_order] if axis_order != "monai" else [])])
        f = load(feat)
        check(list(f) == ["windows", "origins", "tokens", "pooled"], f"{name} features: keys")
        w, o, t, p = f["windows"], f["origins"], f["tokens"], f["pooled"]
        # monai: windows (W, C, i, j, k), the patch and grid read (i, j, k).
        img_o, grid_o = (img[::-1], grid[::-1]) if axis_order == "monai" else (img, grid)
        check(w.dim() == 5 and tuple(w.shape[1:]) == (m["in_channels"], *img_o),
              f"{name} features: windows shape {tuple(w.shape)}")
        check(o.dtype == torch.int64 and tuple(o.shape) == (w.shape[0], 3), f"{name} features: origins")
        check(tuple(t.shape) == (w.shape[0], n, m["hidden_size"]), f"{name} features: tokens shape {tuple(t.shape)}")
        check(torch.allclose(p, t.mean((0, 1)), atol=1e-6), f"{name} features: pooled is the mean token")
        desc = json.load(open(os.path.splitext(feat)[0] + ".json"))
        check(desc["shapes"]["tokens"] == list(t.shape), f"{name} features: description shapes")
        check(desc["axis_order"]["order"] == axis_order and desc["grid"] == grid_o, f"{name} features: description axes")
        encoders = [("ViT", nets.get(("monai-vit", axis_order)))]
        if unetr_ok:
            unetr = nets.get(("monai-unetr", axis_order))
            encoders.append(("UNETR.vit", unetr.vit if unetr is not None else None))
            if unetr is not None:
                with torch.no_grad():
                    seg = unetr(w[:1])
                check(tuple(seg.shape) == (1, NUM_CLASSES, *img_o), f"{name}: UNETR output shape {tuple(seg.shape)}")
        for what, encoder in encoders:
            if not check(encoder is not None, f"{name}: {what} loaded"):
                continue
            with torch.no_grad():
                tokens, _ = encoder(w)
            diff = (tokens.double() - t.double()).abs().max().item()
            measured[f"{name} {what}"] = diff
            print(f"{name}: MONAI {what} vs --features tokens over {w.shape[0]} windows: max |diff| = {diff:.2e}")
            check(diff < TOLERANCE, f"{name}: MONAI {what} reproduces the --features tokens (max diff {diff:.2e})")
        mae_net = nets.get(("monai-mae", axis_order))
        if check(mae_net is not None, f"{name}: MaskedAutoEncoderViT loaded"):
            check_mae_parity(mae_net, ours, m, axis_order, f"{name} MaskedAutoEncoderViT")
        feats[axis_order] = f
        os.remove(feat)
    fm, fn = feats["monai"], feats["native"]
    check(torch.equal(fm["windows"], fn["windows"].permute(0, 1, 4, 3, 2)), f"{label} features: windows reversed")
    check(torch.equal(fm["origins"], fn["origins"].flip(1)), f"{label} features: origins as (i, j, k)")
    check(torch.equal(fm["tokens"], tokens_to_monai(fn["tokens"], grid)), f"{label} features: tokens in (i, j, k) raster")
    check(torch.equal(fm["pooled"], fn["pooled"]), f"{label} features: pooled unchanged")
    return run_dir, vol


def test_cli_errors(args, work, run_dir, vol):
    cases = [
        ("bad format", ["--checkpoint", run_dir, "--out", f"{work}/x.pt", "--format", "monai-swin"], 2, "--format"),
        ("missing checkpoint", ["--checkpoint", f"{work}/nope", "--out", f"{work}/x.pt", "--format", "monai-vit"], 2,
         f"{work}/nope"),
        ("unwritable --out", ["--checkpoint", run_dir, "--out", f"{work}/no/such/x.pt", "--format", "monai-vit"], 1,
         f"{work}/no/such/x.pt"),
        ("missing volume", ["--checkpoint", run_dir, "--features", f"{work}/none.nii.gz", "--out", f"{work}/f.pt"], 2,
         "none.nii.gz"),
        ("no --format", ["--checkpoint", run_dir, "--out", f"{work}/x.pt"], 2, "--format"),
        ("--features with --format", ["--checkpoint", run_dir, "--features", vol, "--format", "monai-vit",
                                      "--out", f"{work}/x.pt"], 2, "--format"),
        ("bad --cross-attention-keys", ["--checkpoint", run_dir, "--out", f"{work}/x.pt", "--format", "monai-vit",
                                        "--cross-attention-keys", "maybe"], 2, "--cross-attention-keys"),
        ("bad --axis-order", ["--checkpoint", run_dir, "--out", f"{work}/x.pt", "--format", "monai-vit",
                              "--axis-order", "xyz"], 2, "--axis-order"),
    ]
    for name, argv, rc, text in cases:
        r = run([args.mae_export, *argv])
        err = r.stderr.strip()
        check(r.returncode == rc, f"cli {name}: exit {rc} (got {r.returncode}: {err})")
        check(text in err, f"cli {name}: message names {text!r} ({err})")
        check(len(err.splitlines()) <= 3, f"cli {name}: short message ({err})")
        check(not os.path.exists(f"{work}/x.pt"), f"cli {name}: nothing written")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mae-export", required=True)
    ap.add_argument("--helper", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--configs", default="small,mlp,u12,vitb", help="comma-separated: " + ", ".join(CONFIGS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    layout = installed_cross_layout()
    print(f"torch {torch.__version__}, MONAI {monai.__version__} (cross-attention keys: {layout})")
    work = os.path.abspath(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    runs = {}
    for label in args.configs.split(","):
        start = time.monotonic()
        runs[label] = test_config(label, CONFIGS[label], args, work, layout)
        print(f"{label}: checked in {time.monotonic() - start:.1f} s")
        if label == "vitb":  # the ViT-B checkpoint is ~370 MB
            shutil.rmtree(runs[label][0])
    if "small" not in runs:
        runs["small"] = test_config("small", SMALL, args, work, layout)
    test_cli_errors(args, work, *runs["small"])
    if measured:
        print(f"largest max |diff| over all parity checks: {max(measured.values()):.2e}")
    if failures:
        print(f"{len(failures)} check(s) failed (files kept in {work})")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    print("all export checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
