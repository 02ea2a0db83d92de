"""``fastseg train`` / ``python -m fastseg.train``: the SegFormer (and SETR) training recipe.

One command on one device or under ``torchrun`` (DDP)::

    python -m fastseg.train --dataset synthetic --iters 200 --crop 64 --batch 8      # toy task, CPU
    python -m fastseg.train --dataset ade20k --data-root data/ade/ADEChallengeData2016 \
        --model segformer-b0 --init mit_b0.pth --iters 160000 --batch 2 --fused --amp bf16
    torchrun --nproc_per_node 8 -m fastseg.train --dataset cityscapes --data-root data/cityscapes \
        --model segformer-b2 --init mit_b2.pth --crop 1024 --batch 1 --iters 160000

Recipe (SegFormer, Xie et al. 2021; mmseg-0.x configs of NVlabs/SegFormer), every number a flag:

- AdamW, lr 6e-5, betas (0.9, 0.999), weight decay 0.01; head parameters (names containing
  ``decoder`` or ``head``) get lr × 10; parameters whose names contain ``norm``, ``pos_block``,
  ``pos_embed`` or ``cls_token`` get no weight decay. That is the official ``paramwise_cfg``
  (``custom_keys={'pos_block': decay_mult 0, 'norm': decay_mult 0, 'head': lr_mult 10}``,
  matched on names, so the decoder's BatchNorm — named ``bn``, not ``norm`` — keeps its decay,
  as in the official runs), plus ViT's position embedding / class token for SETR.
- poly schedule, power 1.0, min lr 0, with linear warm-up over 1500 iterations from ratio 1e-6
  (mmcv's ``PolyLrUpdaterHook`` with ``warmup='linear'``), stepped per iteration.
- Loss: cross-entropy (ignore 255) on the logits resized bilinearly to the label size; models
  returning ``(main, [aux…])`` add ``Σ wᵢ · CE(auxᵢ)`` with ``model.aux_weights`` (default 0.4).
- Augmentation: see :mod:`fastseg.data.transforms`.

Checkpoints (``<out>/checkpoints/iter_XXXXXXXX.pth``, written atomically, the last ``--keep``
kept) hold the model, optimiser, scheduler, GradScaler, every rank's RNG states (python, numpy,
torch, cuda), the iteration and the arguments; ``--resume auto|PATH`` continues exactly where the
run stopped (same data order, same augmentations, same dropout masks). Logs: a tqdm bar (loss,
lr, images/s), ``<out>/log.csv`` and TensorBoard (``<out>/tb``) when installed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fastseg.evaluate import (
    AMP_DTYPES,
    add_dataset_arguments,
    autocast,
    dataset_from_args,
    evaluate_model,
    parse_size,
    pick_device,
    write_json,
)
from fastseg.inference import TRAIN_CHECKPOINT_FORMAT, build_model, is_train_checkpoint, model_config_dict

CHECKPOINT_RE = re.compile(r"iter_(\d+)\.pth$")
CSV_FIELDS = ("iteration", "loss", "lr", "images_per_s", "aAcc", "mIoU", "mAcc")
DEFAULT_NO_DECAY = "norm,pos_block,pos_embed,cls_token"
DEFAULT_HEAD_KEYS = "decoder,head"


# --- process group --------------------------------------------------------------------------------

class Dist:
    """Rank facts; ``enabled`` when started by torchrun with WORLD_SIZE > 1."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        want_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
        self.device = pick_device(device_arg, self.local_rank)
        if self.enabled and not dist.is_initialized():
            if want_cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        self.backend = dist.get_backend() if self.enabled else None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def finish(self):
        """After a run that completed on every rank: wait until all ranks are done with their
        collectives (and rank 0 with its files), so no rank tears down while another still talks
        to it or to rank 0's store."""
        if self.enabled and dist.is_initialized():
            dist.barrier()

    def close(self):
        """Last step of a run: destroy the process group (after every other teardown)."""
        if self.enabled and dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dist.destroy_process_group()


