"""``fastseg predict``: colourised masks (and overlays, label PNGs) for image files and folders.

::

    fastseg predict --checkpoint ckpt.pth img1.jpg folder/ --out masks/ --palette ade20k --overlay 0.5

writes ``<stem>.png`` (the class map in palette colours) for each image, and ``<stem>_overlay.png``
(mask blended over the image) with ``--overlay ALPHA``. Images are decoded in DataLoader workers
(``--workers``) while the model runs; ``--batch N`` runs up to N images of one size together.
An image that cannot be processed — unreadable, not an image file (a folder entry named like one),
or whose logits hold NaN / Inf (no mask is written for it: it would be a confident mask made from
NaN) — is skipped with a warning naming it, the others are written, and the exit code is 1 when
any failed (all listed at the end). Images are read as viewers show them (EXIF orientation,
16-bit >> 8; :func:`fastseg.data.read_image`; ``--no-exif``). The model runs fused unless
``--no-fused``. Memory is bounded by the window: images stay uint8 until a window runs, labels
come from the fused upsample + argmax or the streamed sliding window
(:func:`fastseg.inference.segment_labels`) in uint8 for up to 256 classes.

``add_predict_arguments(parser)`` and ``predict_main(args) -> int`` are the command;
``python -m fastseg.predict …`` runs it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from fastseg.evaluate import (
    add_engine_arguments,
    add_exif_argument,
    add_inference_arguments,
    apply_fused,
    autocast,
    inference_settings,
    model_from_args,
    pick_device,
)


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
    p.add_argument("--dataset-recipe", default=None, choices=["ade20k", "cityscapes"],
                   help="use this dataset's test scale and mode defaults")
    add_exif_argument(p)
    add_engine_arguments(p)
    add_inference_arguments(p)
    p.add_argument("--quiet", action="store_true")


def collect_images(inputs) -> list[Path]:
    """The files to run: each file given, and every entry of each folder given whose name has an
    image suffix — a subfolder or other non-file named like an image included, so that it is
    reported as a failure rather than skipped silently. Other names in a folder are ignored."""
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
    return files


class PredictImages(torch.utils.data.Dataset):
    """Image files decoded and test-transformed (in DataLoader workers): (index, x, image, error),
    x: (3, h, w) uint8 at the test scale (a view of ``image`` when not resized).
    An unreadable file gives x = image = None and the error text instead of raising, so one bad
    file never stops the loader."""

    def __init__(self, files, transform, exif: bool = True):
        self.files, self.transform, self.exif = list(files), transform, exif

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from fastseg.data import read_image

        try:
            image = read_image(self.files[index], exif=self.exif)
            x, _ = self.transform(image)
            return index, x, image, None
        except Exception as e:  # noqa: BLE001 - reported per file by predict_main
            return index, None, None, str(e) or type(e).__name__


def _as_is(sample):
    return sample  # keep numpy images as they are (the default would convert them to tensors)


NON_FINITE = "non-finite logits (NaN or Inf): no mask written"
LABEL_PNG_8BIT_MAX = 256  # classes an 8-bit (mode L) label PNG can hold


def save_label_png(labels: np.ndarray, path: Path, num_classes: int | None) -> None:
    """Class ids as a PNG: 8-bit (mode L) for up to 256 classes, else 16-bit (mode I;16), so ids
    never wrap. Read back exactly by :func:`fastseg.data.read_label`."""
    from PIL import Image

    wide = (num_classes or 0) > LABEL_PNG_8BIT_MAX or (labels.size and int(labels.max()) >= LABEL_PNG_8BIT_MAX)
    Image.fromarray(labels.astype(np.uint16 if wide else np.uint8)).save(path)


def predict_main(args) -> int:
    """Masks for every readable image; unreadable ones are skipped with a warning naming the file,
    and the exit code is 1 if any image failed (all failures listed at the end)."""
    from PIL import Image
    from tqdm import tqdm

    from fastseg.data import TestTransform, colorize, generated_palette, overlay, palette_for
    from fastseg.data.palettes import PALETTES
    from fastseg.inference import segment_labels

    if args.overlay is not None and not 0.0 <= args.overlay <= 1.0:
        raise ValueError(f"--overlay must be in [0, 1], got {args.overlay}")
    batch = getattr(args, "batch", 1)
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    files = collect_images(args.inputs)
    device = pick_device(args.device)
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
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.save_labels and num_classes is not None and num_classes > LABEL_PNG_8BIT_MAX:
        print(f"--save-labels: the model has {num_classes} classes (> {LABEL_PNG_8BIT_MAX}), so the label PNGs "
              "are 16-bit (mode I;16)", file=sys.stderr)
    workers = max(0, min(getattr(args, "workers", 2), len(files)))
    images = PredictImages(files, TestTransform(settings["test_scale"], normalized=False), args.exif)
    loader = torch.utils.data.DataLoader(images, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                         prefetch_factor=max(2, batch) if workers else None)
    palette = None
    written, failures = [], []
    groups: dict[tuple, list] = {}  # images of one (transformed, original) size, waiting for a batch
    progress = tqdm(total=len(files), desc="predict", unit="img", disable=args.quiet, file=sys.stderr)

    def fail(path, error: str) -> None:
        failures.append((path, error))
        message = f"fastseg predict: skipping {path}: {error}"
        if args.quiet:
            print(message, file=sys.stderr)
        else:
            progress.write(message, file=sys.stderr)

    def run(key) -> None:
        nonlocal palette
        items = groups.pop(key)
        try:
            # uint8 pixels: segment_labels normalises one window (or pass) at a time
            x = items[0][1][None] if len(items) == 1 else torch.stack([item[1] for item in items])
            with torch.no_grad(), autocast(device, args.amp):
                labels, finite = segment_labels(model, x.to(device), mode=settings["mode"], crop=settings["crop"],
                                                stride=settings["stride"], scales=settings["scales"],
                                                flip=settings["flip"], out_size=items[0][2].shape[:2],
                                                two_step=settings["two_step"], return_finite=True)
            del x
            labels, finite = labels.cpu().numpy(), finite.tolist()
        except Exception as e:  # noqa: BLE001 - e.g. an image too small for the model: skip it, go on
            for index, _, _ in items:
                fail(files[index], f"inference failed ({type(e).__name__}: {e})")
            progress.update(len(items))
            return
        for (index, _, image), lab, ok in zip(items, labels, finite):
            path = files[index]
            if not ok:  # its labels would be a confident mask made from NaN/Inf: write none
                fail(path, NON_FINITE)
                progress.update(1)
                continue
            try:
                if palette is None:
                    k = num_classes or max(int(lab.max()) + 1, 1)
                    palette = palette_for(palette_name, k) if palette_name != "generated" else generated_palette(k)
                colours = colorize(lab, palette)
                Image.fromarray(colours).save(out_dir / f"{path.stem}.png")
                if args.overlay is not None:
                    Image.fromarray(overlay(image, colours, args.overlay)).save(out_dir / f"{path.stem}_overlay.png")
                del colours
                if args.save_labels:
                    save_label_png(lab, out_dir / f"{path.stem}_labels.png", num_classes)
                written.append(out_dir / f"{path.stem}.png")
            except (OSError, ValueError) as e:
                fail(path, f"could not write its outputs ({type(e).__name__}: {e})")
            progress.update(1)

    try:
        for index, x, image, error in loader:
            if error is not None:
                fail(files[index], error)
                progress.update(1)
                continue
            key = (tuple(x.shape), image.shape[:2])
            groups.setdefault(key, []).append((index, x, image))
            if len(groups[key]) >= batch:
                run(key)
        for key in list(groups):
            run(key)
    finally:
        progress.close()
    print(f"wrote {len(written)} mask(s) to {out_dir}")
    if failures:
        print(f"fastseg predict: {len(failures)} of {len(files)} image(s) failed:", file=sys.stderr)
        for path, error in failures:
            print(f"  {path}: {error}", file=sys.stderr)
        return 1
    return 0


def _cli(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastseg.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_predict_arguments(parser)
    return predict_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_cli())
