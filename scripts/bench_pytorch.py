#!/usr/bin/env python3
"""Reference for mae-bench: the masked autoencoder as MONAI trains it, timed the same way.

--impl monai (default when MONAI imports): MONAI's own MaskedAutoEncoderViT with torch.optim.AdamW,
  the masked-patch MSE of MONAI's tutorial;
--impl plain: the same algorithm written out in plain PyTorch (conv patch embedding over all
  patches, einsum attention), for machines without MONAI.
Run it with the python whose torch matches the mae3d build (build/venv-py/bin/python: Debian's
python3-torch 1.13.1 and the same BLAS; build/venv-lt2/bin/python for the LibTorch 2.x build), so
that the two compare implementations, not libraries.

Usage: build/venv-py/bin/python scripts/bench_pytorch.py [--preset A B] [--img 128] [--batch 4]
         [--precision fp32|bf16] [--impl monai|plain] [--threads 2] [--iters 5]
Prints one JSON line per preset: preset, img, batch, precision, fwd_s, step_s (medians), peak_rss_mb,
blas_core (the OpenBLAS kernels that ran, as mae-bench reports them; null for another BLAS), or
"error" when the step fails (MONAI's index_put refuses CPU bf16 autocast on torch 1.13).
"""
import argparse
import ctypes
import json
import os
import resource
import statistics
import time

import torch
import torch.nn as nn


def blas_core():
    """The kernels of the OpenBLAS this torch loaded (openblas_get_corename), or None for another BLAS."""
    try:
        lib = ctypes.CDLL("libopenblas.so.0", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return None
    lib.openblas_get_corename.restype = ctypes.c_char_p
    name = lib.openblas_get_corename()
    return name.decode() if name else None


PRESETS = {
    "A": dict(img=96, patch=16, hidden=768, mlp=3072, layers=12, heads=12, dec=384, dec_mlp=512, dec_layers=4,
              dec_heads=12, batch=2),
    "B": dict(img=64, patch=16, hidden=384, mlp=1536, layers=6, heads=6, dec=384, dec_mlp=512, dec_layers=4,
              dec_heads=12, batch=4),
}


class Block(nn.Module):
    """MONAI TransformerBlock: pre-norm SABlock (fused qkv, einsum attention) and MLPBlock."""

    def __init__(self, width, mlp, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out_proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.linear1 = nn.Linear(width, mlp)
        self.linear2 = nn.Linear(mlp, width)
        self.scale = (width // heads) ** -0.5

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        att = (torch.einsum("blxd,blyd->blxy", q, k) * self.scale).softmax(dim=-1)
        o = torch.einsum("bhxy,bhyd->bhxd", att, v).permute(0, 2, 1, 3).reshape(b, t, e)
        x = x + self.out_proj(o)
        return x + self.linear2(nn.functional.gelu(self.linear1(self.norm2(x))))


class Mae(nn.Module):
    def __init__(self, c):
        super().__init__()
        g = c["img"] // c["patch"]
        self.n = g ** 3
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c["hidden"]))
        self.proj = nn.Conv3d(1, c["hidden"], c["patch"], c["patch"])
        self.pos = nn.Parameter(torch.randn(1, self.n, c["hidden"]) * 0.02, requires_grad=False)
        self.blocks = nn.Sequential(*[Block(c["hidden"], c["mlp"], c["heads"]) for _ in range(c["layers"])],
                                    nn.LayerNorm(c["hidden"]))
        self.decoder_embed = nn.Linear(c["hidden"], c["dec"])
        self.mask_tokens = nn.Parameter(torch.zeros(1, 1, c["dec"]))
        self.dec_pos = nn.Parameter(torch.randn(1, self.n, c["dec"]) * 0.02, requires_grad=False)
        self.decoder_blocks = nn.Sequential(*[Block(c["dec"], c["dec_mlp"], c["dec_heads"])
                                              for _ in range(c["dec_layers"])], nn.LayerNorm(c["dec"]))
        self.decoder_pred = nn.Linear(c["dec"], c["patch"] ** 3)

    def forward(self, x, ratio=0.75):
        x = self.proj(x).flatten(2).transpose(1, 2) + self.pos
        b, n, _ = x.shape
        keep = int((1 - ratio) * n)
        sel = torch.multinomial(torch.ones(b, n), keep, False)
        rows = torch.arange(b).unsqueeze(1)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x[rows, sel]), dim=1)
        x = self.decoder_embed(self.blocks(x))
        full = self.mask_tokens.repeat(b, n, 1)
        full[rows, sel] = x[:, 1:, :]
        x = torch.cat([x[:, :1, :], full + self.dec_pos], dim=1)
        pred = self.decoder_pred(self.decoder_blocks(x))[:, 1:, :]
        mask = torch.ones(b, n)
        mask[rows, sel] = 0
        return pred, mask


def patchify(x, p):
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, -1, p ** 3 * c)


def monai_model(c):
    from monai.networks.nets import MaskedAutoEncoderViT
    return MaskedAutoEncoderViT(in_channels=1, img_size=c["img"], patch_size=c["patch"], hidden_size=c["hidden"],
                                mlp_dim=c["mlp"], num_layers=c["layers"], num_heads=c["heads"], masking_ratio=0.75,
                                decoder_hidden_size=c["dec"], decoder_mlp_dim=c["dec_mlp"],
                                decoder_num_layers=c["dec_layers"], decoder_num_heads=c["dec_heads"],
                                proj_type="conv", pos_embed_type="sincos", decoder_pos_embed_type="sincos",
                                spatial_dims=3)


def bench(name, c, impl, precision, iters, warmup):
    torch.manual_seed(0)
    model = monai_model(c) if impl == "monai" else Mae(c)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-4, betas=(0.9, 0.95),
                            weight_decay=0.05)
    x = torch.randn(c["batch"], 1, c["img"], c["img"], c["img"])
    target = patchify(x, c["patch"])
    steps, fwds = [], []
    result = {"preset": name, "impl": "monai.MaskedAutoEncoderViT" if impl == "monai" else
              "pytorch-python (MONAI algorithm)", "torch": torch.__version__, "img": c["img"], "batch": c["batch"],
              "precision": precision, "threads": torch.get_num_threads()}
    try:
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                pred, mask = model(x)
            loss = (((pred.float() - target) ** 2).mean(-1) * mask).sum() / mask.sum()
            t1 = time.perf_counter()
            loss.backward()
            opt.step()
            t2 = time.perf_counter()
            if i >= warmup:
                fwds.append(t1 - t0)
                steps.append(t2 - t0)
    except RuntimeError as e:
        result["error"] = str(e).splitlines()[0]
        return result
    result.update({"fwd_s": round(statistics.median(fwds), 4), "step_s": round(statistics.median(steps), 4),
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
                   "blas_core": blas_core()})
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", nargs="+", default=["A", "B"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--img", type=int, help="crop size (a cube) over the preset's")
    ap.add_argument("--batch", type=int, help="batch size over the preset's")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--impl", choices=["monai", "plain"])
    args = ap.parse_args()
    impl = args.impl
    if impl is None:
        try:
            import monai  # noqa: F401
            impl = "monai"
        except ImportError:
            impl = "plain"
    torch.set_num_threads(args.threads)
    for p in args.preset:
        c = dict(PRESETS[p])
        if args.img:
            c["img"] = args.img
        if args.batch:
            c["batch"] = args.batch
        print(json.dumps(bench(p, c, impl, args.precision, args.iters, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
