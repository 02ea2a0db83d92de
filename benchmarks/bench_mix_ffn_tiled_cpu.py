"""Usage: python benchmarks/bench_mix_ffn_tiled_cpu.py [THREADS] [ops|tiles|e2e|all] [REPS]

Interleaved timing (median) of the whole Mix-FFN on CPU, inference: the previous fused path
(``torch`` backend of mix_ffn: fc1 without bias -> cpp dwconv3x3_gelu -> fc2, the (B, N, 4C)
hidden tensor materialised) against the tiled C++ kernel (``cpp`` backend), at the MiT-B2 stage
shapes of a 512x512 image (batch 1); ``tiles`` sweeps tile_rows; ``e2e`` times the whole fused b2
forward with each."""
import statistics
import sys
import time

import torch

from fastseg.ops import mix_ffn
from fastseg.ops.mix_ffn import mix_ffn_cpp, mix_ffn_torch

threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
what = sys.argv[2] if len(sys.argv) > 2 else "all"
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 15
torch.set_num_threads(threads)
STAGES = [(128, 64), (64, 128), (32, 320), (16, 512)]  # b2 at 512x512: (H = W, C)


def interleave(fns, reps=reps, warm=2):
    for f in fns.values():
        for _ in range(warm):
            f()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in ts.items()}


def params(C, dtype):
    Ch = 4 * C
    return [torch.randn(Ch, C) / C ** 0.5, torch.randn(Ch) / 4, torch.randn(Ch, 1, 3, 3) / 3, torch.randn(Ch),
            torch.randn(C, Ch) / Ch ** 0.5, None]


print(f"threads={threads} torch {torch.__version__}")
with torch.inference_mode():
    if what in ("ops", "all"):
        for dtype in (torch.float32, torch.bfloat16):
            for H, C in STAGES:
                x = torch.randn(1, H * H, C, dtype=dtype)
                p = params(C, dtype)
                old = lambda: mix_ffn_torch(x, H, H, *[t if t is None else t.to(dtype) for t in p])
                new = lambda: mix_ffn_cpp(x, H, H, *p)
                a, b = old().float(), new().float()
                err = ((a - b).abs().max() / a.abs().max()).item()
                r = interleave({"old": old, "new": new})
                print(f"{str(dtype)[6:]:9s} {H}x{H} C={C:4d}: old {r['old']:7.2f} ms  tiled {r['new']:7.2f} ms "
                      f"({r['old'] / r['new']:.2f}x)  maxrel {err:.1e}")
    if what in ("tiles", "all"):
        for H, C in STAGES:
            x = torch.randn(1, H * H, C)
            p = params(C, torch.float32)
            fns = {t: (lambda t=t: mix_ffn_cpp(x, H, H, *p, tile_rows=t)) for t in (0, 2, 4, 8, 16, 32)}
            r = interleave(fns)
            print(f"fp32 {H}x{H} C={C}: " + "  ".join(f"t={k}: {v:.2f}" for k, v in r.items()))
    if what in ("e2e", "all"):
        from fastseg import SegFormer
        from fastseg.models import segformer as S

        for variant in ("b0", "b2"):
            m = SegFormer(variant, num_classes=150).eval().set_fused(True)
            img = torch.randn(1, 3, 512, 512)
            new_forward = S.MixFFN.fused_forward

            def old_forward(self, x, H, W, fc2_bias):
                return mix_ffn_torch(x, H, W, self.fc1.weight, self.fc1.bias, self.dwconv.weight, self.dwconv.bias,
                                     self.fc2.weight, fc2_bias)

            def run_old():
                S.MixFFN.fused_forward = old_forward
                try:
                    return m(img)
                finally:
                    S.MixFFN.fused_forward = new_forward

            a, b = run_old(), m(img)
            print(f"{variant} e2e max rel diff {((a - b).abs().max() / a.abs().max()).item():.1e}, "
                  f"argmax agree {(a.argmax(1) == b.argmax(1)).float().mean().item():.5f}")
            r = interleave({"old": run_old, "new": lambda: m(img)}, reps=max(5, reps // 2))
            print(f"{variant} 512x512 fused fp32 forward: old {r['old']:.1f} ms  tiled {r['new']:.1f} ms "
                  f"({r['old'] / r['new']:.2f}x)")
