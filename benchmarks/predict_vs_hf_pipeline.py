"""``fastseg predict`` against HuggingFace's ``pipeline("image-segmentation")``: a folder of JPEGs to
full-resolution PNG masks, on CPU, in images/s.

    python benchmarks/predict_vs_hf_pipeline.py                    # 24 JPEGs 640x480, b0, 150 classes
    python benchmarks/predict_vs_hf_pipeline.py --images 48 --image-size 512x512 --repeats 5

Same weights: one random-init ``SegformerForSemanticSegmentation`` with the b0 config and 150
classes, saved with ``save_pretrained``; both sides load that folder. Same images: generated JPEGs
(textured random scenes). Each side, per run, from the weights folder and the images to one PNG per
image holding the full-resolution label map in palette colours:

- HF: ``pipeline("image-segmentation", model=DIR, image_processor=SegformerImageProcessor(size
  512x512))`` on CPU, one call per image (the pipeline returns one binary mask per class present:
  they are put back together into the label map, coloured with the same palette and saved);
- fastseg: ``predict_main`` called in-process with ``--test-scale 512x512 --mode whole``, workers and
  write threads at their defaults.

Both run with ``torch.set_num_threads(--threads)`` (2). Runs are interleaved (fastseg, HF, fastseg,
HF, ...) after one warm-up run each; the medians of the repeats give images/s, "end to end" from
loading the weights to the last PNG, and "steady" without the loading (HF: after the pipeline is
built; fastseg: the ``wall_s`` of its ``--timing-json``). Note the work differs in one way the
tools decide: HF's processor resizes every image to 512x512 (aspect not kept), fastseg's test
scale keeps the aspect (640x480 → 512x384); ``--image-size 512x512`` makes both run 512². Random
weights give near-tied logits, so a random model's masks hold more classes than a trained one's;
HF's per-class masks cost more with more classes (the mean count is recorded).

Writes JSON + Markdown to ``benchmarks/results/`` named for the date and the CPU.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def generate_images(folder: Path, count: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """Textured scenes: smooth colour gradients, discs and stripes with noise, saved as JPEG q90."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(count):
        base = rng.uniform(40, 200, 3) + rng.uniform(-60, 60, (2, 3))[0] * (ys / height)[..., None] \
            + rng.uniform(-60, 60, 3) * (xs / width)[..., None]
        img = base + 25 * np.sin(xs[..., None] * rng.uniform(0.02, 0.2, 3) + ys[..., None] * rng.uniform(0.02, 0.2, 3))
        for _ in range(int(rng.integers(3, 8))):
            cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.05, 0.3) * min(width, height)
            img[(ys - cy) ** 2 + (xs - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 12, img.shape)
        path = folder / f"img_{i:04d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def run_hf(model_dir: Path, paths: list[Path], out: Path, palette: np.ndarray) -> dict:
    from PIL import Image
    from transformers import SegformerImageProcessor, pipeline

    from fastseg.data import colorize

    t0 = time.perf_counter()
    pipe = pipeline("image-segmentation", model=str(model_dir), device=-1,
                    image_processor=SegformerImageProcessor(size={"height": 512, "width": 512}))
    label2id = pipe.model.config.label2id
    t1 = time.perf_counter()
    out.mkdir(parents=True)
    classes = []
    for path in paths:
        segments = pipe(str(path))
        first = np.asarray(segments[0]["mask"])
        labels = np.zeros(first.shape, np.uint8)
        for seg in segments:
            labels[np.asarray(seg["mask"]) > 0] = label2id[seg["label"]]
        classes.append(len(segments))
        Image.fromarray(colorize(labels, palette)).save(out / f"{path.stem}.png")
    t2 = time.perf_counter()
    return {"total_s": t2 - t0, "steady_s": t2 - t1, "classes_per_image": statistics.mean(classes)}


def run_fastseg(model_dir: Path, folder: Path, out: Path, timing_json: Path) -> dict:
    from fastseg import predict

    p = argparse.ArgumentParser()
    predict.add_predict_arguments(p)
    args = p.parse_args([str(folder), "--checkpoint", str(model_dir), "--out", str(out), "--test-scale", "512x512",
                         "--mode", "whole", "--palette", "ade20k", "--quiet", "--timing-json", str(timing_json)])
    t0 = time.perf_counter()
    rc = predict.predict_main(args)
    total = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"fastseg predict failed (exit code {rc})")
    timing = json.loads(timing_json.read_text())
    return {"total_s": total, "steady_s": timing["wall_s"], "timing": timing}


