"""``fastseg predict``: colourised masks (and overlays, label PNGs) for image files and folders.

::

    fastseg predict --checkpoint ckpt.pth img1.jpg folder/ --out masks/ --palette ade20k --overlay 0.5
    fastseg predict folder/ --checkpoint ckpt.pth --timing --timing-json timing.json
    torchrun --nproc_per_node 4 -m fastseg predict folder/ --checkpoint ckpt.pth --out masks/

writes ``<stem>.png`` (the class map in palette colours) for each image, and ``<stem>_overlay.png``
(mask blended over the image) with ``--overlay ALPHA``, ``<stem>_labels.png`` with
``--save-labels``.

The pipeline: images are decoded and resized in DataLoader workers (``--workers``) while the
model runs on the main thread; ``--batch N`` runs up to N images of one size together; the labels
are colourised, PNG-encoded and written by background threads (``--write-threads``,
:class:`fastseg.mask_writer.MaskWriter`) with a bounded queue, so the forward is not held up by the
codec and memory stays bounded. Every file is written atomically (a temporary file in the output
folder, then a rename; the umask's mode). ``--timing`` prints where the time went per stage
(decode, resize + normalize, forward, labels, encode: :mod:`fastseg.stage_timing`) and images/s end
to end; ``--timing-json PATH`` writes the same as JSON.

Output names: an input's outputs are named by its stem only, so two inputs that would write the
same file — ``a/x.jpg`` and ``b/x.png`` (both ``x.png``), names that differ only in case (one file
on case-insensitive filesystems), or ``x.jpg`` with ``--overlay`` beside an input ``x_overlay.jpg`` —
are refused before anything runs, with one line naming both; so is an output that would overwrite
one of the inputs (``--out`` the input folder holding ``x.png``). The same file given twice (a
folder and a file in it) runs once. Rename one, or run them into separate ``--out`` folders.

An image that cannot be processed — unreadable, not an image file (a folder entry named like one),
whose logits hold NaN / Inf (no mask is written for it: it would be a confident mask made from
NaN), or whose files cannot be written — is skipped with a warning naming it, the others are
written, and the exit code is 1 when any failed (all listed at the end). Images are read as viewers
show them (EXIF orientation, 16-bit >> 8; :func:`fastseg.data.read_image`; ``--no-exif``). The model
runs fused unless ``--no-fused``. Memory is bounded by the window: images stay uint8 until a window
runs, labels come from the fused upsample + argmax or the streamed sliding window
(:func:`fastseg.inference.segment_labels`) in uint8 for up to 256 classes.

Under ``torchrun`` (as ``fastseg eval``) each rank takes every world-th image of the input list,
so each mask is written by exactly one rank; only rank 0 shows progress; the failures and counts
are gathered, so every rank exits with the same code and rank 0 prints the whole failure list,
"wrote N mask(s)" for all ranks, and the timing of all ranks (stage totals summed, wall time the
slowest rank's).

``add_predict_arguments(parser)`` and ``predict_main(args) -> int`` are the command;
``python -m fastseg.predict …`` runs it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fastseg.evaluate import (
    _gathered,
    _init_distributed_from_env,
    add_engine_arguments,
    add_exif_argument,
    add_inference_arguments,
    apply_fused,
    autocast,
    inference_settings,
    model_from_args,
    pick_device,
)
from fastseg.mask_writer import LABEL_PNG_8BIT_MAX, MaskWriter, output_names, save_label_png  # noqa: F401 (kept importable here)

NON_FINITE = "non-finite logits (NaN or Inf): no mask written"


def add_predict_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    p.add_argument("--checkpoint", default=None, help="as for eval (or --engine DIR)")
    p.add_argument("--model", default=None, help="setr-… to load a SETR checkpoint")
    p.add_argument("--out", default="predictions", help="output folder")
    p.add_argument("--palette", default="auto",
                   help="ade20k, cityscapes or generated (default: the checkpoint's dataset, else generated)")
    p.add_argument("--overlay", type=float, default=None, metavar="ALPHA",
                   help="also write <stem>_overlay.png: ALPHA * mask colours + (1 - ALPHA) * image")
    p.add_argument("--save-labels", action="store_true",
                   help="also write <stem>_labels.png: class ids, 8-bit (mode L), or 16-bit (mode I;16) when the "
                        "model has more than 256 classes")
    p.add_argument("--batch", type=int, default=1,
                   help="images per forward pass; only images of one size are batched together (never padded)")
    p.add_argument("--workers", type=int, default=2, help="background image-decoding workers (0: none)")
    p.add_argument("--write-threads", type=int, default=2,
                   help="background threads that colourise, PNG-encode and write the outputs")
    p.add_argument("--dataset-recipe", default=None, choices=["ade20k", "cityscapes"],
                   help="use this dataset's test scale and mode defaults")
    p.add_argument("--timing", action="store_true",
                   help="print the time of each stage (decode, resize + normalize, forward, labels, encode) "
                        "and images/s end to end")
    p.add_argument("--timing-json", metavar="PATH", default=None, help="write the stage timing as JSON")
    add_exif_argument(p)
    add_engine_arguments(p)
    add_inference_arguments(p)
    p.add_argument("--quiet", action="store_true")


def collect_images(inputs) -> list[Path]:
    """The files to run: each file given, and every entry of each folder given whose name has an
    image suffix (sorted) — a subfolder or other non-file named like an image included, so that it
    is reported as a failure rather than skipped silently. Other names in a folder are ignored. The
    same file reached twice (a folder and a file in it) is kept once, where it first appears."""
    from fastseg.data.datasets import IMAGE_SUFFIXES

    files, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            missing.append(str(path))
    if missing:
        raise FileNotFoundError(f"input(s) not found: {', '.join(missing)}")
    seen, unique = set(), []
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def check_output_names(files, out_dir: Path, overlay: bool, save_labels: bool) -> None:
    """Raise ``ValueError`` (one line, naming both inputs) when two inputs would write the same
    output file — names compared case-insensitively, as some filesystems do — or when an output
    would overwrite one of the inputs."""
    owner, clashes = {}, []
    inputs = {p.resolve(): p for p in files}
    out_dir = Path(out_dir)
    for path in files:
        for name in output_names(path.stem, overlay, save_labels):
            first = owner.setdefault(name.casefold(), path)
            if first is not path:
                clashes.append((first, path, name))
            hit = inputs.get((out_dir / name).resolve())
            if hit is not None:
                raise ValueError(f"the output {out_dir / name} (of {path}) would overwrite the input {hit}; "
                                 "choose another --out folder")
    if clashes:
        a, b, name = clashes[0]
        more = f" (and {len(clashes) - 1} more clash(es))" if len(clashes) > 1 else ""
        raise ValueError(f"inputs {a} and {b} would both write {out_dir / name}{more}: outputs are named by the "
                         "input's stem; rename one, or run them with separate --out folders")


class PredictImages(torch.utils.data.Dataset):
    """Image files decoded and test-transformed (in DataLoader workers):
    ``(position, x, image, error, (decode_s, resize_s))``, x: (3, h, w) uint8 at the test scale (a view
    of ``image`` when not resized). An unreadable file gives x = image = None and the error text
    instead of raising, so one bad file never stops the loader. The seconds are measured here, in
    the worker, and travel back with the sample."""

    def __init__(self, files, transform, exif: bool = True):
        self.files, self.transform, self.exif = list(files), transform, exif

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from fastseg.data import read_image

        t0 = time.perf_counter()
        try:
            image = read_image(self.files[index], exif=self.exif)
            t1 = time.perf_counter()
            x, _ = self.transform(image)
            return index, x, image, None, (t1 - t0, time.perf_counter() - t1)
        except Exception as e:  # noqa: BLE001 - reported per file by predict_main
            return index, None, None, str(e) or type(e).__name__, (time.perf_counter() - t0, 0.0)


def _as_is(sample):
    return sample  # keep numpy images as they are (the default would convert them to tensors)


def _time_forward(model, timing, sync):
    """Hooks that add the model's forward time to ``timing`` (``sync``: wait for the device first)."""
    start = [0.0]

    def before(module, inputs):
        if sync:
            sync()
        start[0] = time.perf_counter()

    def after(module, inputs, output):
        if sync:
            sync()
        timing.add("forward", time.perf_counter() - start[0], images=0)

    return [model.register_forward_pre_hook(before), model.register_forward_hook(after)]


