"""This CPU's GEMM rate, aten (``torch.addmm``, what ``F.linear`` runs) against oneDNN (a weight
packed once, ``mkldnn._linear_pointwise``), fp32 and bf16: on a large shape (the peak that
``fastseg bench`` judges a model's GEMMs against) and on SegFormer's own linear shapes.

    python benchmarks/gemm_peak.py [--dtypes fp32 bf16] [--budget 0.5]

Writes ``benchmarks/results/<date>_gemm_peak_<cpu>.json`` and ``.md`` (with the CPU's identity:
model, microarchitecture, ISA flags, the ISA oneDNN dispatches to, threads) and refreshes the
cached peak ``fastseg bench`` reads (``~/.cache/fastseg/gemm_peak.json``; it keeps the highest
peak measured, so run this on a quiet machine). Best and median
GFLOP/s of the repeats within ``--budget`` seconds per cell; a benchmark, nothing is asserted.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch

from fastseg import cpu_gemm, cpu_info
from fastseg.io import file_slug, save_result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(cpu_gemm.DTYPES))
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of repeats per (shape, dtype, implementation)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--no-cache-update", action="store_true", help="leave the peak fastseg bench reads as it is")
    ap.add_argument("--note", default="", help="a note for the record, e.g. how busy the machine was")
    args = ap.parse_args(argv)

    cpu = cpu_info.record()
    shapes = {"peak (large)": cpu_gemm.PEAK_SHAPE, **cpu_gemm.SEGFORMER_SHAPES}
    rows = []
    for name, shape in shapes.items():
        for row in cpu_gemm.sweep({name: shape}, dtypes=args.dtypes, budget_s=args.budget):
            rows.append(row)
            rate = (f"{row['best_gflops']:.1f} GFLOP/s best, {row['median_gflops']:.1f} median"
                    if "best_gflops" in row else f"unsupported: {row['unsupported']}")
            print(f"{name:44s} {row['dtype']:5s} {row['impl']:7s} {rate}", flush=True)
    peaks = {d: cpu_gemm.peak_from_rows(rows, d) for d in args.dtypes}
    if not args.no_cache_update:  # the cache keeps the highest peak measured for this CPU/torch/threads
        for p in peaks.values():
            if p is not None:
                cpu_gemm.store_peak(p)

    when = dt.datetime.now(dt.timezone.utc)
    record = {"schema": "fastseg-gemm-peak/1", "date": when.isoformat(timespec="seconds"), "cpu": cpu,
              "torch": torch.__version__, "command": "python benchmarks/gemm_peak.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "timing": f"best and median of the repeats within {args.budget} s per cell, after one warm-up call",
              "impls": {"aten": "torch.addmm(bias, x, w.t()) (F.linear's path)",
                        "onednn": "torch.ops.mkldnn._linear_pointwise, weight packed by mkldnn._reorder_linear_weight"},
              "note": args.note, "peaks": peaks, "rows": rows}
    lines = [f"# GEMM rate: aten vs oneDNN, {cpu['label']}", "",
             f"- CPU: {cpu_info.short(cpu)}",
             f"- ISA flags: {', '.join(f for f, on in cpu['isa_flags'].items() if on) or 'none tracked'}",
             f"- torch {torch.__version__}, oneDNN {cpu.get('onednn_version')}, date {record['date']}",
             f"- command: `{record['command']}`", f"- timing: {record['timing']}",
             *([f"- note: {args.note}"] if args.note else []),
             "- aten = `torch.addmm` (what `F.linear` runs); oneDNN = `mkldnn._linear_pointwise` on a packed weight",
             "", "| shape (M×K · K×N) | dtype | aten GFLOP/s | oneDNN GFLOP/s | oneDNN / aten |",
             "|---|---|---:|---:|---:|"]
    by = {(r["shape_name"], r["dtype"], r["impl"]): r for r in rows}
    for name in shapes:
        for d in args.dtypes:
            a, o = by[(name, d, "aten")], by[(name, d, "onednn")]

            def cell(r):
                return f"{r['best_gflops']:.1f}" if "best_gflops" in r else "–"

            ratio = f"{o['best_gflops'] / a['best_gflops']:.2f}x" if "best_gflops" in a and "best_gflops" in o else "–"
            lines.append(f"| {name} | {d} | {cell(a)} | {cell(o)} | {ratio} |")
    notes = sorted({f"{r['impl']} {r['dtype']}: {r['unsupported']}" for r in rows if "unsupported" in r})
    lines += [""] + [f"- not run: {n}" for n in notes]
    lines += [f"- {d} peak: {p['gflops']:.1f} GFLOP/s ({p['impl']})" if p else f"- {d} peak: none"
              for d, p in peaks.items()]
    slug = file_slug(f"{cpu['model_name']} {cpu['microarch'] or ''}")
    stem = Path(args.out) / f"{when.strftime('%Y%m%dT%H%M%S')}_gemm_peak_{slug}_{cpu['threads']}t"
    save_result(stem, record, lines)
    print("\n".join(lines))
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
