"""Hand-run CPU timing of the patch embedding: reference vs the torch backend vs the C++ kernel.

    python csrc/bench_cpu.py [--batch 1] [--repeats 30] [--backward] [--dtype float32] [--threads N]

SegFormer-B0/B2 shapes from a 512x512 image: stage 1 k7 s4 from the NCHW image, stages 2-4 k3 s2
from the previous stage's tokens. Columns (milliseconds, the minimum over interleaved repeats, so
that other load on a shared machine disturbs it least):
  ref-nchw   the reference on an NCHW-contiguous input (what the official code feeds stages 2-4)
  ref-view   the reference on the token tensor viewed as an image (channels-last strides)
  torch      the torch backend
  cpp        the C++ kernel, default engine (oneDNN conv + fused LayerNorm)
  cpp-i2c    the C++ kernel, im2col + GEMM engine (FASTSEG_CPU_CONV=im2col)
Speedups are against ref-view, the faster of the two references. Nothing here asserts on time.
"""
import argparse
import os
import time

import torch

from fastseg.ops import use_backend
from fastseg.ops.overlap_patch_embed import overlap_patch_embed, overlap_patch_embed_reference

DIMS = {"b0": (32, 64, 160, 256), "b2": (64, 128, 320, 512)}
VARIANTS = ("ref-nchw", "ref-view", "torch", "cpp", "cpp-i2c")


def stages(variant, batch, dtype, size=512):
    cin, h = 3, size
    for i, c in enumerate(DIMS[variant]):
        k, s = (7, 4) if i == 0 else (3, 2)
        x = torch.randn(batch, cin, h, h, dtype=dtype)
        if i > 0:  # tokens (B, H*W, Cin) of the previous stage, seen as an image
            x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        params = [torch.randn(c, cin, k, k, dtype=dtype) / (cin * k * k) ** 0.5, torch.randn(c, dtype=dtype),
                  1 + 0.1 * torch.randn(c, dtype=dtype), 0.1 * torch.randn(c, dtype=dtype)]
        yield f"{variant} stage {i + 1}: x {tuple(x.shape)} -> C={c} k{k}s{s}", x, s, params
        cin, h = c, (h + 2 * (k // 2) - k) // s + 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--backward", action="store_true",
                    help="time forward + backward (all gradients but the stage-1 image's)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.dtype}, "
          f"{'forward+backward' if args.backward else 'forward'}; min ms over {args.repeats} interleaved runs")
    print(f"{'shape':54s}" + "".join(f"{v:>15s}" for v in VARIANTS))
    totals = dict.fromkeys(VARIANTS, 0.0)
    for variant in DIMS:
        for name, x, s, (w, b, g, beta) in stages(variant, args.batch, dtype):
            inputs = {"ref-nchw": x.contiguous()}
            grads = {}

            def run(v):
                xin = inputs.get(v, x)
                if args.backward:  # every gradient but the image's (stage 1), as in training
                    for t in (xin, w, b, g, beta):
                        t.requires_grad_(t is not xin or xin.shape[1] != 3)
                        t.grad = None
                if v.startswith("ref"):
                    out = overlap_patch_embed_reference(xin, w, b, s, g, beta, 1e-5)[0]
                else:
                    os.environ["FASTSEG_CPU_CONV"] = "im2col" if v == "cpp-i2c" else "conv"
                    with use_backend(v.split("-")[0]):
                        out = overlap_patch_embed(xin, w, b, s, g, beta, 1e-5)[0]
                if args.backward:
                    out.backward(grads.setdefault(out.shape, torch.randn_like(out)))

            best = dict.fromkeys(VARIANTS, float("inf"))
            with torch.set_grad_enabled(args.backward):
                for v in VARIANTS:
                    run(v)  # warm-up
                for _ in range(args.repeats):
                    for v in VARIANTS:
                        t0 = time.perf_counter()
                        run(v)
                        best[v] = min(best[v], (time.perf_counter() - t0) * 1e3)
            os.environ.pop("FASTSEG_CPU_CONV", None)
            ref = best["ref-view"]
            print(f"{name:54s}" + "".join(
                f"{best[v]:8.2f}" + (f" {ref / best[v]:5.2f}x" if not v.startswith("ref") else " " * 7) for v in VARIANTS))
            for v in VARIANTS:
                totals[v] += best[v]
    ref = totals["ref-view"]
    print(f"{'total':54s}" + "".join(
        f"{totals[v]:8.2f}" + (f" {ref / totals[v]:5.2f}x" if not v.startswith("ref") else " " * 7) for v in VARIANTS))


if __name__ == "__main__":
    main()