# --- optimiser and schedule -----------------------------------------------------------------------

def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float,
                 no_decay_keys=DEFAULT_NO_DECAY.split(","), head_keys=DEFAULT_HEAD_KEYS.split(",")) -> list[dict]:
    """AdamW groups: (backbone | head) × (decay | no decay), matched on parameter names like
    mmcv's ``paramwise_cfg.custom_keys``. Empty groups are left out; the order is fixed."""
    buckets: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = any(k and k in name for k in head_keys)
        decay = not any(k and k in name for k in no_decay_keys)
        buckets.setdefault((head, decay), []).append(p)
    groups = []
    for head in (False, True):
        for decay in (True, False):
            params = buckets.get((head, decay))
            if params:
                mult = head_lr_mult if head else 1.0
                groups.append({"params": params, "lr": lr * mult, "weight_decay": weight_decay if decay else 0.0,
                               "name": ("head" if head else "backbone") + ("" if decay else "_no_decay"),
                               "lr_mult": mult})
    return groups


class PolyWarmup:
    """mmcv's poly schedule with linear warm-up, per iteration and per group::

        poly(it)   = (base - min_lr) · (1 - it / total) ** power + min_lr
        lr(it)     = poly(it) · (1 - (1 - it / warmup) · (1 - warmup_ratio))   for it < warmup
    """

    def __init__(self, optimizer, total: int, warmup: int = 1500, warmup_ratio: float = 1e-6,
                 power: float = 1.0, min_lr: float = 0.0):
        self.optimizer, self.total, self.warmup = optimizer, total, warmup
        self.warmup_ratio, self.power, self.min_lr = warmup_ratio, power, min_lr
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.iteration = 0
        self._apply()

    def lr_at(self, it: int, base: float) -> float:
        progress = min(it, self.total) / max(self.total, 1)
        lr = (base - self.min_lr) * (1.0 - progress) ** self.power + self.min_lr
        if it < self.warmup:
            lr *= 1.0 - (1.0 - it / self.warmup) * (1.0 - self.warmup_ratio)
        return lr

    def _apply(self):
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = self.lr_at(self.iteration, base)

    def step(self):
        self.iteration += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "base_lrs": list(self.base_lrs), "total": self.total,
                "warmup": self.warmup, "warmup_ratio": self.warmup_ratio, "power": self.power, "min_lr": self.min_lr}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()


# --- loss -------------------------------------------------------------------------------------------