def check_outputs(paths: list[Path], out: Path) -> None:
    """Every image got a PNG of its own full size."""
    from PIL import Image

    for path in paths:
        with Image.open(path) as src, Image.open(out / f"{path.stem}.png") as mask:
            if mask.size != src.size:
                raise AssertionError(f"{out / path.stem}.png is {mask.size}, its image {src.size}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--image-size", default="640x480", help="WxH of the generated JPEGs")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both sides")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--note", default="", help="recorded with the results (e.g. 'machine under load')")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    torch.set_num_threads(args.threads)

    import transformers

    import fastseg
    from fastseg import SegFormerConfig, cpu_info, peers
    from fastseg.data.palettes import PALETTES

    palette = PALETTES["ade20k"]
    with tempfile.TemporaryDirectory(prefix="predict_vs_hf_") as tmp:
        tmp = Path(tmp)
        peers.hf_model(SegFormerConfig.from_variant("b0", num_classes=150)).save_pretrained(tmp / "model")
        paths = generate_images(tmp / "images", args.images, width, height)
        sides = {"fastseg predict": lambda out: run_fastseg(tmp / "model", tmp / "images", out, tmp / "timing.json"),
                 "HF pipeline": lambda out: run_hf(tmp / "model", paths, out, palette)}
        runs = {name: [] for name in sides}
        for r in range(args.repeats + 1):  # run 0: warm-up
            for name, fn in sides.items():
                out = tmp / "out"
                shutil.rmtree(out, ignore_errors=True)
                result = fn(out)
                check_outputs(paths, out)
                if r > 0:
                    runs[name].append(result)
                print(f"{'warm-up' if r == 0 else f'run {r}'}: {name:16s} {result['total_s']:7.2f} s end to end, "
                      f"{result['steady_s']:7.2f} s steady", file=sys.stderr)
    n = args.images
    rates = {name: {"end_to_end": n / statistics.median(x["total_s"] for x in rs),
                    "steady": n / statistics.median(x["steady_s"] for x in rs)} for name, rs in runs.items()}
    ratio = {k: rates["fastseg predict"][k] / rates["HF pipeline"][k] for k in ("end_to_end", "steady")}
    last_timing = runs["fastseg predict"][-1]["timing"]
    cpu = cpu_info.record()
    record = {
        "schema": "fastseg-predict-vs-hf-pipeline/1",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/predict_vs_hf_pipeline.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "note": args.note, "cpu": cpu,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "fastseg": fastseg.__version__, "python": sys.version.split()[0]},
        "config": {"model": "SegFormer-b0, 150 classes, random init (HF save_pretrained folder)",
                   "images": n, "image_size": [width, height], "threads": args.threads, "repeats": args.repeats,
                   "hf": "pipeline('image-segmentation'), SegformerImageProcessor(size 512x512), one call per image, "
                         "per-class masks → label map → palette PNG",
                   "fastseg": "predict_main: --test-scale 512x512 --mode whole, default workers and write threads"},
        "images_per_s": rates, "speedup": ratio,
        "hf_classes_per_image": statistics.mean(x["classes_per_image"] for x in runs["HF pipeline"]),
        "fastseg_stage_timing_last_run": last_timing,
        "runs": {name: [{k: v for k, v in x.items() if k != "timing"} for x in rs] for name, rs in runs.items()},
    }
    lines = ["| side | images/s end to end | images/s steady |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['end_to_end']:.2f} | {r['steady']:.2f} |" for name, r in rates.items()]
    lines.append(f"| fastseg / HF | {ratio['end_to_end']:.2f}× | {ratio['steady']:.2f}× |")
    from fastseg.stage_timing import format_table

    table = "\n".join(lines)
    print(f"\nSegFormer-b0 150 classes, {n} JPEGs {width}x{height} → PNG masks, {args.threads} threads, "
          f"median of {args.repeats}; CPU: {cpu_info.short(cpu)}")
    print(table)
    print("\nfastseg predict, last run, by stage:\n" + format_table(last_timing))
    from fastseg.io import file_slug, save_result

    stem = (record["date"][:19].replace(":", "").replace("-", "") + "_" + file_slug(cpu["label"])
            + "_predict_vs_hf_pipeline")
    md = [f"# fastseg predict vs HF pipeline: SegFormer-b0 (150 classes), {n} JPEGs {width}x{height} → PNG masks", "",
          f"- CPU: {cpu_info.short(cpu)}", f"- date: {record['date']}", f"- command: `{record['command']}`",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
          f"- timing: median of {args.repeats} interleaved runs after one warm-up each; {args.threads} torch threads",
          f"- HF: {record['config']['hf']}; {record['hf_classes_per_image']:.1f} classes per image (random weights)",
          f"- fastseg: {record['config']['fastseg']}"] + ([f"- note: {args.note}"] if args.note else []) + [
          "", table, "", "fastseg predict, last run, by stage:", "", "```", format_table(last_timing), "```", ""]
    save_result(args.out / stem, record, md)
    print(f"\nwrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
