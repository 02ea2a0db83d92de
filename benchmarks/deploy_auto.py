"""``fastseg.deploy(..., runtime="auto")`` against every runtime it could have picked.

    python benchmarks/deploy_auto.py                         # b0 512² batch 1, fp32 and int8
    python benchmarks/deploy_auto.py --precisions fp32 --rounds 9

For each precision: deploy with ``runtime="auto"`` (into a fresh engine cache unless
``--cache-dir`` is given, so auto measures on this machine now), then take every candidate
runtime's engine at that precision (the installed runtimes ``precision_reasons`` accepts here:
the same cache entries auto built) and time them interleaved in one process
(``fastseg.timing.interleaved``: the order rotates every round), ``--rounds`` rounds after one
warm-up call each, on the same random weights (``SegFormer(variant)``, seed 0) and the same input.
Auto's pick is *within noise* of the fastest when its median is at most the fastest median ×
(1 + noise), noise = max(5 %, 2 × the larger relative median absolute deviation of the two rows).
int8 is calibrated on generated shapes images at the benchmark size with every group int8 (random
weights give nearly tied logits, so a measured accuracy search would mean nothing: see
``deploy_int8_vs_nncf.py``); its int8-vs-fp32 payoff entry is recorded too. Writes
``benchmarks/results/<date>_deploy_auto_<cpu>_<config>.json`` and ``.md``, naming the CPU.
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import fastseg
from fastseg import SegFormer, cpu_info
from fastseg.deploy import runtimes
from fastseg.deploy.payoff import Int8SlowerWarning
from fastseg.io import file_slug, save_result
from fastseg.timing import interleaved

MIN_NOISE = 0.05


def calibration(size: int, n: int) -> list[torch.Tensor]:
    from fastseg.data import SyntheticShapes, TestTransform

    shapes, transform = SyntheticShapes("val", n, size, 4, 0), TestTransform(None)
    return [transform(shapes.load(i)[0])[0][None] for i in range(n)]


def mad(times: list[float]) -> float:
    """Relative median absolute deviation: the spread of a row's rounds."""
    m = statistics.median(times)
    return statistics.median(abs(t - m) for t in times) / m


def one_precision(model, precision: str, args, cache_dir: Path, calib) -> dict:
    size = (args.size, args.size)
    kw = dict(input_size=size, cache_dir=cache_dir, progress=lambda t: print(f"  [{precision}] {t}", flush=True))
    if precision == "int8":
        kw.update(calibration=calib, int8_goal=0.0)
    auto = fastseg.deploy(model, "auto", precision, **kw)
    able = [r for r in runtimes.installed() if not runtimes.precision_reasons(r, precision, torch.device("cpu"))]
    # the other candidates are cache hits of the engines auto built; their int8 payoff is not timed
    others = dict(kw, int8_timing=False) if precision == "int8" else kw
    engines = {r: (auto if r == auto.runtime else fastseg.deploy(model, r, precision, **others)) for r in able}
    x = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(1))
    times = interleaved({r: (lambda e=e: e(x)) for r, e in engines.items()}, args.rounds, warmup=1)
    ms = {r: statistics.median(t) for r, t in times.items()}
    fastest = min(ms, key=ms.get)
    pick = auto.runtime
    noise = max(MIN_NOISE, 2 * max(mad(times[pick]), mad(times[fastest])))
    ratio = ms[pick] / ms[fastest]
    return {"precision": precision, "candidates": able, "auto_pick": pick,
            "auto_measured_ms": (auto.report.get("auto") or {}).get("ms"), "ms": ms, "times": times,
            "relative_mad": {r: mad(t) for r, t in times.items()}, "fastest": fastest, "auto_over_fastest": ratio,
            "noise": noise, "within_noise": ratio <= 1 + noise, "int8_payoff": auto.report.get("int8_payoff")}


def markdown(record: dict) -> str:
    c = record["config"]
    lines = [f"# runtime=\"auto\" vs every candidate: SegFormer-{c['variant']} {c['size']}x{c['size']} b{c['batch']}", "",
             f"- CPU: {cpu_info.short(record['cpu'])}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
             f"- date: {record['date']}", f"- command: `{record['command']}`",
             f"- timing: median of {c['rounds']} interleaved rounds (order rotating) after 1 warm-up call each; "
             "within noise: auto's median <= fastest x (1 + max(5%, 2x the larger relative MAD))",
             f"- note: {record['note']}" if record.get("note") else "", "",
             "| precision | candidates (median ms, this run) | auto picked | auto's own timing (ms) | fastest | "
             "auto / fastest | noise | within noise |",
             "|---|---|---|---|---|---:|---:|---|"]
    for r in record["results"]:
        cands = ", ".join(f"{k} {v:.1f}" for k, v in r["ms"].items())
        own = ", ".join(f"{k} {v:.1f}" for k, v in (r["auto_measured_ms"] or {}).items()) or "– (one candidate)"
        lines.append(f"| {r['precision']} | {cands} | {r['auto_pick']} | {own} | {r['fastest']} | "
                     f"{r['auto_over_fastest']:.3f} | {100 * r['noise']:.1f}% | {'yes' if r['within_noise'] else 'NO'} |")
    for r in record["results"]:
        p = r.get("int8_payoff")
        if p:
            from fastseg.deploy.payoff import line

            lines += ["", f"- {line(p)}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="b0")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=list(runtimes.PRECISIONS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calibration", type=int, default=8, help="generated calibration images for int8")
    ap.add_argument("--cache-dir", default=None, help="engine cache (default: a fresh temporary one)")
    ap.add_argument("--note", default="", help="a note for the record (e.g. 'machine under load')")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    warnings.simplefilter("ignore", Int8SlowerWarning)  # the record and the table below carry it
    torch.manual_seed(0)
    model = SegFormer(args.variant, num_classes=150).eval()
    calib = calibration(args.size, args.calibration) if "int8" in args.precisions else None
    with tempfile.TemporaryDirectory(prefix="fastseg-deploy-auto-") as tmp:
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tmp)
        results = []
        for p in args.precisions:
            try:
                results.append(one_precision(model, p, args, cache_dir, calib))
            except runtimes.PrecisionUnsupported as e:
                print(f"{p}: skipped ({e})")
    when = dt.datetime.now(dt.timezone.utc)
    record = {"schema": "fastseg-deploy-auto/1", "date": when.isoformat(timespec="seconds"),
              "command": "python benchmarks/deploy_auto.py " + " ".join(sys.argv[1:]), "config": vars(args),
              "cpu": cpu_info.record(), "note": args.note,
              "versions": {"fastseg": fastseg.__version__, "torch": torch.__version__,
                           **{r: runtimes.runtime_version(r) for r in runtimes.installed() if r != "torch"}},
              "results": results}
    md = markdown(record)
    print(md)
    cpu = file_slug(record["cpu"]["label"])
    stem = Path(args.out) / f"{when.strftime('%Y%m%dT%H%M%S')}_deploy_auto_{cpu}_{args.variant}_{args.size}_b{args.batch}"
    save_result(stem, record, [md.rstrip("\n")])
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