def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean CE over labelled pixels, on logits resized (bilinear) to the label size, in fp32.
    A batch with no labelled pixel gives 0 (with a gradient path), not NaN."""
    logits = logits.float()
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp_min(1)


def seg_loss(output, target: torch.Tensor, aux_weights=None, ignore_index: int = 255) -> torch.Tensor:
    """CE(main) + Σ wᵢ · CE(auxᵢ) for ``output`` = logits, or (main, [aux…]) / (main, aux1, …)."""
    if isinstance(output, torch.Tensor):
        return cross_entropy(output, target, ignore_index)
    if not isinstance(output, (tuple, list)) or not output:
        raise TypeError(f"model returned {type(output).__name__}; expected logits or (main, [aux…])")
    main = output[0]
    aux = list(output[1]) if len(output) == 2 and isinstance(output[1], (tuple, list)) else list(output[1:])
    weights = list(aux_weights) if aux_weights is not None else [0.4] * len(aux)
    if len(weights) != len(aux):
        raise ValueError(f"the model returned {len(aux)} auxiliary outputs but has {len(weights)} aux_weights")
    loss = cross_entropy(main, target, ignore_index)
    for w, a in zip(weights, aux):
        loss = loss + w * cross_entropy(a, target, ignore_index)
    return loss


# --- RNG and checkpoints ---------------------------------------------------------------------------

def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states as plain data (tensors, ints, lists)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_paths(directory: Path) -> list[Path]:
    """``iter_*.pth`` in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m[1]), p) for p in directory.iterdir() if (m := CHECKPOINT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict, directory: Path, iteration: int, keep: int) -> Path:
    """Write ``iter_<iteration>.pth`` atomically (temporary file + rename), then drop all but the
    newest ``keep`` checkpoints. A failure mid-write leaves the previous files as they were."""
    from fastseg.io import atomic_write

    path = directory / f"iter_{iteration:08d}.pth"
    with atomic_write(path) as f:
        torch.save(state, f)
    if keep > 0:
        for old in checkpoint_paths(directory)[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    from fastseg.io import CheckpointError, load_weights_file

    try:
        obj, _ = load_weights_file(path)
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as e:  # a truncated pickle can fail deep inside torch.load (e.g. IndexError)
        raise CheckpointError(f"could not read {path}: the file is corrupt or truncated "
                              f"({type(e).__name__}: {e})") from None
    if not is_train_checkpoint(obj):
        raise CheckpointError(f"{path} is not a fastseg training checkpoint (no format {TRAIN_CHECKPOINT_FORMAT!r}); "
                              "to start from plain weights use --init")
    return obj


def find_resume(spec: str, directory: Path, log) -> tuple[Path, dict] | None:
    """``auto``: the newest readable checkpoint in ``directory`` (None if there is none);
    otherwise the given file."""
    from fastseg.io import CheckpointError

    if spec != "auto":
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"--resume: checkpoint not found: {path}")
        return path, load_checkpoint(path)
    for path in reversed(checkpoint_paths(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            log(f"warning: skipping unreadable checkpoint {path}: {e}")
    return None


def plain_args(args) -> dict:
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, Path):
            v = str(v)
        if isinstance(v, (str, int, float, bool, type(None))) or (
                isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v)):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- logging ----------------------------------------------------------------------------------------

class RunLog:
    """rank-0 CSV (always) and TensorBoard (when installed) scalars."""

    def __init__(self, out_dir: Path, enabled: bool, use_tensorboard: bool, say):
        self.enabled = enabled
        self.csv_path = out_dir / "log.csv"
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._file = open(self.csv_path, "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._file, fieldnames=CSV_FIELDS)
        if new:
            self._csv.writeheader()
            self._file.flush()
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out_dir / "tb"))
            except ImportError:
                say(f"tensorboard is not installed: logging to {self.csv_path} only (pip install tensorboard)")

    def write(self, iteration: int, **values) -> None:
        if not self.enabled:
            return
        row = {"iteration": iteration}
        row.update({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items() if k in CSV_FIELDS})
        self._csv.writerow(row)
        self._file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    tag = f"val/{k}" if k in ("aAcc", "mIoU", "mAcc") else f"train/{k}"
                    self.tb.add_scalar(tag, v, iteration)

    def close(self) -> None:
        """Idempotent: the run's teardown calls it again after an error."""
        if self.enabled:
            if not self._file.closed:
                self._file.close()
            if self.tb is not None:
                self.tb.close()  # flushes and joins its writer thread
                self.tb = None


# --- the run ----------------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _data_batches(loader, sampler, batch: int, start_batch: int):
    """Batches forever, epoch after epoch, starting ``start_batch`` batches into the sequence."""
    per_epoch = sampler.num_samples // batch
    epoch, skip = divmod(start_batch, per_epoch)
    while True:
        sampler.set_position(epoch, skip * batch)
        yield from loader
        epoch, skip = epoch + 1, 0


def build_transform(args, defaults):
    from fastseg.data import PhotoMetricDistortion, TrainTransform

    scale = defaults.scale if args.scale == "auto" else args.scale
    crop = args.crop or defaults.crop
    return TrainTransform(crop=crop, scale=scale, ratio_range=tuple(args.ratio_range),
                          cat_max_ratio=args.cat_max_ratio, flip_prob=args.flip_prob,
                          photometric=PhotoMetricDistortion() if args.photometric else None)


