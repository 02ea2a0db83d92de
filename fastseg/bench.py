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
import shlex
import sys
import time
from pathlib import Path

import torch

from fastseg import cpu_info, parity
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
    from fastseg import SegFormer, bench_engine

    bench_engine.check(args)

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    hf = None
    if args.peers:
        from fastseg import peers

        if device.type != "cpu" or args.backward or args.checkpoint:
            raise SystemExit("fastseg bench --peers: the peers are CPU runtimes of a random-init --variant; "
                             "use it on CPU, for inference, without --checkpoint")
        if peers.missing("transformers"):
            raise SystemExit("fastseg bench --peers needs transformers (pip install fastseg[bench])")
        from fastseg.models.config import SegFormerConfig

        hf = peers.hf_model(SegFormerConfig.from_variant(args.variant, num_classes=args.num_classes or 150), args.seed)
        base = SegFormer.from_hf(hf)
    elif args.checkpoint:
        base = SegFormer.from_pretrained(args.checkpoint, num_classes=args.num_classes)
    else:
        torch.manual_seed(args.seed)
        base = SegFormer(args.variant, num_classes=args.num_classes or 150)
    base = base.to(device=device)
    base.train(args.backward)
    if args.backward:
        # Training mode without stochastic layers, so every mode computes the same function.
        from fastseg.models.segformer import DropPath

        for m in base.modules():
            if isinstance(m, (DropPath, torch.nn.Dropout, torch.nn.Dropout2d)):
                m.p = 0.0
    x32 = generated_image(args.height, args.width, args.seed).repeat(args.batch, 1, 1, 1).to(device=device)
    x = x32.to(dtype)

    import copy

    low_precision = dtype != torch.float32
    gold = None
    if low_precision:  # the fp32 gold every low-precision mode is judged against (fastseg.parity)
        with torch.inference_mode():
            gold = base(x32).detach().clone()
    fp32_base = base
    base = copy.deepcopy(base).to(dtype) if low_precision else base

    modes = {"eager": base, "fused": copy.deepcopy(base).set_fused(True)}
    if args.compile:
        modes["compile"] = torch.compile(copy.deepcopy(base))
    if args.compile_fused:  # the fused ops are registered ops: dynamo makes one graph around them
        modes["fused compile"] = torch.compile(copy.deepcopy(base).set_fused(True))

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

    def output(model):
        def fn():
            with torch.inference_mode():
                return model(x)
        return fn

    # Every row: a timed call and a call that returns its logits (for parity).
    rows = {name: (step(model), output(model)) for name, model in modes.items()}
    notes = []
    engine_info = None
    if bench_engine.requested(args):  # a deployed engine: fp32 input, fp32 logits out, like the model
        say = (lambda t: None) if args.quiet else (lambda t: print(f"[engine] {t}", file=sys.stderr))
        engine, engine_info = bench_engine.load(args, fp32_base, progress=say)

        def engine_call():
            return engine(x32)

        rows[engine_info["row"]] = (engine_call, engine_call)
    tmp = None
    if args.peers:
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="fastseg-bench-")
        say = (lambda t: None) if args.quiet else (lambda t: print(f"[peers] {t}", file=sys.stderr))
        peer_rows, notes = peers.runners(fp32_base.eval(), hf, x32, dtype, Path(tmp.name), compile=args.compile,
                                         progress=say)
        rows.update({name: (fn, fn) for name, fn in peer_rows.items()})

    from tqdm import tqdm

    results, compile_times = {}, {}
    total = len(rows) * (2 + args.warmup + args.repeats)
    with tqdm(total=total, desc=f"SegFormer-{base.variant or 'custom'} {args.height}x{args.width}",
              unit="run", file=sys.stderr, disable=args.quiet) as bar:
        for name, (timed, out_fn) in rows.items():  # first calls (compiles), parity and memory
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            out = out_fn().detach().float().clone()
            if name in ("compile", "fused compile"):
                compile_times[name] = time.perf_counter() - t0
            reference = gold if gold is not None else (out if name == "eager" else results["eager"]["out"])
            with PeakMemory(device) as mem:
                timed()
            bar.update(2)
            results[name] = {"out": out, "peak_mem_mb": mem.peak / 2**20, "times": [],
                             **parity.errors(out, reference)}
            if engine_info and name == engine_info["row"]:  # labels against the fp32 gold's, as deploy reports
                from fastseg.deploy.engine import label_agreement

                results[name].update(label_agreement(out, gold if gold is not None else results["eager"]["out"],
                                                     fp32_base.num_classes))
        # Interleaved: every round calls each row once, in an order that rotates, so drift in
        # the machine's speed (other load, clocks) falls on every row alike.
        names = list(rows)
        for r in range(args.warmup + args.repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                ms = median(measure(rows[name][0], device, warmup=0, repeats=1))
                if r >= args.warmup:
                    results[name]["times"].append(ms)
                bar.update()
    if tmp is not None:
        tmp.cleanup()
    engine_eager = None
    if engine_info and engine_info["precision"] in ("bf16", "fp16"):
        # eager's own error in the engine's precision bounds the engine's (the low-precision rule)
        same = low_precision and args.dtype == engine_info["precision"]
        engine_eager = (parity.errors(results["eager"]["out"], gold) if same else
                        bench_engine.eager_error(fp32_base, x32, gold if gold is not None else results["eager"]["out"],
                                                 engine_info["precision"]))
    gemms, gemm_note = _gemm_profiles(args, device, {name: rows[name][1] for name in modes})
    if gemm_note:
        notes.append(gemm_note)
    out_rows = []
    for name, r in results.items():
        times = r.pop("times")
        r.pop("out")
        ms = median(times)
        out_rows.append({"mode": name, "median_ms": ms, "min_ms": min(times), "max_ms": max(times),
                         "images_per_s": args.batch / (ms / 1e3), **r})
        if name in gemms:
            out_rows[-1]["gemm"] = gemms[name]
    results = out_rows
    eager_ms = results[0]["median_ms"]
    fused_ms = next(r["median_ms"] for r in results if r["mode"] == "fused")
    for r in results:
        r["speedup"] = eager_ms / r["median_ms"]
        r["fused_speedup_over"] = r["median_ms"] / fused_ms  # how many times faster fused is than this row
        if r["mode"] == "eager" and not low_precision:
            r["parity"], r["parity_note"] = True, "the reference"
        elif engine_info and r["mode"] == engine_info["row"]:
            r["parity"], r["parity_note"] = parity.judge_engine(r, engine_info["precision"], engine_eager,
                                                                trained=engine_info["trained_weights"])
        else:
            r["parity"], r["parity_note"] = parity.judge(r, results[0], low_precision)
    fused = modes["fused"]
    rule = (f"errors against an fp32 gold (eager fp32, same input); pass: finite and RMS error <= "
            f"{parity.LOW_PRECISION_FACTOR:g}x eager {args.dtype}'s own" if low_precision else
            f"errors against eager fp32; pass: finite and argmax agreement >= "
            f"{100 * parity.ARGMAX_AGREEMENT_MIN:.1f}%")
    if engine_info:
        rule += f"; {bench_engine.rule(engine_info)}"
    return {
        "schema": SCHEMA,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "fastseg bench " + " ".join(shlex.quote(a) for a in args.argv),
        "device": {"type": device.type, "name": device_name(device)},
        "cpu": cpu_info.record(),
        "versions": versions(),
        "config": {"variant": base.variant, "num_classes": base.num_classes, "height": args.height,
                   "width": args.width, "batch": args.batch, "dtype": args.dtype,
                   "pass": "forward+backward" if args.backward else "forward",
                   "warmup": args.warmup, "repeats": args.repeats},
        "backends": {op: c.backend for op, c in fused.backends().items()},
        "compile_s": compile_times.get("compile"),
        "compile_times_s": compile_times,
        "peer_ratios": peer_ratios(results),
        "timing": f"median of {args.repeats} interleaved rounds (order rotating) after {args.warmup} warm-up rounds",
        "notes": notes,
        "peak_mem_note": "CUDA allocator peak" if device.type == "cuda" else "process RSS peak (sampled)",
        "parity_rule": rule,
        "engine": engine_info,
        "results": results,
    }


def _gemm_profiles(args, device: torch.device, calls: dict) -> tuple[dict, str | None]:
    """{mode: GEMM FLOPs, time, GFLOP/s and fraction of this CPU's peak} from one profiled forward
    of each model row (CPU inference only), and a note when it was not measured."""
    if args.no_gemm_profile:
        return {}, None
    if device.type != "cpu":
        return {}, None
    if args.backward:
        return {}, "GEMM rates: measured for inference only"
    from fastseg import cpu_gemm

    peak = cpu_gemm.peak(args.dtype)
    out = {name: cpu_gemm.against_peak(cpu_gemm.profile_gemms(fn), peak) for name, fn in calls.items()}
    if peak is None:
        return out, f"GEMM rates: no {args.dtype} GEMM peak for this CPU"
    return out, None


def peer_ratios(results: list[dict]) -> dict:
    """``{"fused vs OpenVINO (HF ONNX)": x, "fused vs OpenVINO (fastseg ONNX)": y, ...}``: how many
    times faster fused is than each runtime on each ONNX file (rows named ``<runtime> on <graph> ONNX``)."""
    out = {}
    for r in results:
        runtime, on, graph = r["mode"].partition(" on ")
        if on and graph.endswith(" ONNX"):
            out[f"fused vs {runtime} ({graph})"] = r["fused_speedup_over"]
    return out


def gemm_lines(record: dict) -> list[str]:
    """What the GEMM column means and the peak it is measured against."""
    rows = [r for r in record["results"] if r.get("gemm", {}).get("gflops")]
    if not rows:
        return []
    g = rows[0]["gemm"]
    peak = (f"{g['peak_gflops']:.3g} GFLOP/s ({g['peak_impl']}, this CPU's best {record['config']['dtype']} GEMM on "
            f"a large shape; `python benchmarks/gemm_peak.py` for the table)" if g.get("peak_gflops") else "not measured")
    share = ", ".join(f"{r['mode']} {100 * r['gemm']['share_of_forward']:.0f}%" for r in rows
                      if r["gemm"].get("share_of_forward"))
    return [f"GEMM GFLOP/s: the linear-layer GEMMs (addmm, mm, oneDNN linear) of one profiled forward, FLOPs "
            f"from their shapes over their wall time; peak {peak}; GEMM share of the profiled forward: {share}"]


def _gemm_cell(r: dict) -> str:
    g = r.get("gemm")
    if not g or not g.get("gflops"):
        return "–"
    frac = f" ({100 * g['frac_of_peak']:.0f}%)" if g.get("frac_of_peak") else ""
    return f"{g['gflops']:.3g}{frac}"


def table(record: dict) -> str:
    low = record["config"]["dtype"] != "fp32"
    vs = "vs fp32 gold" if low else "vs eager"
    gemm = any("gemm" in r for r in record["results"])
    lines = [f"| mode | median ms | images/s | speedup over eager | fused speedup over it | max rel err {vs} | "
             f"RMS rel err {vs} | argmax agree {vs} | parity | peak mem MB |"
             + (" GEMM GFLOP/s (% of peak) |" if gemm else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|" + ("---:|" if gemm else "")]
    for r in record["results"]:
        verdict = {True: "ok", False: "FAILED", None: "not judged"}[r.get("parity", True)]
        over = r.get("fused_speedup_over")
        lines.append(f"| {r['mode']} | {r['median_ms']:.2f} | {r['images_per_s']:.2f} | {r['speedup']:.2f}x | "
                     f"{'–' if over is None else f'{over:.2f}x'} | "
                     f"{r['max_rel_err']:.1e} | {r.get('rms_rel_err', float('nan')):.1e} | "
                     f"{100 * r['argmax_agreement']:.3f}% | {verdict} | {r['peak_mem_mb']:.0f} |"
                     + (f" {_gemm_cell(r)} |" if gemm else ""))
    return "\n".join(lines)


def _stem(record: dict) -> str:
    c = record["config"]
    when = record["date"][:19].replace(":", "").replace("-", "")
    from fastseg.io import file_slug

    dev = file_slug(record["device"]["name"])
    kind = "train" if c["pass"] != "forward" else "fwd"
    return f"{when}_{dev}_{c['variant'] or 'custom'}_{c['height']}x{c['width']}_b{c['batch']}_{c['dtype']}_{kind}"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["mode"] for r in record["results"]]
    ms = [r["median_ms"] for r in record["results"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names)), 3.6))
    palette = {"eager": "#888888", "fused": "#2a7ab0", "compile": "#d08c2a"}
    bars = ax.bar(names, ms, color=[palette.get(n, "#6a9a48") for n in names])
    if len(names) > 3:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
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
          f"- CPU: {cpu_info.short(record['cpu'])}" if "cpu" in record else "- CPU: not recorded",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
          f"- date: {record['date']}", f"- command: `{record['command']}`",
          "- fused backends: " + ", ".join(f"{k}={v}" for k, v in record["backends"].items()),
          f"- peak memory: {record['peak_mem_note']}"]
    if "parity_rule" in record:
        md.append(f"- parity: {record['parity_rule']}")
    for name, seconds in (record.get("compile_times_s") or {"compile": record["compile_s"]}).items():
        if seconds is not None:
            md.append(f"- torch.compile time of {name!r} (excluded from timings): {seconds:.1f} s")
    if "timing" in record:
        md.append(f"- timing: {record['timing']}")
    md += [f"- note: {n}" for n in record.get("notes", [])]
    if record.get("engine"):
        md.append(f"- {engine_line(record['engine'])}")
    md += [f"- {line}" for line in gemm_lines(record)]
    md += [f"- {k}: {v:.2f}x" for k, v in record.get("peer_ratios", {}).items()]
    md += ["", table(record), ""]
    with atomic_write(paths["md"], "w") as f:
        f.write("\n".join(md))
    if make_plot:
        paths["png"] = out_dir / f"{stem}.png"
        plot(record, paths["png"])
    return paths