def predict_main(args) -> int:
    """Masks for every readable image; unreadable ones are skipped with a warning naming the file,
    and the exit code is 1 if any image failed (all failures listed at the end). Under torchrun
    each rank runs its share of the images (module docstring)."""
    import torch.distributed as dist

    joined = dist.is_available() and dist.is_initialized()  # a caller's process group: left as it is
    rank, world, local_rank = _init_distributed_from_env(args.device)
    try:
        return _predict(args, rank, world, local_rank)
    finally:
        if world > 1 and not joined and dist.is_initialized():
            dist.destroy_process_group()


def _predict(args, rank: int, world: int, local_rank: int) -> int:
    from tqdm import tqdm

    from fastseg.data import TestTransform, generated_palette, palette_for
    from fastseg.data.palettes import PALETTES
    from fastseg.evaluate import write_json
    from fastseg.inference import model_input, segment_labels
    from fastseg.io import recover
    from fastseg.stage_timing import StageTimes, format_table

    t_begin = time.perf_counter()
    if args.overlay is not None and not 0.0 <= args.overlay <= 1.0:
        raise ValueError(f"--overlay must be in [0, 1], got {args.overlay}")
    batch = getattr(args, "batch", 1)
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    write_threads = getattr(args, "write_threads", 2)
    if write_threads < 1:
        raise ValueError(f"--write-threads must be >= 1, got {write_threads}")
    timing_on = bool(getattr(args, "timing", False) or getattr(args, "timing_json", None))
    out_dir = Path(args.out)
    files = collect_images(args.inputs)
    check_output_names(files, out_dir, args.overlay is not None, args.save_labels)
    device = pick_device(args.device, local_rank)
    model, info = model_from_args(args)
    args.fused = apply_fused(model, args.fused)
    model.to(device).eval()
    num_classes = getattr(model, "num_classes", None)
    recipe = args.dataset_recipe or (info.get("dataset") if info.get("dataset") in ("ade20k", "cityscapes") else None)
    settings = inference_settings(args, recipe)
    palette_name = info.get("dataset") if args.palette == "auto" else args.palette
    if args.palette not in ("auto", "generated") and args.palette not in PALETTES:
        raise ValueError(f"unknown palette {args.palette!r}; choose ade20k, cityscapes, generated or auto")
    if (args.palette in PALETTES and num_classes is not None and num_classes != len(PALETTES[args.palette])):
        raise ValueError(f"the {args.palette} palette has {len(PALETTES[args.palette])} colours but the model "
                         f"predicts {num_classes} classes")
    # decided before any image, the same on every rank (a generated colour does not depend on the count)
    k = num_classes or LABEL_PNG_8BIT_MAX
    palette = palette_for(palette_name, k) if palette_name != "generated" else generated_palette(k)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        recover(out_dir)  # temporary files of a killed earlier run (each file below skips the folder scan)
        if args.save_labels and num_classes is not None and num_classes > LABEL_PNG_8BIT_MAX:
            print(f"--save-labels: the model has {num_classes} classes (> {LABEL_PNG_8BIT_MAX}), so the label PNGs "
                  "are 16-bit (mode I;16)", file=sys.stderr)
    if world > 1:
        torch.distributed.barrier()  # no rank writes before rank 0 has cleaned the folder
    share = list(range(rank, len(files), world))  # indices into files: every world-th image
    mine = [files[i] for i in share]
    workers = max(0, min(getattr(args, "workers", 2), len(mine)))
    images = PredictImages(mine, TestTransform(settings["test_scale"], normalized=False), args.exif)
    loader = torch.utils.data.DataLoader(images, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                         prefetch_factor=max(2, batch) if workers else None)
    timing = StageTimes(count=len(mine))
    sync = (lambda: torch.cuda.synchronize(device)) if timing_on and device.type == "cuda" else None
    written, failures = 0, []  # failures: (index into files, path text, reason)
    groups: dict[tuple, list] = {}  # images of one (transformed, original) size, waiting for a batch
    progress = tqdm(total=len(mine), desc="predict", unit="img", disable=args.quiet or rank != 0, file=sys.stderr)
    writer = MaskWriter(out_dir, palette, overlay_alpha=args.overlay, save_labels=args.save_labels,
                        num_classes=num_classes, threads=write_threads)
    load_s = time.perf_counter() - t_begin

    def fail(pos: int, error: str) -> None:
        failures.append((share[pos], str(mine[pos]), error))
        message = f"fastseg predict: skipping {mine[pos]}: {error}"
        if args.quiet:
            print(message, file=sys.stderr)
        else:
            progress.write(message, file=sys.stderr)

    def collect(done) -> None:
        nonlocal written
        for pos, seconds, error in done:
            timing.add("encode", seconds)
            if error is None:
                written += 1
            else:
                fail(pos, error)
            progress.update(1)

    def run(key) -> None:
        items = groups.pop(key)
        t0 = time.perf_counter()
        try:
            # uint8 pixels; whole mode normalises the image here (slide: one window at a time, in labels)
            x = items[0][1][None] if len(items) == 1 else torch.stack([item[1] for item in items])
            x = x.to(device)
            if settings["mode"] == "whole":
                x = model_input(x)
            if sync:
                sync()
            t1 = time.perf_counter()
            timing.add("resize", t1 - t0, len(items))
            forward_before = timing.seconds["forward"]
            with torch.no_grad(), autocast(device, args.amp):
                labels, finite = segment_labels(model, x, mode=settings["mode"], crop=settings["crop"],
                                                stride=settings["stride"], scales=settings["scales"],
                                                flip=settings["flip"], out_size=items[0][2].shape[:2],
                                                two_step=settings["two_step"], return_finite=True)
            del x
            labels, finite = labels.cpu().numpy(), finite.tolist()
            timing.add("forward", 0.0, len(items))
            timing.add("labels", time.perf_counter() - t1 - (timing.seconds["forward"] - forward_before), len(items))
        except Exception as e:  # noqa: BLE001 - e.g. an image too small for the model: skip it, go on
            for pos, _, _ in items:
                fail(pos, f"inference failed ({type(e).__name__}: {e})")
            progress.update(len(items))
            return
        for (pos, _, image), lab, ok in zip(items, labels, finite):
            if not ok:  # its labels would be a confident mask made from NaN/Inf: write none
                fail(pos, NON_FINITE)
                progress.update(1)
                continue
            timing.wait("output", writer.submit(pos, mine[pos].stem, lab, image if args.overlay is not None else None))
        collect(writer.finished())

    hooks = _time_forward(model, timing, sync) if timing_on else []  # off: no per-forward calls at all
    timing.start()
    try:
        samples = iter(loader)
        while True:
            t0 = time.perf_counter()
            sample = next(samples, None)
            timing.wait("input", time.perf_counter() - t0)
            if sample is None:
                break
            pos, x, image, error, (decode_s, resize_s) = sample
            timing.add("decode", decode_s)
            if error is not None:
                fail(pos, error)
                progress.update(1)
                continue
            timing.add("resize", resize_s, images=0)  # counted once per image, in run()
            key = (tuple(x.shape), image.shape[:2])
            groups.setdefault(key, []).append((pos, x, image))
            if len(groups[key]) >= batch:
                run(key)
        for key in list(groups):
            run(key)
        collect(writer.close())
    except BaseException:
        writer.close(cancel=True)
        raise
    finally:
        for hook in hooks:
            hook.remove()
        progress.close()
    timing.stop()

    written_all = sum(_gathered([written], world))
    failures_all = sorted(_gathered(failures, world))
    if timing_on:
        timing_all = StageTimes.merged(_gathered([timing.as_dict()], world))
    if rank == 0:
        if timing_on:
            from fastseg.timing import device_name

            record = timing_all.record(
                world_size=world, device=device_name(device), torch_threads=torch.get_num_threads(),
                workers=workers, write_threads=write_threads, batch=batch, mode=settings["mode"],
                test_scale=settings["test_scale"], failed=len(failures_all), setup_s=load_s,
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            if args.timing:
                print(format_table(record))
            if args.timing_json:
                write_json(record, Path(args.timing_json))
        print(f"wrote {written_all} mask(s) to {out_dir}")
        if failures_all:
            print(f"fastseg predict: {len(failures_all)} of {len(files)} image(s) failed:", file=sys.stderr)
            for _, path, error in failures_all:
                print(f"  {path}: {error}", file=sys.stderr)
    if world > 1:  # torchrun stops the other ranks when one exits non-zero: rank 0 has printed everything first
        sys.stdout.flush()
        sys.stderr.flush()
        torch.distributed.barrier()
    return 1 if failures_all else 0


def _cli(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastseg.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_predict_arguments(parser)
    return predict_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_cli())
