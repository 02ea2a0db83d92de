"""Peak memory of ``fastseg predict`` on one large image: fused labels vs the two-step path.

    python benchmarks/memory_benchmark.py                                  # b0 and b2, K = 19 and 150
    python benchmarks/memory_benchmark.py --variants b5 --classes 150 --modes whole
    python benchmarks/memory_benchmark.py --variants b2 --classes 150 --paths fused   # + the large rows
    python benchmarks/memory_benchmark.py --large none                     # 2048×1024 only

Besides the sweep at ``--width``×``--height``, the ``--large`` rows run slide mode (crop and
stride as below) with b0, K = 19, fused, on 6000×4000 and 10000×10000 JPEGs (the photo sizes the
memory goals name: ≤ 1000 MB at 6000×4000; 10000×10000 must run).

Each configuration runs ``fastseg predict`` (the real command: decode the PNG, forward,
labels, write the mask) in a fresh Python process on a generated ``--width``×``--height`` image
with a randomly initialised SegFormer saved with ``save_pretrained`` (weights do not change
memory or time), and reports that process's peak RSS (``resource.getrusage(RUSAGE_SELF)
.ru_maxrss``), its RSS after loading the model (the baseline: torch, the weights), and the
wall time of the predict call. ``--workers 0``: decoding runs in the measured process, so no
memory hides in a worker. With CUDA (``--device cuda``) it also reports
``torch.cuda.max_memory_allocated``. A benchmark, not a test: nothing is asserted.

Paths: ``fused`` = the default (``segment_labels``: the fused upsample + argmax, or banded
evaluation for slide); ``two-step`` = ``--two-step`` (the previous implementation: logits
upsampled to full resolution, softmax, argmax). Both run the fused forward (``--fused``).
Slide: ``--crop`` / ``--stride`` (default 1024×1024 / 768×768, the Cityscapes recipe).

Writes ``benchmarks/results/<date>_memory_<device>.json`` and ``.md``, with the CPU's identity
(vendor, family / model, the ISA torch dispatches to): peak memory is valid under load, times
are not.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"]) if args["threads"] else None
from fastseg import SegFormer
from fastseg import predict
SegFormer.from_pretrained  # import the model code before the baseline
import PIL.Image
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
p = argparse = __import__("argparse").ArgumentParser()
predict.add_predict_arguments(p)
cli = [args["image"], "--checkpoint", args["model"], "--out", args["out"], "--fused", "--quiet", "--workers", "0",
       "--device", args["device"], "--palette", "generated"]
if args["mode"] == "slide":
    cli += ["--mode", "slide", "--crop", args["crop"], "--stride", args["stride"]]
if args["path"] == "two-step":
    cli += ["--two-step"]
ns = p.parse_args(cli)
# the baseline: the model loaded (what predict_main does first), before any image
from fastseg.inference import load_model
m, _ = load_model(args["model"]); del m
base = rss_mb()
if args["device"].startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
rc = predict.predict_main(ns)
seconds = time.perf_counter() - t0
out = {"rc": rc, "seconds": seconds, "baseline_rss_mb": base,
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if args["device"].startswith("cuda"):
    out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
print("RESULT " + json.dumps(out))
"""


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0).replace(" ", "-")
    from fastseg import cpu_info

    return f"CPU {cpu_info.identity()['model_name']} ({os.cpu_count()} cores)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["b0", "b2"])
    ap.add_argument("--classes", nargs="+", type=int, default=[19, 150])
    ap.add_argument("--modes", nargs="+", default=["whole", "slide"], choices=["whole", "slide"])
    ap.add_argument("--paths", nargs="+", default=["fused", "two-step"], choices=["fused", "two-step"])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--crop", default="1024x1024")
    ap.add_argument("--stride", default="768x768")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the child (0: torch's default)")
    ap.add_argument("--large", nargs="*", default=["6000x4000", "10000x10000"],
                    help="WxH images for the extra b0 / K = 19 slide rows ('none' or nothing: skip them)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    args.large = [s for s in args.large if s != "none"]

    import numpy as np
    import torch
    from PIL import Image

    from fastseg import SegFormer, cpu_info

    rows = []

    def measure(spec: dict) -> dict:
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        return json.loads(line[-1][len("RESULT "):])

    def write_image(path: Path, width: int, height: int) -> None:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = tmp / "image.png"
        write_image(image, args.width, args.height)
        size = f"{args.width}x{args.height}"
        for variant in args.variants:
            for k in args.classes:
                model_dir = tmp / f"{variant}_{k}"
                torch.manual_seed(0)
                SegFormer(variant=variant, num_classes=k).save_pretrained(model_dir)
                for mode in args.modes:
                    for path in args.paths:
                        spec = {"image": str(image), "model": str(model_dir), "out": str(tmp / "out"), "mode": mode,
                                "path": path, "crop": args.crop, "stride": args.stride, "device": args.device,
                                "threads": args.threads}
                        row = {"variant": variant, "classes": k, "image": size, "mode": mode, "path": path,
                               **measure(spec)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        if args.large:
            model_dir = tmp / "large_b0_19"
            torch.manual_seed(0)
            SegFormer(variant="b0", num_classes=19).save_pretrained(model_dir)
            for size in args.large:
                width, height = (int(v) for v in size.split("x"))
                large = tmp / f"large_{size}.jpg"
                write_image(large, width, height)
                spec = {"image": str(large), "model": str(model_dir), "out": str(tmp / "out"), "mode": "slide",
                        "path": "fused", "crop": args.crop, "stride": args.stride, "device": args.device,
                        "threads": args.threads}
                row = {"variant": "b0", "classes": 19, "image": size, "mode": "slide", "path": "fused",
                       **measure(spec)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                large.unlink()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    dev = device_name(args.device)
    record = {"schema": "fastseg-memory/2", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": dev, "load_average": os.getloadavg(),
              "torch": torch.__version__, "image": f"{args.width}x{args.height}",
              "slide": {"crop": args.crop, "stride": args.stride}, "threads": torch.get_num_threads(),
              "cpu": cpu_info.record(),
              "command": "python benchmarks/memory_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", dev.split(" (")[0].replace("(R)", "").replace("(TM)", "")).strip("-")[:40]
    (out / f"{stamp}_memory_{slug}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# fastseg predict peak memory, {dev}, torch {torch.__version__}, {record['date']}",
             "", f"`{record['command']}`", "",
             f"CPU: {cpu_info.short(record['cpu'])}; load average at the end "
             f"{', '.join(f'{v:.1f}' for v in record['load_average'])} (times vary with load, peak memory does "
             f"not). Slide: crop {args.crop}, stride {args.stride}.", "",
             "| model | K | image | mode | path | peak RSS MB | baseline RSS MB | time s |",
             "|---|---:|---|---|---|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['variant']} | {r['classes']} | {r['image']} | {r['mode']} | {r['path']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | |")
        else:
            lines.append(f"{head} {r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} | {r['seconds']:.1f} |")
    (out / f"{stamp}_memory_{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
