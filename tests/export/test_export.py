#!/usr/bin/env python3
"""Checks mae-export's files from Python, as a MONAI user would read them.

For a small non-cubic model (conv and perceptron patch embedding) and a ViT-B 96^3 model
(checkpoints of freshly initialised models written by export_test_helper): every --format loads with
torch.load as a plain dict[str, Tensor] whose keys, order, shapes and dtypes are MONAI's (ViT, UNETR
with `vit.`, MaskedAutoEncoderViT; with and without the cross-attention keys of MONAI >= 1.4), in
MONAI's axis order by default (patch kernel and img_size / patch_size reversed) and in mae3d's with
--axis-order native; a ViT built here from plain PyTorch ops on the monai-vit weights (conv or
perceptron patch embedding + positions, pre-norm blocks with LayerNorm eps 1e-5, fused qkv,
softmax(q k^T / sqrt(hd)) v, out_proj, exact GELU MLP, final norm) reproduces the `tokens` that
--features computed on its `windows` within 1e-4, for the default (MONAI's (C, i, j, k)) export and
features and for --axis-order native; the two feature files are each other's axis permutation; and
the command line's errors give the right exit status. MONAI itself is not needed. Exit 77 (skipped)
when torch cannot be imported.
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
    import torch.nn.functional as F
except Exception as exc:  # noqa: BLE001 - any import failure means "cannot run here"
    print(f"SKIP: cannot import torch with {sys.executable}: {exc}")
    sys.exit(77)

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
    "model": dict(SMALL["model"], proj_type="perceptron", pos_embed_type="learnable"),
    "volume": (40, 36, 33),
}
VITB = {
    "seed": 2,
    "data": {"dataset": "unused.json", "orientation": "", "intensity": {"mode": "none"}},
    "model": {},  # defaults: ViT-B 96^3, patch 16, decoder 384 / 512 / 4 / 12
    "volume": (100, 96, 96),
}
MODEL_DEFAULTS = {"in_channels": 1, "img_size": [96, 96, 96], "patch_size": [16, 16, 16], "hidden_size": 768,
                  "mlp_dim": 3072, "num_layers": 12, "num_heads": 12, "decoder_hidden_size": 384,
                  "decoder_mlp_dim": 512, "decoder_num_layers": 4, "decoder_num_heads": 12, "qkv_bias": False,
                  "proj_type": "conv"}

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)


def monai_block(prefix, e, mlp, qkv_bias, cross):
    """One MONAI TransformerBlock in state_dict order (mlp, norm1, attn, norm2, cross-attention)."""
    k = [(prefix + "mlp.linear1.weight", (mlp, e)), (prefix + "mlp.linear1.bias", (mlp,)),
         (prefix + "mlp.linear2.weight", (e, mlp)), (prefix + "mlp.linear2.bias", (e,)),
         (prefix + "norm1.weight", (e,)), (prefix + "norm1.bias", (e,)),
         (prefix + "attn.out_proj.weight", (e, e)), (prefix + "attn.out_proj.bias", (e,)),
         (prefix + "attn.qkv.weight", (3 * e, e))]
    if qkv_bias:
        k.append((prefix + "attn.qkv.bias", (3 * e,)))
    k += [(prefix + "norm2.weight", (e,)), (prefix + "norm2.bias", (e,))]
    if cross:
        k += [(prefix + "norm_cross_attn.weight", (e,)), (prefix + "norm_cross_attn.bias", (e,)),
              (prefix + "cross_attn.out_proj.weight", (e, e)), (prefix + "cross_attn.out_proj.bias", (e,))]
        for n in ("to_q", "to_k", "to_v"):
            k.append((prefix + f"cross_attn.{n}.weight", (e, e)))
            if qkv_bias:
                k.append((prefix + f"cross_attn.{n}.bias", (e,)))
    return k


def expected_keys(m, fmt, cross, axis_order="monai"):
    """MONAI's ViT / UNETR (vit.*) / MaskedAutoEncoderViT state_dict keys and shapes."""
    pre = "vit." if fmt == "monai-unetr" else ""
    full = fmt == "monai-mae"
    img, pt = m["img_size"], m["patch_size"]
    n = (img[0] // pt[0]) * (img[1] // pt[1]) * (img[2] // pt[2])
    e, ed = m["hidden_size"], m["decoder_hidden_size"]
    pdim = m["in_channels"] * pt[0] * pt[1] * pt[2]
    k = []
    if full:
        k += [("cls_token", (1, 1, e)), ("mask_tokens", (1, 1, ed)), ("decoder_pos_embedding", (1, n, ed))]
    k.append((pre + "patch_embedding.position_embeddings", (1, n, e)))
    if m["proj_type"] == "conv":
        kernel = tuple(reversed(pt)) if axis_order == "monai" else tuple(pt)
        k += [(pre + "patch_embedding.patch_embeddings.weight", (e, m["in_channels"], *kernel)),
              (pre + "patch_embedding.patch_embeddings.bias", (e,))]
    else:
        k += [(pre + "patch_embedding.patch_embeddings.1.weight", (e, pdim)),
              (pre + "patch_embedding.patch_embeddings.1.bias", (e,))]
    for i in range(m["num_layers"]):
        k += monai_block(f"{pre}blocks.{i}.", e, m["mlp_dim"], m["qkv_bias"], cross)
    k += [(pre + "norm.weight", (e,)), (pre + "norm.bias", (e,))]
    if full:
        k += [("decoder_embed.weight", (ed, e)), ("decoder_embed.bias", (ed,))]
        for j in range(m["decoder_num_layers"]):
            k += monai_block(f"decoder_blocks.{j}.", ed, m["decoder_mlp_dim"], m["qkv_bias"], cross)
        k += [("decoder_norm.weight", (ed,)), ("decoder_norm.bias", (ed,)),
              ("decoder_pred.weight", (pdim, ed)), ("decoder_pred.bias", (pdim,))]
    return k


def reference_vit(sd, x, m, patch):
    """MONAI's ViT forward (classification=False) in plain PyTorch ops: x (B, C, s0, s1, s2) -> (B, N, E)
    with `patch` in x's axis order."""
    e, heads = m["hidden_size"], m["num_heads"]
    hd = e // heads
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    if m["proj_type"] == "conv":
        h = F.conv3d(x, sd["patch_embedding.patch_embeddings.weight"], sd["patch_embedding.patch_embeddings.bias"],
                     stride=tuple(patch))
        h = h.flatten(2).transpose(1, 2)
    else:  # Rearrange("b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)"), then Linear
        b, c = x.shape[:2]
        g = [s // p for s, p in zip(x.shape[2:], patch)]
        v = x.reshape(b, c, g[0], patch[0], g[1], patch[1], g[2], patch[2]).permute(0, 2, 4, 6, 3, 5, 7, 1)
        h = F.linear(v.reshape(b, g[0] * g[1] * g[2], -1), sd["patch_embedding.patch_embeddings.1.weight"],
                     sd["patch_embedding.patch_embeddings.1.bias"])
    h = h + sd["patch_embedding.position_embeddings"]
    for i in range(m["num_layers"]):
        p = f"blocks.{i}."
        y = F.layer_norm(h, (e,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-5)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"))
        b, t, _ = qkv.shape
        q, k, v = qkv.view(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) * hd ** -0.5, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, t, e)
        h = h + F.linear(o, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        y = F.layer_norm(h, (e,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-5)
        y = F.gelu(F.linear(y, sd[p + "mlp.linear1.weight"], sd[p + "mlp.linear1.bias"]))
        h = h + F.linear(y, sd[p + "mlp.linear2.weight"], sd[p + "mlp.linear2.bias"])
    return F.layer_norm(h, (e,), sd["norm.weight"], sd["norm.bias"], eps=1e-5)


def run(cmd):
    return subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_ok(cmd):
    r = run(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def check_export_file(path, m, fmt, cross, name, axis_order="monai"):
    sd = torch.load(path, map_location="cpu")
    check(type(sd) is dict, f"{name}: torch.load gives a dict (got {type(sd).__name__})")
    want = expected_keys(m, fmt, cross, axis_order)
    got = [(k, tuple(v.shape)) for k, v in sd.items()]
    check([k for k, _ in got] == [k for k, _ in want], f"{name}: key names and order")
    if [k for k, _ in got] != [k for k, _ in want]:
        print("  only exported:", sorted(set(k for k, _ in got) - set(k for k, _ in want))[:10])
        print("  only expected:", sorted(set(k for k, _ in want) - set(k for k, _ in got))[:10])
    check(dict(got) == dict(want), f"{name}: shapes")
    check(all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in sd.values()), f"{name}: float32")
    check(all(v.is_contiguous() for v in sd.values()), f"{name}: contiguous")
    desc = json.load(open(os.path.splitext(path)[0] + ".json"))
    check(desc["format"] == fmt and desc["num_tensors"] == len(sd), f"{name}: description format and count")
    check(desc["cross_attention_keys"]["included"] == cross, f"{name}: description cross-attention flag")
    check([t["name"] for t in desc["tensors"]] == list(sd), f"{name}: description tensor list")
    img, pt = m["img_size"], m["patch_size"]
    if axis_order == "monai":
        img, pt = img[::-1], pt[::-1]
    check(desc["axis_order"]["order"] == axis_order, f"{name}: description axis order")
    check(desc["architecture"]["img_size"] == img and desc["architecture"]["patch_size"] == pt,
          f"{name}: description img_size / patch_size in {axis_order} order")
    check(f"img_size={tuple(img)}" in desc["monai"]["constructor"], f"{name}: constructor img_size {tuple(img)}")
    if cross:
        nca = [k for k in sd if k.endswith("norm_cross_attn.weight")]
        check(nca and all(torch.equal(sd[k], torch.ones_like(sd[k])) for k in nca), f"{name}: cross norm ones")
        zeros = [k for k in sd if ".cross_attn." in k]
        check(zeros and all(not sd[k].any() for k in zeros), f"{name}: cross-attention linears zero")
    return sd


def test_config(label, cfg, args, work):
    m = dict(MODEL_DEFAULTS, **cfg["model"])
    cfg_path = os.path.join(work, f"{label}.json")
    with open(cfg_path, "w") as f:
        json.dump({"seed": cfg["seed"], "data": cfg["data"], "model": cfg["model"]}, f)
    run_dir = os.path.join(work, f"{label}_run")
    run_ok([args.helper, "checkpoint", run_dir, cfg_path])
    vol = os.path.join(work, f"{label}_volume.nii.gz")
    run_ok([args.helper, "volume", vol, *cfg["volume"]])

    unetr_ok = m["num_layers"] == 12 and all(p == 16 for p in m["patch_size"])
    vit_paths = {o: os.path.join(work, f"{label}_vit_{o}.pt") for o in ("monai", "native")}
    runs = [(fmt, cross, "monai") for fmt in ("monai-vit", "monai-unetr", "monai-mae") for cross in (True, False)]
    runs += [("monai-vit", True, "native"), ("monai-mae", False, "native")]
    for fmt, cross, axis_order in runs:
        name = f"{label} {fmt} cross={cross} axes={axis_order}"
        out = os.path.join(work, f"{label}_{fmt}_{cross}_{axis_order}.pt")
        start = time.monotonic()
        # The default axis order is monai: pass --axis-order only for native.
        r = run([args.mae_export, "--checkpoint", run_dir, "--out", out, "--format", fmt,
                 "--cross-attention-keys", "true" if cross else "false", "--threads", "2",
                 *(["--axis-order", axis_order] if axis_order != "monai" else [])])
        seconds = time.monotonic() - start
        if fmt == "monai-unetr" and not unetr_ok:
            check(r.returncode == 2 and "monai-unetr" in r.stderr,
                  f"{name}: refused with exit 2 ({r.stderr.strip()})")
            check(not os.path.exists(out), f"{name}: refused without writing")
            continue
        check(r.returncode == 0, f"{name}: exit 0 ({r.stderr.strip()})")
        if r.returncode != 0:
            continue
        print(f"{name}: exported in {seconds:.2f} s ({os.path.getsize(out) / 2**20:.1f} MiB)")
        check_export_file(out, m, fmt, cross, name, axis_order)
        if fmt == "monai-vit" and cross:
            os.replace(out, vit_paths[axis_order])
            os.replace(os.path.splitext(out)[0] + ".json", os.path.splitext(vit_paths[axis_order])[0] + ".json")
        else:
            os.remove(out)

    img, pt = m["img_size"], m["patch_size"]
    n = (img[0] // pt[0]) * (img[1] // pt[1]) * (img[2] // pt[2])
    grid = [i // p for i, p in zip(img, pt)]
    feats = {}
    for axis_order in ("monai", "native"):
        name = f"{label} features axes={axis_order}"
        feat = os.path.join(work, f"{label}_features_{axis_order}.pt")
        run_ok([args.mae_export, "--checkpoint", run_dir, "--features", vol, "--out", feat, "--threads", "2",
                *(["--axis-order", axis_order] if axis_order != "monai" else [])])
        f = torch.load(feat, map_location="cpu")
        check(list(f) == ["windows", "origins", "tokens", "pooled"], f"{name}: keys")
        w, o, t, p = f["windows"], f["origins"], f["tokens"], f["pooled"]
        # monai: windows (W, C, i, j, k), the patch and grid read (i, j, k).
        img_o, pt_o, grid_o = (img[::-1], pt[::-1], grid[::-1]) if axis_order == "monai" else (img, pt, grid)
        check(w.dim() == 5 and tuple(w.shape[1:]) == (m["in_channels"], *img_o),
              f"{name}: windows shape {tuple(w.shape)}")
        check(o.dtype == torch.int64 and tuple(o.shape) == (w.shape[0], 3), f"{name}: origins")
        check(tuple(t.shape) == (w.shape[0], n, m["hidden_size"]), f"{name}: tokens shape {tuple(t.shape)}")
        check(tuple(p.shape) == (m["hidden_size"],), f"{name}: pooled shape")
        check(torch.allclose(p, t.mean((0, 1)), atol=1e-6), f"{name}: pooled is the mean token")
        desc = json.load(open(os.path.splitext(feat)[0] + ".json"))
        check(desc["shapes"]["tokens"] == list(t.shape), f"{name}: description shapes")
        check(desc["axis_order"]["order"] == axis_order and desc["grid"] == grid_o, f"{name}: description axes")
        sd = torch.load(vit_paths[axis_order], map_location="cpu")
        with torch.no_grad():
            ref = reference_vit(sd, w, m, pt_o)
        diff = (ref - t.double()).abs().max().item()
        print(f"{name}: plain-PyTorch ViT ({axis_order} export) vs --features tokens over {w.shape[0]} windows: "
              f"max |diff| = {diff:.2e}")
        check(diff < 1e-4, f"{name}: reference ViT reproduces the tokens (max diff {diff:.2e})")
        feats[axis_order] = f
        os.remove(vit_paths[axis_order])
        os.remove(feat)
    fm, fn = feats["monai"], feats["native"]
    gd, gh, gw = grid
    check(torch.equal(fm["windows"], fn["windows"].permute(0, 1, 4, 3, 2)), f"{label} features: windows reversed")
    check(torch.equal(fm["origins"], fn["origins"].flip(1)), f"{label} features: origins as (i, j, k)")
    tn = fn["tokens"]
    reordered = tn.reshape(tn.shape[0], gd, gh, gw, -1).permute(0, 3, 2, 1, 4).reshape(tn.shape)
    check(torch.equal(fm["tokens"], reordered), f"{label} features: tokens in the (i, j, k) raster")
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
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mae-export", required=True)
    ap.add_argument("--helper", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--configs", default="small,mlp,vitb", help="comma-separated: small, mlp, vitb")
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = os.path.abspath(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    runs = {}
    for label in args.configs.split(","):
        runs[label] = test_config(label, {"small": SMALL, "mlp": MLP, "vitb": VITB}[label], args, work)
        if label == "vitb":  # the ViT-B checkpoint is ~370 MB
            shutil.rmtree(runs[label][0])
    if "small" not in runs:
        runs["small"] = test_config("small", SMALL, args, work)
    test_cli_errors(args, work, *runs["small"])
    if failures:
        print(f"{len(failures)} check(s) failed (files kept in {work})")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    print("all export checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