def engine_line(info: dict) -> str:
    """What the engine row is: runtime, version, precision, where it came from."""
    text = (f"engine row '{info['row']}': {info['runtime']} {info['runtime_version']} {info['precision']} from "
            f"{info['source']} ({info['folder']})")
    if info.get("calibration"):
        text += f", int8 calibrated on {info['calibration']}"
    return text


# Records written before they carried the CPU: what the benchmarks README's notes say of them.
_UNRECORDED_CPUS = {"Intel(R) Xeon(R) Processor": "Intel Xeon with AVX512-BF16 + AMX (from the run notes)"}


def _cpu_cell(rec: dict) -> str:
    name = rec["device"]["name"]
    if rec["device"].get("type") == "cuda" or not name.startswith("CPU "):
        return "–"
    if "cpu" in rec:
        return cpu_info.short(rec["cpu"])
    model = name[4:].split(" (")[0]
    return _UNRECORDED_CPUS.get(model, f"{model} (ISA not recorded)")


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
    rows = ["| device | CPU | model | input | dtype | pass | eager ms | fused ms | speedup | compile ms | date | file |",
            "|---|---|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for (device, variant, h, w, b, dtype, kind), (rec, path) in sorted(newest.items()):
        by = {r["mode"]: r for r in rec["results"]}
        comp = f"{by['compile']['median_ms']:.1f}" if "compile" in by else "–"
        rows.append(f"| {device} | {_cpu_cell(rec)} | SegFormer-{variant} | {h}x{w} b{b} | {dtype} | {kind} | "
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
    p.add_argument("--compile-fused", action="store_true",
                   help="add torch.compile of the fused model (row 'fused compile'; compile time excluded)")
    p.add_argument("--backward", action="store_true", help="time forward + backward (a training step) instead of inference")
    p.add_argument("--peers", action="store_true",
                   help="add HF eager (+ compile), HF's ONNX and fastseg's ONNX in ONNX Runtime and OpenVINO, on the "
                        "same random-init HF weights (CPU, inference; needs fastseg[bench])")
    p.add_argument("--no-gemm-profile", action="store_true",
                   help="skip the one profiled forward per model row that reports GEMM GFLOP/s against this CPU's "
                        "peak (the peak is measured once per CPU and torch version and cached)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON/Markdown/PNG results")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from fastseg import bench_engine

    bench_engine.add_arguments(p)


def main(args) -> int:
    if min(args.height, args.width) < 32 or args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("fastseg bench: need height, width >= 32, batch >= 1, repeats >= 1, warmup >= 0")
    record = run(args)
    c = record["config"]
    print(f"\nSegFormer-{c['variant']} {c['height']}x{c['width']} batch {c['batch']} {c['dtype']} {c['pass']} "
          f"on {record['device']['name']}")
    print(f"CPU: {cpu_info.short(record['cpu'])}")
    print("fused backends: " + ", ".join(f"{k}={v}" for k, v in record["backends"].items()))
    for name, seconds in record["compile_times_s"].items():
        print(f"torch.compile of {name!r} took {seconds:.1f} s (not in the timings)")
    print(table(record))
    print(f"parity: {record['parity_rule']}")
    print(f"timing: {record['timing']}")
    for n in record["notes"]:
        print(f"note: {n}")
    if record["engine"]:
        print(engine_line(record["engine"]))
    for line in gemm_lines(record):
        print(line)
    if record["peer_ratios"]:
        print("; ".join(f"{k}: {v:.2f}x" for k, v in record["peer_ratios"].items()))
    out_dir = Path(args.out)
    paths = write(record, out_dir, make_plot=not args.no_plot)
    update_summary(out_dir.parent / "README.md", out_dir)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    bad = [f"{r['mode']} ({r['parity_note']})" for r in record["results"] if r["parity"] is False]
    if bad:
        print(f"PARITY FAILED for: {'; '.join(bad)}")
        return 1
    return 0
