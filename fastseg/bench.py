"""``fastseg bench``: eager vs fused (vs torch.compile) on one model and resolution.

Runs each mode on the same weights and inputs, checks parity against eager, times it (median
after warm-up; CUDA events on GPU), and writes a JSON record, a Markdown table and a PNG bar
chart to the results folder. Inside a checkout (``benchmarks/README.md`` next to the results
folder) it also refreshes the summary table there.
"""
from __future__ import annotations

import datetime as dt
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from fastseg import parity
from fastseg.timing import PeakMemory, device_name, measure, median

SCHEMA = "fastseg-bench/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUMMARY_BEGIN, SUMMARY_END = "<!-- results:begin -->", "<!-- results:end -->"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    import fastseg

    out["fastseg"] = fastseg.__version__
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def generated_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A deterministic synthetic scene (gradients, discs, stripes), ImageNet-normalised: (1, 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, height)[:, None].expand(height, width)
    xs = torch.linspace(-1, 1, width)[None, :].expand(height, width)
    img = torch.stack([0.5 + 0.5 * xs, 0.5 + 0.5 * ys, 0.5 + 0.25 * torch.sin(8 * xs + 4 * ys)])
    for _ in range(6):
        cy, cx = (torch.rand(2, generator=g) * 2 - 1).tolist()
        radius = 0.1 + 0.5 * torch.rand(1, generator=g).item()
        colour = torch.rand(3, 1, 1, generator=g)
        img = torch.where((ys - cy) ** 2 + (xs - cx) ** 2 < radius ** 2, colour, img)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((img - mean) / std)[None]


def run(args) -> dict:
    from fastseg import SegFormer

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    if args.checkpoint:
        base = SegFormer.from_pretrained(args.checkpoint, num_classes=args.num_classes)
    else:
        torch.manual_seed(args.seed)
        base = SegFormer(args.variant, num_classes=args.num_classes or 150)
    base = base.to(device=device, dtype=dtype)
    base.train(args.backward)
    if args.backward:
        # Training mode without stochastic layers, so every mode computes the same function.
        from fastseg.models.segformer import DropPath

        for m in base.modules():
            if isinstance(m, (DropPath, torch.nn.Dropout, torch.nn.Dropout2d)):
                m.p = 0.0
    x = generated_image(args.height, args.width, args.seed).repeat(args.batch, 1, 1, 1).to(device=device, dtype=dtype)

    import copy

    low_precision = dtype != torch.float32
    gold = None
    if low_precision:  # the fp32 gold every low-precision mode is judged against (fastseg.parity)
        gold_model = copy.deepcopy(base).float()
        with torch.inference_mode():
            gold = gold_model(x.float()).detach().clone()
        del gold_model

    modes = {"eager": base, "fused": copy.deepcopy(base).set_fused(True)}
    compile_s = None
    if args.compile:
        modes["compile"] = torch.compile(copy.deepcopy(base))

    def step(model):
        if args.backward:
            def fn():
                for p in model.parameters():
                    p.grad = None
                model(x).float().square().mean().backward()
        else:
            def fn():
                with torch.inference_mode():
                    model(x)
        return fn

    from tqdm import tqdm

    total = len(modes) * (args.warmup + args.repeats)
    results, reference = [], None
    with tqdm(total=total, desc=f"SegFormer-{base.variant or 'custom'} {args.height}x{args.width}",
              unit="run", file=sys.stderr, disable=args.quiet) as bar:
        for name, model in modes.items():
            bar.set_postfix_str(name)
            if name == "compile":
                t0 = time.perf_counter()
                with torch.inference_mode() if not args.backward else torch.enable_grad():
                    model(x)
                compile_s = time.perf_counter() - t0
            with torch.inference_mode():
                out = model(x).detach().clone()
            if reference is None:
                reference = out if gold is None else gold
            with PeakMemory(device) as mem:
                step(model)()
            times = measure(step(model), device, args.warmup, args.repeats, on_step=bar.update)
            ms = median(times)
            results.append({"mode": name, "median_ms": ms, "min_ms": min(times), "max_ms": max(times),
                            "images_per_s": args.batch / (ms / 1e3), "peak_mem_mb": mem.peak / 2**20,
                            **parity.errors(out, reference)})
    eager_ms = results[0]["median_ms"]
    for r in results:
        r["speedup"] = eager_ms / r["median_ms"]
        if r["mode"] == "eager" and not low_precision:
            r["parity"], r["parity_note"] = True, "the reference"
        else:
            r["parity"], r["parity_note"] = parity.judge(r, results[0], low_precision)
    fused = modes["fused"]
    return {
        "schema": SCHEMA,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "fastseg bench " + " ".join(shlex.quote(a) for a in args.argv),
        "device": {"type": device.type, "name": device_name(device)},
        "versions": versions(),
        "config": {"variant": base.variant, "num_classes": base.num_classes, "height": args.height,
                   "width": args.width, "batch": args.batch, "dtype": args.dtype,
                   "pass": "forward+backward" if args.backward else "forward",
                   "warmup": args.warmup, "repeats": args.repeats},
        "backends": {op: c.backend for op, c in fused.backends().items()},
        "compile_s": compile_s,
        "peak_mem_note": "CUDA allocator peak" if device.type == "cuda" else "process RSS peak (sampled)",
        "parity_rule": (f"errors against an fp32 gold (eager fp32, same input); pass: finite and RMS error <= "
                        f"{parity.LOW_PRECISION_FACTOR:g}x eager {args.dtype}'s own" if low_precision else
                        f"errors against eager fp32; pass: finite and argmax agreement >= "
                        f"{100 * parity.ARGMAX_AGREEMENT_MIN:.1f}%"),
        "results": results,
    }


