"""Hand-run CPU timing of the fused residual add + bias + LayerNorm (ops.add_layer_norm, cpp backend).

    python csrc/bench_add_layer_norm_cpu.py [--repeats 25] [--warmup 3] [--threads N] [--no-model]
                                            [--json results.json]

Op rows: SegFormer-B2 shapes of a 512x512 image (tokens x C = 16384x64, 4096x128, 1024x320,
256x512), each after the GEMM that precedes it in a block: attn.proj (K = C) and Mix-FFN fc2 (K = 4C).
  eager   s = x + F.linear(a, W, b);  y = F.layer_norm(s)        (what the eager block does)
  fused   h = F.linear(a, W);  s, y = add_layer_norm(x, h, b, ...)  (the fused block; s into h)
and the same without the GEMM (h given): ``x + h_b`` + ``F.layer_norm`` vs the op alone.
fp32, and bf16 autocast (the GEMM in bf16; residual x in fp32 as the brief states; the fused op
writes y in bf16, as the fused Block does, eager's layer_norm gives fp32).

Model row: SegFormer('b2', 150).eval().set_fused(True) on 1x3x512x512 under torch.inference_mode,
fp32, with the add_layer_norm path on (the default) and off (every Stage's ``fused`` flag False:
the blocks then run exactly the previous fused path), in the same process, interleaved.

Timings: milliseconds, the median over `repeats` interleaved rounds after `warmup` rounds (every
variant once per round, so load from other processes on a shared machine hits all alike).
Nothing here asserts on time.
"""
import argparse
import copy
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from fastseg import SegFormer
from fastseg.ops import add_layer_norm, use_backend

SHAPES = [(16384, 64), (4096, 128), (1024, 320), (256, 512)]
EPS = 1e-6


def interleaved(fns: dict, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def op_cases(M, C, K, autocast: bool):
    a, x = torch.randn(M, K), torch.randn(M, C)
    W, b = torch.randn(C, K) / K**0.5, 0.1 * torch.randn(C)
    g, beta = 1 + 0.1 * torch.randn(C), 0.1 * torch.randn(C)
    mid = torch.bfloat16 if autocast else None

    def run(fn):
        def call():
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                return fn()
        return call

    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        h0 = F.linear(a, W)
        hb0 = F.linear(a, W, b)
    return {
        "eager": run(lambda: F.layer_norm(x + F.linear(a, W, b), (C,), g, beta, EPS)),
        "fused": run(lambda: add_layer_norm(x, F.linear(a, W), b, g, beta, EPS, mid, reuse_h=True)),
        "eager-noGEMM": run(lambda: F.layer_norm(x + hb0, (C,), g, beta, EPS)),
        "fused-noGEMM": run(lambda: add_layer_norm(x, h0, b, g, beta, EPS, mid)),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--model-repeats", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ops": [], "model": None}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms, median of {args.repeats} "
          f"interleaved rounds after {args.warmup} warm-up")
    header = f"{'mode':8s} {'M x C':>11s} {'K':>5s} | {'eager':>8s} {'fused':>8s} {'x':>5s} | " \
             f"{'eager-noGEMM':>12s} {'op':>8s} {'x':>5s}"
    print(header)
    with torch.inference_mode(), use_backend("cpp"):
        for autocast in (False, True):
            for M, C in SHAPES:
                for K in (C, 4 * C):
                    t = interleaved(op_cases(M, C, K, autocast), args.repeats, args.warmup)
                    mode = "bf16-ac" if autocast else "fp32"
                    print(f"{mode:8s} {f'{M}x{C}':>11s} {K:5d} | {t['eager']:8.3f} {t['fused']:8.3f} "
                          f"{t['eager'] / t['fused']:5.2f} | {t['eager-noGEMM']:12.3f} {t['fused-noGEMM']:8.3f} "
                          f"{t['eager-noGEMM'] / t['fused-noGEMM']:5.2f}")
                    results["ops"].append({"mode": mode, "M": M, "C": C, "K": K, **t})
    if not args.no_model:
        on = SegFormer("b2", num_classes=150).eval().set_fused(True)
        off = copy.deepcopy(on)
        for stage in off.encoder.stages:
            stage.fused = False  # the blocks' previous fused path: addmm, x + branch, LayerNorm
        x = torch.randn(1, 3, 512, 512)
        with torch.inference_mode():
            t = interleaved({"add_layer_norm off": lambda: off(x), "add_layer_norm on": lambda: on(x)},
                            args.model_repeats, 2)
            diff = (on(x) - off(x)).abs().max().item()
        print(f"\nSegFormer-b2 fused, 1x3x512x512 fp32 inference_mode (median of {args.model_repeats}):")
        for k, v in t.items():
            print(f"  {k:20s} {v:9.1f} ms")
        print(f"  speedup {t['add_layer_norm off'] / t['add_layer_norm on']:.3f}x; max |logit diff| {diff:.2e}")
        results["model"] = {**t, "max_abs_diff": diff}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
