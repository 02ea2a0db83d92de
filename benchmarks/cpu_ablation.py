"""What each C++ CPU kernel is worth end to end: the fused forward with one backend at a time
removed from the dispatcher (the op then takes its next backend, ``torch``), all in one process,
rounds interleaved.

    python benchmarks/cpu_ablation.py --variant b2 [--batch 1] [--dtype fp32|bf16] [--rounds 9]

Rows: ``all`` (the default dispatch), ``-<op> cpp`` for the decoder head, the Mix-FFN kernel and
add + LayerNorm. Prints medians and minima; a benchmark, nothing is asserted or written.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from fastseg import SegFormer, cpu_info
from fastseg.ops import dispatch

OPS = ("decoder_upsample_fuse", "dwconv3x3_gelu", "add_layer_norm")


@contextlib.contextmanager
def without(op: str, backend: str):
    """The dispatcher as if ``op`` had no ``backend`` (restored on exit)."""
    saved = dispatch.backends_of(op)
    dispatch._registry[op] = [b for b in saved if b.name != backend]
    try:
        yield
    finally:
        dispatch._registry[op] = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="b2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model = SegFormer(args.variant, num_classes=150).eval().set_fused(True).to(dtype)
    x = torch.randn(args.batch, 3, args.size, args.size, dtype=dtype)
    rows = {"all": contextlib.nullcontext}
    rows.update({f"-{op} cpp": (lambda op=op: without(op, "cpp")) for op in OPS})
    times = {name: [] for name in rows}
    with torch.inference_mode():
        for name, ctx in rows.items():
            with ctx():
                model(x)
        for r in range(args.rounds):
            order = list(rows) if r % 2 == 0 else list(rows)[::-1]
            for name in order:
                with rows[name]():
                    t = time.perf_counter()
                    model(x)
                    times[name].append(time.perf_counter() - t)
    print(f"SegFormer-{args.variant} {args.size}² batch {args.batch} {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds")
    print(f"CPU: {cpu_info.short(cpu_info.record())}")
    for name, v in times.items():
        print(f"  {name:30s} median {statistics.median(v) * 1e3:8.1f} ms   min {min(v) * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