def table(record: dict) -> str:
    low = record["config"]["dtype"] != "fp32"
    vs = "vs fp32 gold" if low else "vs eager"
    lines = [f"| mode | median ms | images/s | speedup | max rel err {vs} | RMS rel err {vs} | argmax agree {vs} | "
             f"parity | peak mem MB |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in record["results"]:
        verdict = "ok" if r.get("parity", True) else "FAILED"
        lines.append(f"| {r['mode']} | {r['median_ms']:.2f} | {r['images_per_s']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['max_rel_err']:.1e} | {r.get('rms_rel_err', float('nan')):.1e} | "
                     f"{100 * r['argmax_agreement']:.3f}% | {verdict} | {r['peak_mem_mb']:.0f} |")
    return "\n".join(lines)


def _stem(record: dict) -> str:
    c = record["config"]
    when = record["date"][:19].replace(":", "").replace("-", "")
    dev = re.sub(r"[^A-Za-z0-9]+", "-", record["device"]["name"]).strip("-")[:40]
    kind = "train" if c["pass"] != "forward" else "fwd"
    return f"{when}_{dev}_{c['variant'] or 'custom'}_{c['height']}x{c['width']}_b{c['batch']}_{c['dtype']}_{kind}"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["mode"] for r in record["results"]]
    ms = [r["median_ms"] for r in record["results"]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bars = ax.bar(names, ms, color=["#888888", "#2a7ab0", "#d08c2a"][: len(names)])
    for bar, r in zip(bars, record["results"]):
        ax.annotate(f"{r['median_ms']:.1f} ms\n{r['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    c = record["config"]
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"SegFormer-{c['variant']} {c['height']}x{c['width']} batch {c['batch']} {c['dtype']} "
                 f"{c['pass']}\n{record['device']['name']}", fontsize=8)
    ax.set_ylim(0, max(ms) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(record: dict, out_dir: Path, make_plot: bool = True) -> dict:
    """JSON + Markdown (+ PNG) in ``out_dir``; returns their paths."""
    from fastseg.io import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(record)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    with atomic_write(paths["json"], "w") as f:
        json.dump(record, f, indent=2)
    c = record["config"]
    md = [f"# SegFormer-{c['variant']} {c['height']}x{c['width']} batch {c['batch']} {c['dtype']} {c['pass']}", "",
          f"- device: {record['device']['name']}",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
          f"- date: {record['date']}", f"- command: `{record['command']}`",
          "- fused backends: " + ", ".join(f"{k}={v}" for k, v in record["backends"].items()),
          f"- peak memory: {record['peak_mem_note']}"]
    if "parity_rule" in record:
        md.append(f"- parity: {record['parity_rule']}")
    if record["compile_s"] is not None:
        md.append(f"- torch.compile time (excluded from timings): {record['compile_s']:.1f} s")
    md += ["", table(record), ""]
    with atomic_write(paths["md"], "w") as f:
        f.write("\n".join(md))
    if make_plot:
        paths["png"] = out_dir / f"{stem}.png"
        plot(record, paths["png"])
    return paths


def update_summary(readme: Path, results_dir: Path) -> None:
    """Rewrite the table between the result markers of ``readme`` from the newest record of each
    (device, variant, size, batch, dtype, pass)."""
    if not readme.exists():
        return
    newest = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("schema") != SCHEMA:
            continue
        c = rec["config"]
        key = (rec["device"]["name"], c["variant"], c["height"], c["width"], c["batch"], c["dtype"], c["pass"])
        if key not in newest or rec["date"] > newest[key][0]["date"]:
            newest[key] = (rec, path)
    rows = ["| device | model | input | dtype | pass | eager ms | fused ms | speedup | compile ms | date | file |",
            "|---|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for (device, variant, h, w, b, dtype, kind), (rec, path) in sorted(newest.items()):
        by = {r["mode"]: r for r in rec["results"]}
        comp = f"{by['compile']['median_ms']:.1f}" if "compile" in by else "–"
        rows.append(f"| {device} | SegFormer-{variant} | {h}x{w} b{b} | {dtype} | {kind} | "
                    f"{by['eager']['median_ms']:.1f} | {by['fused']['median_ms']:.1f} | {by['fused']['speedup']:.2f}x | "
                    f"{comp} | {rec['date'][:10]} | [{path.stem}](results/{path.name}) |")
    text = readme.read_text()
    if SUMMARY_BEGIN not in text or SUMMARY_END not in text:
        return
    head, rest = text.split(SUMMARY_BEGIN, 1)
    _, tail = rest.split(SUMMARY_END, 1)
    readme.write_text(head + SUMMARY_BEGIN + "\n" + "\n".join(rows) + "\n" + SUMMARY_END + tail)


def add_arguments(p) -> None:
    p.add_argument("--variant", default="b0", choices=["b0", "b1", "b2", "b3", "b4", "b5"])
    p.add_argument("--checkpoint", help="weights in any format SegFormer.from_pretrained reads")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    p.add_argument("--compile", action="store_true", help="add torch.compile of the eager model (compile time excluded)")
    p.add_argument("--backward", action="store_true", help="time forward + backward (a training step) instead of inference")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON/Markdown/PNG results")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    if min(args.height, args.width) < 32 or args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("fastseg bench: need height, width >= 32, batch >= 1, repeats >= 1, warmup >= 0")
    record = run(args)
    c = record["config"]
    print(f"\nSegFormer-{c['variant']} {c['height']}x{c['width']} batch {c['batch']} {c['dtype']} {c['pass']} "
          f"on {record['device']['name']}")
    print("fused backends: " + ", ".join(f"{k}={v}" for k, v in record["backends"].items()))
    if record["compile_s"] is not None:
        print(f"torch.compile took {record['compile_s']:.1f} s (not in the timings)")
    print(table(record))
    print(f"parity: {record['parity_rule']}")
    out_dir = Path(args.out)
    paths = write(record, out_dir, make_plot=not args.no_plot)
    update_summary(out_dir.parent / "README.md", out_dir)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    bad = [f"{r['mode']} ({r['parity_note']})" for r in record["results"] if not r["parity"]]
    if bad:
        print(f"PARITY FAILED for: {'; '.join(bad)}")
        return 1
    return 0