@dataclass
class _Run:
    """Everything one training run holds, filled in by the steps of :func:`run` in order."""

    args: argparse.Namespace
    ddp: Dist
    say: Callable[[str], None]
    out_dir: Path
    ckpt_dir: Path
    quiet: bool
    # _setup
    defaults: object = None
    train_set: object = None
    val_set: object = None
    sampler: object = None
    loader: object = None
    model: nn.Module | None = None
    model_name: str = ""
    aux_weights: object = None
    sync_bn: str = "off (single process)"
    optimizer: object = None
    scheduler: object = None
    scaler: object = None
    # _train_loop
    log: RunLog | None = None
    batches: object = None
    bar: object = None
    iteration: int = 0
    last_metrics: dict | None = None
    last_loss: float = float("nan")

    @property
    def device(self) -> torch.device:
        return self.ddp.device


def run(args) -> dict:
    """Train as ``args`` say; returns the summary (also written to ``<out>/summary.json``).

    The steps, in order: :func:`_setup` (seeds, data, model, optimiser), :func:`_resume` (from a
    checkpoint), :func:`_train_loop` (optimiser steps, logging, :func:`_evaluate` and
    :func:`_checkpoint` on their schedules), :func:`_finish` (summary and final model) and, whatever
    happened, :func:`_teardown`.
    """
    from tqdm import tqdm

    if args.iters < 1 or args.batch < 1 or args.accum < 1:
        raise ValueError(f"--iters, --batch and --accum must be >= 1 (got {args.iters}, {args.batch}, {args.accum})")
    ddp = Dist(args.device)

    def say(msg: str) -> None:
        if ddp.main:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    out_dir = Path(args.out)
    r = _Run(args, ddp, say, out_dir, out_dir / "checkpoints", args.quiet or not ddp.main)
    try:
        _setup(r)
        start = _resume(r)
        if ddp.enabled:
            r.model = nn.parallel.DistributedDataParallel(
                r.model, device_ids=[r.device.index] if r.device.type == "cuda" else None)
        _train_loop(r, start)
        return _finish(r)
    finally:
        _teardown(r.bar, r.log, r.batches, r.loader)
        ddp.close()


