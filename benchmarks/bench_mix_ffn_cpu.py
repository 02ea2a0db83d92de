"""Usage: python benchmarks/bench_mix_ffn_cpu.py [THREADS] [ops|e2e|all] [E2E_REPS]

Interleaved timing: Mix-FFN middle step, torch (F.linear with bias + torch backend) vs cpp
(F.linear without bias + cpp backend with in_bias), b2 shapes; and end-to-end b2 fused before/after."""
import sys, time, statistics
import torch, torch.nn.functional as F
from fastseg import ops
from fastseg.ops import use_backend

threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
torch.set_num_threads(threads)
clock = time.perf_counter

def interleave(fns, reps=25, warm=3):
    for f in fns.values():
        for _ in range(warm): f()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = clock(); f(); ts[k].append(clock() - t)
    return {k: statistics.median(v) * 1e3 for k, v in ts.items()}

print(f"threads={threads} torch {torch.__version__}")
if "e2e" not in sys.argv:
  with torch.inference_mode():
    for (N, C, H) in [(16384, 256, 128), (4096, 512, 64), (1024, 1280, 32), (256, 2048, 16)]:
        dim = C // 4
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(1, N, dim, dtype=dt)
            w1 = torch.randn(C, dim, dtype=dt) / dim ** 0.5; b1 = torch.randn(C, dtype=dt) / 4
            wd = torch.randn(C, 1, 3, 3, dtype=dt) / 3; bd = torch.randn(C, dtype=dt)
            def torch_path():
                with use_backend("torch"):
                    return ops.dwconv3x3_gelu(F.linear(x, w1, b1), H, H, wd, bd)
            def cpp_path():
                with use_backend("cpp"):
                    return ops.dwconv3x3_gelu(F.linear(x, w1), H, H, wd, bd, in_bias=b1)
            h = F.linear(x, w1)
            def cpp_op():
                with use_backend("cpp"):
                    return ops.dwconv3x3_gelu(h, H, H, wd, bd, in_bias=b1)
            def torch_op():
                with use_backend("torch"):
                    return ops.dwconv3x3_gelu(h, H, H, wd, bd)
            err = ((torch_path().float() - cpp_path().float()).abs().max() / torch_path().float().abs().max()).item()
            r = interleave({"torch": torch_path, "cpp": cpp_path, "torch_op": torch_op, "cpp_op": cpp_op})
            print(f"({1},{N},{C}) {H}x{H} {str(dt)[6:]:9s} fc1+step: torch {r['torch']:.3f} ms  cpp {r['cpp']:.3f} ms"
                  f"  ({r['torch'] / r['cpp']:.2f}x) | op only: torch {r['torch_op']:.3f}  cpp {r['cpp_op']:.3f}  maxrel {err:.1e}")
if "e2e" in sys.argv or "all" in sys.argv:
    from fastseg import SegFormer
    m = SegFormer("b2", num_classes=150).eval().set_fused(True)
    img = torch.randn(1, 3, 512, 512)
    with torch.inference_mode():
        from fastseg.models import segformer as S
        def old_forward(self, x, H, W):  # the fused MixFFN before this change: fc1 with bias, torch backend
            x = self.fc1(x)
            with use_backend("torch"):
                x = ops.dwconv3x3_gelu(x, H, W, self.dwconv.weight, self.dwconv.bias)
            return self.fc2(x)
        new_forward = S.MixFFN.forward
        def run_old():
            S.MixFFN.forward = old_forward
            try: return m(img)
            finally: S.MixFFN.forward = new_forward
        def run_new():
            return m(img)
        a, b = run_old(), run_new()
        print("e2e max rel diff", ((a - b).abs().max() / a.abs().max()).item(),
              "argmax agree", (a.argmax(1) == b.argmax(1)).float().mean().item())
        r = interleave({"before": run_old, "after": run_new}, reps=int(sys.argv[3]) if len(sys.argv) > 3 else 20, warm=2)
        print(f"b2 512x512 fused fp32 e2e: before {r['before']:.1f} ms  after {r['after']:.1f} ms ({r['before'] / r['after']:.2f}x)")
