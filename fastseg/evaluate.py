"""``fastseg eval`` (mIoU on a dataset split) and the inference helpers ``fastseg predict`` shares.

::

    fastseg eval --checkpoint runs/ade/checkpoints/iter_00160000.pth --dataset ade20k --data-root data/ade
    fastseg eval --checkpoint segformer.b0.1024x1024.city.160k.pth --dataset cityscapes \
        --data-root data/cityscapes --mode slide --crop 1024x1024 --stride 768x768
    fastseg eval ... --scales 0.5 0.75 1.0 1.25 1.5 1.75 --flip          # multi-scale + flip

prints a per-class IoU/Acc table and aAcc / mIoU / mAcc, and writes them as JSON. Under
``torchrun`` each rank evaluates a share of the images and the confusion matrices are summed
with ``all_reduce``.

``add_eval_arguments(parser)`` and ``eval_main(args) -> int`` (alias ``add_arguments`` / ``main``)
are the command; ``predict`` lives in :mod:`fastseg.predict`. ``python -m fastseg.evaluate
{eval,predict} …`` runs either.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import sys
from pathlib import Path

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


# --- shared helpers ---------------------------------------------------------------------------------

def parse_size(text) -> tuple[int, int] | None:
    """'512' → (512, 512); '2048x512' → (2048, 512); 'none' → None; 'auto' stays 'auto'."""
    if text is None:
        return None
    if isinstance(text, (tuple, list)):
        return tuple(int(v) for v in text)
    text = str(text).strip().lower()
    if text in ("none", ""):
        return None
    if text == "auto":
        return "auto"
    parts = text.replace("*", "x").replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512 or 2048x512, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 512 or 2048x512, got {text!r}")
    return values


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto': cuda:<local_rank> when CUDA is available, else cpu; 'cuda': cuda:<local_rank>."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def autocast(device: torch.device, amp: str | None):
    dtype = AMP_DTYPES.get(amp or "none")
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def add_dataset_arguments(p, default_dataset: str | None = "synthetic") -> None:
    from fastseg.data import DATASETS

    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default=default_dataset, choices=list(DATASETS),
                   help="ade20k, cityscapes, folder (image/mask pairs) or synthetic (generated toy task)")
    g.add_argument("--data-root", help="dataset root folder (not needed for synthetic)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="classes of a folder dataset (synthetic: default 4); fixed for ade20k/cityscapes")
    g.add_argument("--image-dir", default="images", help="folder dataset: image subfolder")
    g.add_argument("--label-dir", default="labels", help="folder dataset: label subfolder")
    g.add_argument("--reduce-zero-label", action="store_true",
                   help="folder dataset: label 0 is 'ignore' and classes start at 1")
    g.add_argument("--synthetic-size", type=int, default=64, help="synthetic image size")
    g.add_argument("--synthetic-images", type=int, default=None, help="synthetic images per split")
    add_exif_argument(g)


def add_exif_argument(p) -> None:
    """``--no-exif`` (train, eval, predict): see :func:`fastseg.data.read_image`."""
    p.add_argument("--no-exif", dest="exif", action="store_false",
                   help="read images as stored, ignoring their EXIF orientation (default: as viewers show them)")


def dataset_from_args(args, split: str):
    from fastseg.data import build_dataset

    return build_dataset(args.dataset, split, args.data_root, num_classes=args.num_classes,
                         image_dir=args.image_dir, label_dir=args.label_dir,
                         reduce_zero=args.reduce_zero_label, synthetic_size=args.synthetic_size,
                         synthetic_images=args.synthetic_images, seed=getattr(args, "data_seed", 0),
                         exif=getattr(args, "exif", True))


def add_inference_arguments(p) -> None:
    g = p.add_argument_group("inference")
    g.add_argument("--mode", choices=["whole", "slide"], default=None,
                   help="whole image or sliding window (default: the dataset recipe's: slide for cityscapes)")
    g.add_argument("--crop", type=parse_size, default=None, help="sliding-window size HxW")
    g.add_argument("--stride", type=parse_size, default=None, help="sliding-window stride HxW")
    g.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="resize ratios for multi-scale testing, e.g. 0.5 0.75 1.0 1.25 1.5 1.75")
    g.add_argument("--flip", action="store_true", help="add horizontally flipped passes")
    g.add_argument("--test-scale", type=parse_size, default="auto",
                   help="resize images (keeping aspect) to fit LONGxSHORT before inference, e.g. 2048x512; "
                        "'none' keeps the size; default: the dataset recipe's")
    g.add_argument("--two-step", action="store_true",
                   help="upsample every pass's logits to full resolution, then average and argmax (the previous "
                        "path, mmseg's arithmetic; holds (K, H, W) tensors). Default: accumulate on the logits' "
                        "grid and take labels from the fused upsample + argmax")
    g.add_argument("--amp", choices=list(AMP_DTYPES), default="none", help="autocast dtype for inference")
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="fused kernels (the default; --fused is accepted and changes nothing); --no-fused: the "
                        "reference path. Each op runs the backend the dispatcher picks (fastseg info)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")


def inference_settings(args, dataset_name: str | None) -> dict:
    """mode / crop / stride / test scale from the flags, falling back to the dataset recipe."""
    from fastseg.data import dataset_defaults

    d = dataset_defaults(dataset_name, getattr(args, "synthetic_size", 64)) if dataset_name else None
    mode = args.mode or (d.eval_mode if d else "whole")
    crop = args.crop or (d.eval_crop if d else None)
    stride = args.stride or (d.eval_stride if d else None)
    if mode == "slide":
        if crop is None:
            raise ValueError("--mode slide needs --crop HxW")
        stride = stride or crop
    test_scale = args.test_scale
    if test_scale == "auto":
        test_scale = d.test_scale if d else None
    return {"mode": mode, "crop": crop, "stride": stride, "scales": list(args.scales), "flip": bool(args.flip),
            "test_scale": test_scale, "two_step": bool(getattr(args, "two_step", False))}


def apply_fused(model, fused: bool | None) -> bool:
    """``--fused`` / ``--no-fused`` / neither (None: fused wherever the model has a fused path) on
    a loaded model; returns whether it runs fused. ``--fused`` on a model without one raises."""
    if hasattr(model, "set_fused"):
        model.set_fused(fused is not False)
        return fused is not False
    if fused:
        raise ValueError(f"{type(model).__name__} has no fused path (set_fused)")
    return False


def _first(batch):
    return batch[0]


@torch.no_grad()
def evaluate_model(model, dataset, *, mode="whole", crop=None, stride=None, scales=(1.0,), flip=False,
                   test_scale=None, device=None, amp="none", workers=0, limit=None, progress=True,
                   two_step=False) -> dict:
    """mIoU & co. of ``model`` on a dataset (a :class:`fastseg.data.SegmentationDataset`).

    Each image is resized to ``test_scale`` (aspect kept) and run with
    :func:`fastseg.inference.segment_labels`, whose fused upsample + argmax gives the labels at the
    label's size straight from the logits' grid (no full-resolution logits). Under torch.distributed each rank takes
    every ``world``-th image and the confusion matrices are summed. Returns the metrics dict
    (see :mod:`fastseg.metrics`) plus ``images`` and ``non_finite_images``: the images whose
    logits held NaN or Inf, each warned about on one line and left out of the metrics (its
    labels would be confident answers made from NaN).
    """
    from tqdm import tqdm

    from fastseg.data import EvalSet, TestTransform
    from fastseg.inference import segment_labels
    from fastseg.metrics import SegMetric

    device = device or next(model.parameters()).device
    rank, world = dist_info()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    # uint8 images: segment_labels normalises one window (or pass) at a time
    samples = EvalSet(dataset, TestTransform(test_scale, normalized=False))
    shard = torch.utils.data.Subset(samples, list(range(rank, n, world)))
    loader = torch.utils.data.DataLoader(shard, batch_size=1, num_workers=workers, collate_fn=_first,
                                         pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    metric = SegMetric(dataset.num_classes, dataset.ignore_index, device=device)
    non_finite = []
    bar = tqdm(loader, desc="eval", unit="img", disable=not progress or rank != 0, file=sys.stderr, leave=False)
    try:
        for image, label, index in bar:
            image = image[None].to(device, non_blocking=True)
            with autocast(device, amp):
                labels, finite = segment_labels(model, image, mode=mode, crop=crop, stride=stride, scales=scales,
                                                flip=flip, out_size=label.shape, two_step=two_step,
                                                return_finite=True)
            if not bool(finite[0]):  # labels from NaN/Inf logits would be counted as confident answers
                non_finite.append(dataset.sample_source(index))
                bar.write(f"fastseg eval: warning: {non_finite[-1]}: non-finite logits (NaN or Inf); "
                          "left out of the metrics", file=sys.stderr)
                continue
            metric.update(labels[0], label.to(device))
    finally:
        bar.close()
        model.train(was_training)
    metric.all_reduce()
    result = metric.compute()
    result["images"] = n
    result["non_finite_images"] = _gathered(non_finite, world)
    return result


def _gathered(items: list, world: int) -> list:
    """Every rank's ``items``, concatenated (the list itself without torch.distributed)."""
    if world == 1:
        return items
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


