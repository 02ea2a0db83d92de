"""Usage: python benchmarks/bench_sr_attention_cpu.py [THREADS] [ops|e2e|all] [REPS]

Interleaved timing (median of REPS rounds) of SR attention on CPU: the `cpp` backend (C++ kernel,
csrc/sr_attention_cpu.cpp) against the `torch` backend (SDPA on strided views), at SegFormer's 512²
shapes (b0 stage 1, b2 stages 1-4), float32 and bfloat16; wall time and this process's CPU time
(the CPU time is the steadier figure on a shared machine). `e2e`: the b0 / b2 fused forward at 512²
with sr_attention on cpp vs torch (the other ops as dispatch chooses)."""
import sys
import time
import statistics

import torch

from fastseg import SegFormer
from fastseg.ops import dispatch
from fastseg.ops.sr_attention import CPP_ISA, sr_attention_cpp, sr_attention_torch

threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
mode = sys.argv[2] if len(sys.argv) > 2 else "all"
REPS = int(sys.argv[3]) if len(sys.argv) > 3 else 9
torch.set_num_threads(threads)

# name: (N, Nkv, C, heads) at a 512x512 input
SHAPES = {"b0-s1": (16384, 256, 32, 1), "b2-s1": (16384, 256, 64, 1), "b2-s2": (4096, 256, 128, 2),
          "b2-s3": (1024, 256, 320, 5), "b2-s4": (256, 256, 512, 8)}


def interleave(fns, reps, inner=1):
    """Median wall and process-CPU ms per call of each fn, the fns timed in turn each round."""
    for f in fns.values():
        f()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            w, c = time.perf_counter(), time.process_time()
            for _ in range(inner):
                f()
            wall[k].append((time.perf_counter() - w) / inner * 1e3)
            cpu[k].append((time.process_time() - c) / inner * 1e3)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def ops_table():
    for dtype in (torch.float32, torch.bfloat16):
        for name, (N, Nkv, C, h) in SHAPES.items():
            q, kv = torch.randn(1, N, C, dtype=dtype), torch.randn(1, Nkv, 2 * C, dtype=dtype)
            s = (C // h) ** -0.5
            wall, cpu = interleave({"sdpa": lambda: sr_attention_torch(q, kv, h, s),
                                    "cpp": lambda: sr_attention_cpp(q, kv, h, s)}, REPS,
                                   inner=max(1, int(1e8 / (N * Nkv * C))))
            gflop = 4 * N * Nkv * C / 1e9
            print(f"{str(dtype)[6:]:8s} {name}: wall sdpa {wall['sdpa']:7.2f} cpp {wall['cpp']:7.2f} ms "
                  f"({wall['sdpa'] / wall['cpp']:4.2f}x) | cpu sdpa {cpu['sdpa']:7.2f} cpp {cpu['cpp']:7.2f} ms "
                  f"({cpu['sdpa'] / cpu['cpp']:4.2f}x, cpp {gflop / cpu['cpp'] * 1e3:5.1f} GFLOP/s per CPU-s)", flush=True)


def e2e_table():
    cpp = next(b for b in dispatch.backends_of("sr_attention") if b.name == "cpp")
    off = dispatch.Backend("cpp", lambda **_: ["switched off by the benchmark"], cpp.impl)

    def with_backend(model, x, backend):
        def run():
            dispatch.register("sr_attention", backend)
            try:
                return model(x)
            finally:
                dispatch.register("sr_attention", cpp)
        return run

    for variant in ("b0", "b2"):
        for dtype in (torch.float32, torch.bfloat16):
            model = SegFormer(variant, num_classes=150).eval().set_fused(True).to(dtype)
            x = torch.randn(1, 3, 512, 512, dtype=dtype)
            with torch.no_grad():
                wall, cpu = interleave({"torch": with_backend(model, x, off), "cpp": with_backend(model, x, cpp)}, REPS)
            print(f"{variant} {str(dtype)[6:]:8s} fused forward 512²: wall sdpa {wall['torch']:7.1f} cpp "
                  f"{wall['cpp']:7.1f} ms ({wall['torch'] / wall['cpp']:4.2f}x) | cpu {cpu['torch']:7.1f} vs "
                  f"{cpu['cpp']:7.1f} ms ({cpu['torch'] / cpu['cpp']:4.2f}x)", flush=True)


if __name__ == "__main__":
    print(f"threads={threads} torch {torch.__version__} cpp ISA {CPP_ISA}")
    with torch.no_grad():
        if mode in ("ops", "all"):
            ops_table()
        if mode in ("e2e", "all"):
            e2e_table()
