"""Training and test transforms of the SegFormer / SETR recipes (mmsegmentation-0.x pipelines).

Training, in the recipe's order::

    Resize(img_scale, ratio_range=(0.5, 2.0))   random_rescale
    RandomCrop(crop_size, cat_max_ratio=0.75)    random_crop
    RandomFlip(prob=0.5)                         horizontal flip
    PhotoMetricDistortion()                      photometric_distortion
    Normalize(ImageNet mean/std, to RGB)         normalize
    Pad(size=crop_size, pad_val=0, seg_pad_val=255)

Test: resize with the aspect ratio kept to the test scale (``img_scale``), normalise; the label
stays at its original size (metrics are computed there).

Images are ``(H, W, 3)`` uint8 RGB arrays, labels ``(H, W)`` integer arrays. Every random draw
comes from the ``numpy.random.Generator`` passed in, so a transform is a pure function of
(sample, generator): the data pipeline seeds one generator per (seed, epoch, sample index), which
makes augmentation independent of worker count and rank, and exactly resumable.

Differences from mmcv/mmseg, all deliberate and small: resizing uses ``torch.nn.functional.
interpolate`` (bilinear, half-pixel centres, no antialiasing — what cv2's INTER_LINEAR does;
nearest for labels, cv2's INTER_NEAREST formula) instead of cv2, and the HSV round trip of the
photometric distortion is our own float implementation of OpenCV's 8-bit convention (H in
[0, 180), S and V in [0, 255]).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, on 0..255 pixels
IMAGENET_STD = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return value


def check_pair(image: np.ndarray, label: np.ndarray | None) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    if label is not None:
        if label.ndim != 2:
            raise ValueError(f"expected an (H, W) label map, got shape {label.shape}")
        if label.shape != image.shape[:2]:
            raise ValueError(f"image {image.shape[:2]} and label {label.shape} differ in size")


# --- geometry ---------------------------------------------------------------------------------

def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Size after mmcv's ``imrescale(img, scale)``: the largest aspect-preserving size whose long
    edge is <= max(scale) and short edge <= min(scale). Returns (new_h, new_w)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 (H, W, 3) image to ``size`` = (h, w), rounded back to uint8."""
    if image.shape[:2] == tuple(size):
        return image
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) label map (never interpolates class ids)."""
    if label.shape == tuple(size):
        return label
    x = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))[None, None].float()
    x = F.interpolate(x, size=size, mode="nearest")
    return x[0, 0].to(torch.int64).numpy().astype(label.dtype)


def random_rescale(image, label, scale, ratio_range, rng: np.random.Generator):
    """mmseg ``Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True)``.

    ``scale`` is (long, short) such as (2048, 512); None means the image's own size. A ratio is
    drawn uniformly from ``ratio_range`` and the image is rescaled to fit ``scale * ratio``.
    """
    lo, hi = ratio_range
    ratio = rng.random() * (hi - lo) + lo
    h, w = image.shape[:2]
    if scale is None:
        scale = (max(h, w), min(h, w))
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    size = rescale_size(h, w, target)
    size = (max(size[0], 1), max(size[1], 1))
    return resize_image(image, size), resize_label(label, size)


def crop_box(shape, crop: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random (y1, y2, x1, x2) window of at most ``crop`` = (h, w) inside ``shape``."""
    margin_h, margin_w = max(shape[0] - crop[0], 0), max(shape[1] - crop[1], 0)
    y = int(rng.integers(0, margin_h + 1))
    x = int(rng.integers(0, margin_w + 1))
    return y, y + crop[0], x, x + crop[1]