# --- eval ----------------------------------------------------------------------------------------------

def add_eval_arguments(p) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="a fastseg train checkpoint (.pth), a save_pretrained folder, or any checkpoint "
                        "SegFormer.from_pretrained reads (or --engine DIR)")
    p.add_argument("--model", default=None, help="setr-… to load a SETR checkpoint (SegFormer is auto-detected)")
    add_dataset_arguments(p, default_dataset=None)
    p.add_argument("--split", default="val", help="dataset split (default val)")
    add_inference_arguments(p)
    p.add_argument("--workers", type=int, default=2, help="data-loading workers")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--out", default=None, help="JSON file for the results (default: <checkpoint>.eval.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_arguments(p)


def _init_distributed_from_env(device_name: str) -> tuple[int, int, int]:
    """init_process_group when started by torchrun (WORLD_SIZE > 1); returns rank, world, local_rank."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world = dist_info()
    return rank, world, local_rank


def eval_main(args) -> int:
    import torch.distributed as dist

    from fastseg.metrics import format_table

    rank, world, local_rank = _init_distributed_from_env(args.device)
    try:
        device = pick_device(args.device, local_rank)
        model, info = model_from_args(args)
        dataset_name = args.dataset or info.get("dataset")
        if dataset_name is None:
            raise ValueError("--dataset is needed (the checkpoint does not record its dataset)")
        args.dataset = dataset_name
        dataset = dataset_from_args(args, args.split)
        model_classes = getattr(model, "num_classes", None)
        if model_classes is not None and model_classes != dataset.num_classes:
            raise ValueError(f"the model predicts {model_classes} classes but {dataset_name} has {dataset.num_classes}")
        args.fused = apply_fused(model, args.fused)
        model.to(device).eval()
        settings = inference_settings(args, dataset_name)
        result = evaluate_model(model, dataset, **settings, device=device, amp=args.amp, workers=args.workers,
                                limit=args.limit, progress=not args.quiet)
        if rank == 0:
            names = info.get("class_names") or dataset.class_names
            print(f"{dataset_name} {args.split}: {result['images']} images, mode {settings['mode']}, "
                  f"scales {settings['scales']}{' + flip' if settings['flip'] else ''}")
            print(format_table(result, names))
            record = {
                "schema": "fastseg-eval/1",
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "checkpoint": str(args.checkpoint or args.engine), "dataset": dataset_name, "split": args.split,
                "engine": getattr(model, "engine_report", None),
                "settings": {**settings, "amp": args.amp, "fused": args.fused, "world_size": world},
                "aAcc": result["aAcc"], "mIoU": result["mIoU"], "mAcc": result["mAcc"],
                "images": result["images"], "pixels": result["pixels"],
                "non_finite_images": result["non_finite_images"],
                "per_class": {n: {"IoU": i, "Acc": a} for n, i, a in zip(names, result["IoU"], result["Acc"])},
            }
            out = Path(args.out) if args.out else Path(str(args.checkpoint or args.engine).rstrip("/") + ".eval.json")
            write_json(record, out)
            print(f"wrote {out}")
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if result["non_finite_images"]:
        if rank == 0:
            print(f"fastseg eval: {len(result['non_finite_images'])} image(s) had non-finite logits and are not in "
                  "the metrics (listed in the JSON)", file=sys.stderr)
        return 1
    return 0


def json_safe(value):
    """NaN / inf → None (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(record: dict, path: Path) -> None:
    """Strict JSON (NaN → null), written atomically."""
    from fastseg.io import atomic_write

    with atomic_write(Path(path), "w") as f:
        json.dump(json_safe(record), f, indent=2, allow_nan=False, default=str)
        f.write("\n")


# --- deployed engines (fastseg deploy) instead of the PyTorch model -------------------------------------

def add_engine_arguments(p) -> None:
    from fastseg.deploy.runtimes import PRECISIONS, RUNTIMES

    g = p.add_argument_group("engine (fastseg deploy) instead of the PyTorch model")
    g.add_argument("--engine", metavar="DIR", default=None, help="an engine folder written by fastseg deploy --out")
    g.add_argument("--runtime", choices=("auto",) + RUNTIMES, default=None,
                   help="deploy --checkpoint on this runtime first (cached: later runs load the engine)")
    g.add_argument("--precision", choices=PRECISIONS, default=None, help="the engine's precision (with --runtime)")
    g.add_argument("--calibrate", metavar="DIR", default=None, help="calibration images for --precision int8")


def model_from_args(args):
    """(model, info): ``--engine DIR`` or ``--runtime/--precision`` give a deployed engine (as a
    module that returns logits); otherwise the PyTorch model of ``--checkpoint``."""
    from fastseg.inference import load_model

    engine_dir = getattr(args, "engine", None)
    runtime, precision = getattr(args, "runtime", None), getattr(args, "precision", None)
    if engine_dir is not None and args.checkpoint is not None:
        raise ValueError("give --checkpoint or --engine DIR, not both")
    if engine_dir is None and args.checkpoint is None:
        raise ValueError("--checkpoint is needed (or --engine DIR)")
    if engine_dir is None and runtime is None and precision is None:
        return load_model(args.checkpoint, model_name=args.model, num_classes=None)
    import fastseg

    if engine_dir is not None:
        if runtime is not None or precision is not None:
            raise ValueError("--runtime/--precision deploy a --checkpoint; an --engine folder already has both")
        engine, info = fastseg.load_engine(engine_dir), {}
    else:
        model, info = load_model(args.checkpoint, model_name=args.model, num_classes=None)
        engine = fastseg.deploy(model, runtime or "auto", precision or "fp32", calibration=args.calibrate)
    return engine.as_module(), info


add_arguments = add_eval_arguments
main = eval_main


def _cli(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastseg.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_arguments(sub.add_parser("eval", help="mIoU of a checkpoint on a dataset split"))
    from fastseg import predict  # imported here: predict builds on this module

    predict.add_predict_arguments(sub.add_parser("predict", help="colourised masks for images"))
    args = parser.parse_args(argv)
    return eval_main(args) if args.command == "eval" else predict.predict_main(args)


if __name__ == "__main__":
    sys.exit(_cli())
