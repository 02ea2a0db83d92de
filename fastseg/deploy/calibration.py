"""Calibration inputs for INT8: a folder of images (decoded and normalised as ``fastseg predict``
does) or an iterable of input batches. Unreadable images are skipped and named."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch

from fastseg.deploy.common import ExportError

MAX_IMAGES = 300


def is_folder_source(calibration) -> bool:
    return isinstance(calibration, (str, Path))


def fingerprint(calibration, max_images: int = MAX_IMAGES) -> str:
    """What the INT8 cache key needs of the calibration data, without decoding images: a folder's
    file names, sizes and modification times; an iterable's tensor bytes (hashed once)."""
    h = hashlib.sha256()
    if is_folder_source(calibration):
        for path in _image_files(Path(calibration))[:max_images]:
            st = path.stat()
            h.update(f"{path.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        for x in calibration:
            h.update(np.ascontiguousarray(x).tobytes())
    h.update(str(max_images).encode())
    return h.hexdigest()


def _image_files(folder: Path) -> list[Path]:
    from fastseg.data.datasets import IMAGE_SUFFIXES

    if not folder.exists():
        raise ExportError(f"calibration folder {folder} does not exist")
    if not folder.is_dir():
        raise ExportError(f"calibration must be a folder of images or an iterable of input batches; {folder} "
                          "is a file")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load(calibration, in_channels: int, *, input_size=None, max_images: int = MAX_IMAGES
         ) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """([float32 arrays (B, C, H, W)], [(skipped file, why)]). A folder's images are read as
    ``fastseg predict`` reads them (EXIF orientation, 16-bit scaled), resized with the aspect kept
    to ``input_size`` = (long, short) when given, and normalised; at most ``max_images``."""
    if is_folder_source(calibration):
        return _load_folder(Path(calibration), input_size, max_images)
    try:
        items = iter(calibration)
    except TypeError:
        raise ExportError(f"calibration must be a folder of images or an iterable of input batches, got "
                          f"{type(calibration).__name__}") from None
    batches, count = [], 0
    for i, x in enumerate(items):
        if count >= max_images:
            break
        x = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != in_channels or x.shape[0] == 0:
            raise ExportError(f"calibration batch {i} has shape {tuple(x.shape)}; expected (B, {in_channels}, H, W)")
        batches.append(np.ascontiguousarray(x[: max_images - count], dtype=np.float32))
        count += batches[-1].shape[0]
    if not batches:
        raise ExportError("calibration holds no input batches")
    return batches, []


def _load_folder(folder: Path, input_size, max_images: int):
    from fastseg.data import TestTransform, read_image

    files = _image_files(folder)[:max_images]
    scale = None if input_size is None else (max(input_size), min(input_size))
    transform = TestTransform(scale)
    batches, skipped = [], []
    for path in files:
        try:
            x, _ = transform(read_image(path))
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped and named
            skipped.append((str(path), str(e).splitlines()[0] if str(e) else type(e).__name__))
            continue
        batches.append(x[None].numpy().astype(np.float32))
    if skipped:
        warnings.warn(f"calibration: skipped {len(skipped)} unreadable image(s): "
                      + "; ".join(f"{p} ({why})" for p, why in skipped), stacklevel=3)
    if not batches:
        raise ExportError(f"calibration folder {folder}: none of its {len(files)} image(s) could be read: "
                          + "; ".join(p for p, _ in skipped))
    return batches, skipped


def split(batches: list[np.ndarray], held_out: float = 0.25) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(calibrate on, judge on): every 4th batch is held out to measure agreement, when there are
    enough; with fewer than 4 batches both sets are all of them."""
    if len(batches) < 4:
        return batches, batches
    step = max(2, round(1 / held_out))
    judge = batches[::step]
    calib = [b for i, b in enumerate(batches) if i % step]
    return calib, judge