def random_crop(image, label, crop, cat_max_ratio: float, rng: np.random.Generator,
                ignore_index: int = IGNORE_INDEX):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``.

    With ``cat_max_ratio < 1`` a window is redrawn (up to 10 times, as mmseg) while a single
    class covers ``cat_max_ratio`` or more of its labelled pixels, or it holds fewer than two
    classes; the last draw is used if none qualifies. Images smaller than the crop are not
    padded here (``pad`` does that after normalisation).
    """
    box = crop_box(image.shape, crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            classes, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
            counts = counts[classes != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = crop_box(image.shape, crop, rng)
    y1, y2, x1, x2 = box
    return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


def pad_to(image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int],
           ignore_index: int = IGNORE_INDEX):
    """Pad (3, H, W) image with 0 and (H, W) label with ``ignore_index`` at the bottom/right."""
    h, w = image.shape[-2:]
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        if label is not None:
            label = F.pad(label, (0, pw, 0, ph), value=ignore_index)
    return image, label


# --- photometric distortion ---------------------------------------------------------------------

def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``convert``: ``values * alpha + beta``, clipped to [0, 255], truncated to uint8."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB → uint8 HSV in OpenCV's 8-bit convention (H = degrees / 2 in [0, 180))."""
    rgb = image.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    diff = v - rgb.min(-1)
    s = np.where(v > 0, 255.0 * diff / np.maximum(v, 1e-6), 0.0)
    safe = np.maximum(diff, 1e-6)
    h = np.where(v == r, 60.0 * (g - b) / safe,
                 np.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe))
    h = np.where(diff == 0, 0.0, h)
    h = np.where(h < 0, h + 360.0, h)
    hsv = np.stack([np.rint(h / 2.0) % 180, np.rint(s), v], axis=-1)
    return hsv.astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 HSV (OpenCV 8-bit convention) → uint8 RGB."""
    h = hsv[..., 0].astype(np.float32) * 2.0 / 60.0
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32)
    sector = np.floor(h).astype(np.int64) % 6
    frac = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape, dtype=np.float32)
    for k, (r, g, b) in enumerate(choices):
        m = sector == k
        out[..., 0][m], out[..., 1][m], out[..., 2][m] = r[m], g[m], b[m]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PhotoMetricDistortion:
    """mmseg's ``PhotoMetricDistortion``: each step with probability 0.5, in this order —
    brightness (± ``brightness_delta``), contrast (before or after the colour steps, a coin
    decides), saturation (× U(range)), hue (± ``hue_delta`` in OpenCV's 0..179 units). Every step
    returns to uint8 as mmseg does."""

    brightness_delta: int = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18

    def _contrast(self, img, rng):
        if rng.integers(2):
            img = _convert(img, alpha=rng.uniform(*self.contrast_range))
        return img

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        img = image
        if rng.integers(2):
            img = _convert(img, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = rng.integers(2) == 1
        if contrast_first:
            img = self._contrast(img, rng)
        if rng.integers(2):
            hsv = rgb_to_hsv(img)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            img = hsv_to_rgb(hsv)
        if rng.integers(2):
            hsv = rgb_to_hsv(img)
            # numpy's randint(-d, d), as mmseg draws it: the upper bound is exclusive.
            delta = int(rng.integers(-self.hue_delta, self.hue_delta))
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + delta) % 180
            img = hsv_to_rgb(hsv)
        if not contrast_first:
            img = self._contrast(img, rng)
        return img


def normalize(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (H, W, 3) RGB → float32 (3, H, W), ``(x - mean) / std`` per channel."""
    return normalize_pixels(pixels_chw(image), mean, std)


def pixels_chw(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → a (3, H, W) uint8 view of the same memory (no copy)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def normalize_pixels(pixels: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (..., 3, H, W) → float32, ``(x - mean) / std`` per channel (the one normalisation of
    the data pipeline and of window-by-window inference)."""
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device)[:, None, None]
    return pixels.float().sub_(m).div_(s)


def denormalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Inverse of :func:`normalize`: (3, H, W) float → (H, W, 3) uint8."""
    m = torch.tensor(mean)[:, None, None]
    s = torch.tensor(std)[:, None, None]
    x = (image.detach().float().cpu() * s + m).round().clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


# --- pipelines ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainTransform:
    """The recipe's training pipeline. ``scale`` = (long, short) base scale or None (the image's
    own size); ``crop`` = (h, w). Returns image (3, h, w) float32 and label (h, w) int64."""

    crop: tuple[int, int]
    scale: tuple[int, int] | None = None
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: PhotoMetricDistortion | None = PhotoMetricDistortion()
    ignore_index: int = IGNORE_INDEX
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        object.__setattr__(self, "crop", _pair(self.crop, "crop"))
        if self.scale is not None:
            object.__setattr__(self, "scale", _pair(self.scale, "scale"))
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {self.ratio_range}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        check_pair(image, label)
        image, label = random_rescale(image, label, self.scale, self.ratio_range, rng)
        image, label = random_crop(image, label, self.crop, self.cat_max_ratio, rng, self.ignore_index)
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric is not None:
            image = self.photometric(image, rng)
        x = normalize(image, self.mean, self.std)
        y = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        return pad_to(x, y, self.crop, self.ignore_index)


@dataclass(frozen=True)
class TestTransform:
    """Resize with the aspect ratio kept to ``scale`` = (long, short) (None: keep the size) and
    normalise (``normalized=False``: keep uint8 pixels). The label is returned untouched at its original size, as int64."""

    __test__ = False  # not a pytest class, despite the name

    scale: tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # False: the image stays uint8, (3, h, w) (a view when not resized), for inference that
    # normalises one window at a time (fastseg.inference.model_input)
    normalized: bool = True

    def __post_init__(self):
        if self.scale is not None:
            object.__setattr__(self, "scale", _pair(self.scale, "scale"))
        if not self.normalized and (tuple(self.mean), tuple(self.std)) != (IMAGENET_MEAN, IMAGENET_STD):
            raise ValueError("TestTransform(normalized=False) leaves normalisation to inference, which uses the "
                             "ImageNet mean/std; custom mean/std need normalized=True")

    def __call__(self, image: np.ndarray, label: np.ndarray | None = None):
        check_pair(image, label)
        if self.scale is not None:
            image = resize_image(image, rescale_size(*image.shape[:2], self.scale))
        x = normalize(image, self.mean, self.std) if self.normalized else pixels_chw(image)
        y = None if label is None else torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        return x, y