def _setup(r: _Run) -> None:
    """Seeds, the data (train set, sampler, loader, val set), the model and the optimiser."""
    from fastseg.data import TrainSampler, TrainSet, dataset_defaults

    args, ddp = r.args, r.ddp
    if args.deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(args.seed)

    # data
    args.data_seed = args.seed
    r.train_set = dataset_from_args(args, args.train_split)
    r.defaults = dataset_defaults(args.dataset, args.synthetic_size)
    transform = build_transform(args, r.defaults)
    r.val_set = dataset_from_args(args, args.val_split) if args.eval_every > 0 else None
    r.sampler = TrainSampler(r.train_set, num_replicas=ddp.world, rank=ddp.rank, seed=args.seed)
    if r.sampler.num_samples // args.batch == 0:
        raise ValueError(f"{args.dataset} {args.train_split} has {len(r.train_set)} images: too few for "
                         f"{ddp.world} process(es) x batch {args.batch}")
    r.loader = torch.utils.data.DataLoader(
        TrainSet(r.train_set, transform, seed=args.seed), batch_size=args.batch, sampler=r.sampler,
        num_workers=args.workers, pin_memory=r.device.type == "cuda", drop_last=True,
        persistent_workers=args.workers > 0,
        # Its own generator, so creating loader iterators never consumes the global torch RNG.
        generator=torch.Generator().manual_seed(args.seed))

    # model
    model_name = args.model or (None if args.init else "segformer-b0")
    model = build_model(model_name, r.train_set.num_classes, init=args.init, overrides=args.model_config,
                        img_size=transform.crop)
    if model_name is None:
        variant = getattr(model, "variant", None)
        model_name = f"segformer-{variant}" if variant else "segformer-custom"
    if args.init and ddp.main and getattr(model, "load_report", None) is not None:
        r.say(str(model.load_report))
    if hasattr(model, "set_fused"):
        model.set_fused(args.fused)
    elif args.fused:
        raise ValueError(f"{type(model).__name__} has no fused path (set_fused)")
    r.aux_weights = getattr(model, "aux_weights", None)
    model.to(r.device)
    if ddp.enabled:
        if r.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            r.sync_bn = "on (BatchNorm layers converted to SyncBatchNorm)"
        else:
            r.sync_bn = ("off: SyncBatchNorm needs GPU tensors in this torch; on CPU/gloo the BatchNorm layers stay "
                         "per process (batch statistics per rank, running statistics from rank 0)")
        r.say(f"DDP: {ddp.world} processes, backend {ddp.backend}; SyncBatchNorm {r.sync_bn}")
    r.model, r.model_name = model, model_name

    # optimiser
    r.optimizer = torch.optim.AdamW(
        param_groups(model, args.lr, args.weight_decay, args.head_lr_mult,
                     [k.strip() for k in args.no_decay_keys.split(",")],
                     [k.strip() for k in args.head_keys.split(",")]),
        lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    r.scheduler = PolyWarmup(r.optimizer, args.iters, args.warmup_iters, args.warmup_ratio, args.power, args.min_lr)
    r.scaler = torch.amp.GradScaler(r.device.type, enabled=args.amp == "fp16")
    # Per-rank stream for dropout / drop-path; the model weights were drawn from args.seed above.
    seed_everything(args.seed + ddp.rank)


def _resume(r: _Run) -> int:
    """Load ``--resume``'s checkpoint (model, optimiser, scheduler, scaler, RNG streams); the
    iteration to start from (0 without one)."""
    args, ddp = r.args, r.ddp
    if ddp.main and r.ckpt_dir.is_dir():
        for stale in r.ckpt_dir.glob(".iter_*.tmp"):  # a killed run's half-written checkpoint
            stale.unlink(missing_ok=True)
    found = find_resume(args.resume, r.ckpt_dir, r.say) if args.resume else None
    if args.resume and found is None:
        r.say(f"--resume auto: no checkpoint in {r.ckpt_dir}, starting from scratch")
    if found is None:
        return 0
    path, ckpt = found
    if ckpt["model_name"] != r.model_name or ckpt["num_classes"] != r.train_set.num_classes:
        raise ValueError(f"{path} was trained as {ckpt['model_name']} with {ckpt['num_classes']} classes; "
                         f"this run is {r.model_name} with {r.train_set.num_classes}")
    unwrap(r.model).load_state_dict(ckpt["model"])
    r.optimizer.load_state_dict(ckpt["optimizer"])
    r.scheduler.load_state_dict(ckpt["scheduler"])
    r.scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt.get("rng") or []
    if len(rngs) == ddp.world:
        set_rng_state(rngs[ddp.rank])
    else:
        r.say(f"warning: {path} was written by {len(rngs)} process(es), this run has {ddp.world}: "
              "RNG streams are reseeded, so the continuation is not bit-exact")
        seed_everything(args.seed + ddp.rank + 1000003 * int(ckpt["iteration"]))
    start = int(ckpt["iteration"])
    changed = {k: (v, getattr(args, k, None)) for k, v in ckpt.get("args", {}).items()
               if k in ("batch", "accum", "seed", "crop", "scale", "lr", "dataset", "amp")
               and v != plain_args(args).get(k)}
    r.say(f"resumed from {path} at iteration {start}" + (f" (changed: {changed})" if changed else ""))
    return start


def _train_loop(r: _Run, start: int) -> None:
    """Optimiser steps from ``start`` to ``--iters``: log every ``--log-every``, evaluate every
    ``--eval-every``, checkpoint every ``--ckpt-every`` (and each at the last iteration)."""
    from tqdm import tqdm

    args, device = r.args, r.device
    r.log = RunLog(r.out_dir, r.ddp.main, not args.no_tensorboard, r.say)
    r.batches = _data_batches(r.loader, r.sampler, args.batch, start * args.accum)
    images_per_iter = args.batch * args.accum * r.ddp.world
    loss_window, t_window, n_window = 0.0, time.perf_counter(), 0
    r.bar = tqdm(total=args.iters, initial=start, desc="train", unit="it", disable=r.quiet, file=sys.stderr,
                 dynamic_ncols=True)
    r.iteration = start
    while r.iteration < args.iters:
        value, lr = _train_step(r)
        r.iteration += 1
        it = r.iteration
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss is {value} at iteration {it}; lower --lr, or use --amp bf16/none")
        r.last_loss = value
        loss_window += value
        n_window += 1
        if it % args.log_every == 0 or it == args.iters:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t_window
            ips = images_per_iter * n_window / max(elapsed, 1e-9)
            mean_loss = loss_window / n_window
            r.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
            r.log.write(it, loss=mean_loss, lr=lr, images_per_s=ips)
            loss_window, t_window, n_window = 0.0, time.perf_counter(), 0
        r.bar.update(1)

        if args.eval_every > 0 and (it % args.eval_every == 0 or it == args.iters):
            _evaluate(r)
            t_window = time.perf_counter()  # evaluation time is not training throughput
        if args.ckpt_every > 0 and (it % args.ckpt_every == 0 or it == args.iters):
            _checkpoint(r)
            t_window = time.perf_counter()
    r.bar.close()


def _train_step(r: _Run) -> tuple[float, float]:
    """One optimiser step over ``--accum`` micro-batches: (its loss, the backbone lr it used)."""
    args, model, device = r.args, r.model, r.device
    model.train()
    r.optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=device)
    for micro in range(args.accum):
        images, labels = next(r.batches)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        sync = (model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel)
                and micro < args.accum - 1 else contextlib.nullcontext())
        with sync:
            with autocast(device, args.amp):
                output = model(images)
            loss = seg_loss(output, labels, r.aux_weights) / args.accum
            r.scaler.scale(loss).backward()
        step_loss += loss.detach()
    if args.clip_grad:
        r.scaler.unscale_(r.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    lr = r.optimizer.param_groups[0]["lr"]  # the (backbone) lr this step used
    r.scaler.step(r.optimizer)
    r.scaler.update()
    r.scheduler.step()
    return step_loss.item(), lr


def _evaluate(r: _Run) -> None:
    """mIoU / aAcc / mAcc on the val split, logged and printed."""
    if r.ddp.enabled:
        _sync_buffers(unwrap(r.model))
    settings = _eval_settings(r.args, r.defaults)
    m = evaluate_model(unwrap(r.model), r.val_set, **settings, device=r.device, amp=r.args.amp,
                       workers=r.args.workers, limit=r.args.eval_max_images, progress=not r.quiet)
    r.last_metrics = m
    r.log.write(r.iteration, aAcc=m["aAcc"], mIoU=m["mIoU"], mAcc=m["mAcc"])
    r.say(f"iter {r.iteration}: mIoU {100 * m['mIoU']:.2f}  aAcc {100 * m['aAcc']:.2f}  mAcc {100 * m['mAcc']:.2f}")


def _checkpoint(r: _Run) -> None:
    """Rank 0 writes everything a bit-exact resume needs (every rank's RNG states included)."""
    if r.ddp.enabled:
        _sync_buffers(unwrap(r.model))
    rngs = r.ddp.gather(rng_state())
    if r.ddp.main:
        state = {
            "format": TRAIN_CHECKPOINT_FORMAT, "iteration": r.iteration, "model_name": r.model_name,
            "model_config": model_config_dict(unwrap(r.model)), "num_classes": r.train_set.num_classes,
            "class_names": list(r.train_set.class_names), "dataset": r.args.dataset,
            "model": unwrap(r.model).state_dict(), "optimizer": r.optimizer.state_dict(),
            "scheduler": r.scheduler.state_dict(), "scaler": r.scaler.state_dict(), "rng": rngs,
            "world_size": r.ddp.world, "args": plain_args(r.args),
        }
        path = save_checkpoint(state, r.ckpt_dir, r.iteration, r.args.keep)
        r.bar.set_description(f"train (saved {path.name})")
    r.ddp.barrier()


def _finish(r: _Run) -> dict:
    """The summary (every rank's weight digest), the final model (``<out>/final``, written as a
    whole: see :func:`fastseg.io.atomic_directory`) and ``summary.json``."""
    args, ddp, model = r.args, r.ddp, r.model
    if ddp.enabled:
        _sync_buffers(unwrap(model))
    digests = ddp.gather(weights_digest(unwrap(model)))
    summary = {
        "iterations": r.iteration, "final_loss": r.last_loss, "model": r.model_name, "dataset": args.dataset,
        "num_classes": r.train_set.num_classes, "fused": bool(args.fused), "amp": args.amp,
        "world_size": ddp.world, "sync_batchnorm": r.sync_bn, "weights_sha256": digests,
        "ranks_identical": len(set(digests)) == 1,
        "metrics": None if r.last_metrics is None else
        {k: r.last_metrics[k] for k in ("aAcc", "mIoU", "mAcc", "IoU", "Acc")},
    }
    if ddp.main:
        if args.save_final and hasattr(unwrap(model), "save_pretrained"):
            unwrap(model).save_pretrained(r.out_dir / "final")
            summary["final_model"] = str(r.out_dir / "final")
        write_json(summary, r.out_dir / "summary.json")
        r.say(f"done: {r.iteration} iterations, final loss {r.last_loss:.4f}; wrote {r.out_dir / 'summary.json'}")
    ddp.finish()
    return summary


def _teardown(bar, log, batches, loader) -> None:
    """Stop everything that runs beside the training loop, before the process group goes:
    the progress bar, the CSV / TensorBoard writers (TensorBoard has a writer thread), and the
    DataLoader's worker processes and their pin-memory thread."""
    for close in (getattr(bar, "close", None), getattr(log, "close", None), getattr(batches, "close", None)):
        if close is not None:
            try:
                close()
            except Exception:  # teardown must reach destroy_process_group
                pass
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:  # persistent workers live until the iterator is shut down
        try:
            shutdown()
        except Exception:
            pass


def _sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics), as DDP does before each forward."""
    for b in model.buffers():
        dist.broadcast(b, src=0)


def _eval_settings(args, defaults) -> dict:
    # Whole-image evaluation during training unless asked otherwise (fastseg eval follows the
    # dataset recipe, e.g. sliding windows for Cityscapes).
    mode = args.eval_mode or "whole"
    crop = args.eval_crop or defaults.eval_crop
    stride = args.eval_stride or defaults.eval_stride or crop
    if mode == "slide" and crop is None:
        raise ValueError("--eval-mode slide needs --eval-crop")
    test_scale = defaults.test_scale if args.test_scale == "auto" else args.test_scale
    return {"mode": mode, "crop": crop, "stride": stride, "scales": (1.0,), "flip": False, "test_scale": test_scale}


# --- command line -----------------------------------------------------------------------------------

def add_arguments(p) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="segformer-b0 … segformer-b5 or setr-<variant> (default segformer-b0, or what --init holds)")
    g.add_argument("--model-config", default=None,
                   help="SegFormerConfig fields as JSON (text or file) for custom sizes, e.g. "
                        "'{\"embed_dims\": [16, 32, 64, 128], \"depths\": [1, 1, 1, 1], \"decoder_dim\": 64}'")
    g.add_argument("--init", default=None,
                   help="start from weights SegFormer.from_pretrained reads (e.g. an ImageNet mit_b0.pth)")
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=False,
                   help="run the fused kernels (model.set_fused); --no-fused runs the reference ops")

    add_dataset_arguments(p, default_dataset="synthetic")
    g = p.add_argument_group("data")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank")
    g.add_argument("--scale", type=parse_size, default="auto",
                   help="base scale LONGxSHORT of the random resize (default: the dataset recipe's, e.g. "
                        "2048x512 ADE20K, 2048x1024 Cityscapes; 'none' = the image's own size)")
    g.add_argument("--ratio-range", type=float, nargs=2, default=[0.5, 2.0], metavar=("LOW", "HIGH"))
    g.add_argument("--crop", type=parse_size, default=None, help="crop HxW (default: recipe's, 512 ADE20K, 1024 Cityscapes)")
    g.add_argument("--cat-max-ratio", type=float, default=0.75)
    g.add_argument("--flip-prob", type=float, default=0.5)
    g.add_argument("--photometric", action=argparse.BooleanOptionalAction, default=True,
                   help="PhotoMetricDistortion (brightness, contrast, saturation, hue)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=160000, help="total optimiser steps")
    g.add_argument("--batch", type=int, default=2, help="images per process per micro-batch")
    g.add_argument("--accum", type=int, default=1, help="micro-batches accumulated per optimiser step")
    g.add_argument("--lr", type=float, default=6e-5)
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999])
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--head-lr-mult", type=float, default=10.0, help="lr multiplier of head parameters")
    g.add_argument("--head-keys", default=DEFAULT_HEAD_KEYS, help="name substrings that mark head parameters")
    g.add_argument("--no-decay-keys", default=DEFAULT_NO_DECAY, help="name substrings of parameters without weight decay")
    g.add_argument("--warmup-iters", type=int, default=1500)
    g.add_argument("--warmup-ratio", type=float, default=1e-6)
    g.add_argument("--power", type=float, default=1.0, help="poly schedule power")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm (off in the recipe)")
    g.add_argument("--amp", choices=list(AMP_DTYPES), default="none", help="autocast dtype; fp16 uses a GradScaler")

    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/train", help="output folder (checkpoints/, log.csv, tb/, summary.json)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--deterministic", action="store_true", help="deterministic cuDNN / algorithms")
    g.add_argument("--ckpt-every", type=int, default=4000, help="checkpoint every K iterations (and at the end)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints kept (0 = all)")
    g.add_argument("--resume", default=None, metavar="PATH|auto", help="continue from a checkpoint exactly")
    g.add_argument("--eval-every", type=int, default=4000, help="mIoU on the val split every K iterations (0 = never)")
    g.add_argument("--eval-mode", choices=["whole", "slide"], default=None, help="default whole")
    g.add_argument("--eval-crop", type=parse_size, default=None, help="slide window HxW (default: recipe's)")
    g.add_argument("--eval-stride", type=parse_size, default=None, help="slide stride HxW (default: recipe's or the crop)")
    g.add_argument("--test-scale", type=parse_size, default="auto", help="evaluation resize LONGxSHORT or 'none'")
    g.add_argument("--eval-max-images", type=int, default=None, help="evaluate on the first N val images only")
    g.add_argument("--log-every", type=int, default=20, help="CSV / TensorBoard / bar update interval")
    g.add_argument("--no-tensorboard", action="store_true")
    g.add_argument("--save-final", action=argparse.BooleanOptionalAction, default=True,
                   help="save_pretrained the final model into <out>/final")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    run(args)
    return 0


def _cli(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastseg.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from fastseg.errors import run_command

    return run_command("train", main, args)


if __name__ == "__main__":
    sys.exit(_cli())
