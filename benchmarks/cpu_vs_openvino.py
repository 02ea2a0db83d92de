"""fastseg fused (PyTorch, CPU) against OpenVINO running HuggingFace's own ONNX export — only
these two rows, for the configurations where the full ``fastseg bench --peers`` table does not
fit in memory (it holds eager, HF eager and four ONNX sessions at once: b2 at batch 8 went past
24 GB and was killed).

    python benchmarks/cpu_vs_openvino.py --variant b2 --batch 8
    python benchmarks/cpu_vs_openvino.py --variant b2 --height 1024 --width 2048 --repeats 5
    python benchmarks/cpu_vs_openvino.py --variant b0 --dtype bf16

Same weights (a random-init HF model loaded into fastseg with ``SegFormer.from_hf``), same input;
OpenVINO compiles HF's dynamic file reshaped to the input's static shape with the precision hint
of ``--dtype`` (as ``fastseg bench --peers`` does). The two rows are timed alternately, the order
flipping every round; medians and their ratio are reported, with the fused output's error against
OpenVINO's. Writes ``benchmarks/results/<date>_cpu_vs_openvino_<config>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastseg import SegFormer, SegFormerConfig, cpu_allocator, cpu_info, peers
from fastseg.io import atomic_write, save_json_atomic


ROW = peers.row_name("openvino", "HF")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="b2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    hf = peers.hf_model(SegFormerConfig.from_variant(args.variant, num_classes=150))
    fused = SegFormer.from_hf(hf).eval().set_fused(True).to(dtype)
    x = torch.randn(args.batch, 3, args.height, args.width, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = peers.export_hf_onnx(hf, Path(tmp) / "hf.onnx", x[:1])
        del hf
        try:
            openvino = peers._session(path, "openvino", dtype, tuple(x.shape))
        except peers.PrecisionUnavailable as e:
            raise SystemExit(f"cpu_vs_openvino: {e}") from None
    array, xd = x.numpy(), x.to(dtype)

    def run_fused():
        with torch.inference_mode():
            return fused(xd)

    rows = {"fastseg fused": run_fused, ROW: lambda: torch.from_numpy(openvino(array))}
    out = {name: fn().float() for name, fn in rows.items()}
    ref = out[ROW]
    rms = ((out["fastseg fused"] - ref).norm() / ref.norm()).item()
    agree = (out["fastseg fused"].argmax(1) == ref.argmax(1)).float().mean().item()
    del out, ref
    times = {name: [] for name in rows}
    names = list(rows)
    for r in range(args.warmup + args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            rows[name]()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    ratio = med[ROW] / med["fastseg fused"]

    import openvino

    when = dt.datetime.now(dt.timezone.utc)
    config = f"{args.variant}_{args.height}x{args.width}_b{args.batch}_{args.dtype}"
    record = {
        "date": when.isoformat(timespec="seconds"), "config": vars(args), "cpu": cpu_info.record(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "openvino": openvino.__version__,
        "cpu_malloc": cpu_allocator.state(), "median_ms": med, "fused_speedup_over_openvino": ratio,
        "fused_vs_openvino": {"rms_rel_err": rms, "argmax_agreement": agree},
    }
    md = [f"# fastseg fused vs OpenVINO (HF's ONNX), SegFormer-{args.variant} {args.height}x{args.width} "
          f"batch {args.batch} {args.dtype}", "",
          f"{record['date']}, torch {torch.__version__}, OpenVINO {openvino.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} alternating rounds after {args.warmup} warm-up", "",
          f"CPU: {cpu_info.short(record['cpu'])}", "",
          f"`python benchmarks/cpu_vs_openvino.py --variant {args.variant} --batch {args.batch} --height {args.height} "
          f"--width {args.width} --dtype {args.dtype} --repeats {args.repeats}`", "",
          "| row | median ms |", "|---|---:|"]
    md += [f"| {name} | {ms:.1f} |" for name, ms in med.items()]
    md += ["", f"fused speedup over OpenVINO: **{ratio:.2f}x**; fused vs OpenVINO output: RMS rel err {rms:.1e}, "
           f"argmax agreement {100 * agree:.3f}%", ""]
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{when.strftime('%Y%m%dT%H%M%S')}_cpu_vs_openvino_{config}"
    save_json_atomic(record, stem.with_suffix(".json"))
    with atomic_write(stem.with_suffix(".md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
