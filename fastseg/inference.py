"""Inference modes (whole image, sliding window, multi-scale + flip) and the model factory.

Modes follow mmsegmentation's ``EncoderDecoder``:

- ``whole``: one forward pass; the logits (1/4 resolution for SegFormer) are resized bilinearly
  (align_corners=False) to the input size.
- ``slide``: windows of ``crop`` = (h, w) every ``stride`` = (h, w); the last row/column of
  windows is shifted back to end at the border; each window's logits (resized to the window)
  are added into a full-size map and divided by a count map of how many windows covered each
  pixel. A window never exceeds the image, so a crop at least the image size is ``whole``.
- multi-scale / flip (:func:`segment`): for each scale ratio the image is resized, run in the
  chosen mode (and again flipped horizontally, the output flipped back), the logits resized to
  the output size and turned into softmax probabilities; the probabilities are averaged (the
  ``aug_test`` of mmseg; with one scale and no flip this is just the softmax of ``whole``).

Models may return a tensor, or in training mode ``(main_logits, [aux_logits, …])`` (SETR with
auxiliary heads): inference always uses the main logits.

Labels without full-resolution logits (:func:`segment_labels`, what ``fastseg predict`` and
``fastseg eval`` use): the same labels as :func:`segment` + argmax (the two-step path, kept as
the reference; it holds (B, K, H, W) tensors), without ever making a (B, K, H, W) tensor.

- ``whole``, one pass, output at the input size (``fastseg predict``; Cityscapes eval): the
  logits go straight to the fused :func:`fastseg.ops.upsample_argmax`: one bilinear resize and
  the argmax in one kernel; only the labels are full size.
- ``whole``, one pass, output size ≠ input size (a test scale; labels wanted without scores): the
  two-step's two resizes (logits' grid → input size → output size) and the argmax in
  :func:`fastseg.ops.upsample_argmax.upsample2_argmax`. On CPU its C++ kernel makes the first
  resize a row at a time; elsewhere it holds the logits at the input size, up to
  ``TWO_RESIZE_ELEMENTS``, and bigger ones take the banded path below (same labels, ~10× slower).
- ``slide``, one pass (``fastseg predict --mode slide``): memory bounded by the window, not the
  image. The windows run in raster order; each window's logits stay on their own grid; after
  each row of windows, the input rows no later window covers are final, so the output rows that
  read only final rows are finished band by band (the arithmetic below: sum of the windows'
  resized logits in raster order / count, exactly mmseg's) and the windows no later output row
  needs are dropped. At most the windows of two window rows are held. Not a band of K×crop_h×W
  full-resolution accumulators: the windows' 1/4-grid logits are 16× smaller and give the same
  sums.
- everything else (``slide``, multi-scale / flip, or a ``test_scale`` that makes the output size
  differ from the input size): the passes' logits are kept on their own grids (1/4 of the input
  for SegFormer; for ``slide`` each window's logits), and the labels are made band by band of
  output rows (``BAND_ELEMENTS`` per band): for each band, each pass is evaluated exactly as the
  two-step path evaluates it for the whole image — resized to its input size (``slide``: every
  window resized to its window, summed, divided by the count map, as mmseg does), mirrored back,
  resized to the output size, softmax — averaged, argmax. Only the rows of the band exist at
  full resolution.

Why not accumulate on the 1/4 grid and upsample once: bilinear upsampling commutes with the
window sums only where no window edge clamps the interpolation and the count map is constant
over a pixel's 2×2 cells, and not at all with the softmax of multi-scale averaging, nor with the
two resizes a ``test_scale`` makes. Measured while building this (fixed seeds): that path agreed
with the two-step labels on 99.85–99.92 % of the pixels for slide with a confident model on the
synthetic set (97.3 % with a random tiny SegFormer), 95.4–97.6 % for multi-scale + flip (mIoU
0.614 → 0.699 with six scales), 99.3 % for an output size other than the input's; the banded
evaluation agrees on 100 % in all of them (tests/test_metrics_inference.py).
Images may be given as uint8 pixels (B, 3, H, W) (what ``predict`` and ``eval`` do): each
window, or each pass, is normalised when it runs (:func:`model_input`), so no float copy of the
whole image exists in ``slide`` mode. Labels come in the smallest integer dtype for K
(:func:`label_dtype`); ``return_finite`` says per image whether every logit was finite.

Labels still differ from the two-step ones where rounding decides (near-ties: the band's
row interpolation is a lerp, the fused op's arithmetic is its own; see
:mod:`fastseg.ops.upsample_argmax`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fastseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_pixels

SEGFORMER_VARIANTS = ("b0", "b1", "b2", "b3", "b4", "b5")
MODEL_NAMES = tuple(f"segformer-{v}" for v in SEGFORMER_VARIANTS) + ("setr-naive", "setr-pup", "setr-mla")
TRAIN_CHECKPOINT_FORMAT = "fastseg-train/1"


# --- running a model ----------------------------------------------------------------------------

def main_logits(output) -> torch.Tensor:
    """The main logits of whatever a segmentation model returned."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if isinstance(output, dict):
        output = output.get("logits", output.get("out"))
    if not isinstance(output, torch.Tensor) or output.ndim != 4:
        raise TypeError(f"expected the model to return logits (B, K, h, w); got {type(output).__name__}")
    return output


def whole_inference(model, images: torch.Tensor) -> torch.Tensor:
    """images: (B, 3, H, W) → logits (B, K, H, W), float32."""
    logits = main_logits(model(images)).float()
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits


def _windows(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    n = max(size - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(n):
        end = min(i * stride + crop, size)
        out.append((max(end - crop, 0), end))
    return out


def slide_inference(model, images: torch.Tensor, crop, stride) -> torch.Tensor:
    """images: (B, 3, H, W) → logits (B, K, H, W) averaged over overlapping ``crop`` windows."""
    crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
    stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if min(crop) < 1 or min(stride) < 1:
        raise ValueError(f"crop and stride must be positive, got crop={crop} stride={stride}")
    B, _, H, W = images.shape
    total = count = None
    for y1, y2 in _windows(H, crop[0], stride[0]):
        for x1, x2 in _windows(W, crop[1], stride[1]):
            logits = whole_inference(model, images[:, :, y1:y2, x1:x2])
            if total is None:
                total = logits.new_zeros(B, logits.shape[1], H, W)
                count = logits.new_zeros(1, 1, H, W)
            total[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


def segment(model, images: torch.Tensor, *, mode: str = "whole", crop=None, stride=None,
            scales=(1.0,), flip: bool = False, out_size=None) -> torch.Tensor:
    """Class probabilities (B, K, *out_size) (default: the input size), float32: the two-step
    path (upsample every pass to full resolution, then average). It holds (B, K, H, W) tensors;
    ``fastseg predict`` / ``eval`` use :func:`segment_labels` instead, and this stays as its
    reference (tests compare the two).

    ``scales`` are resize ratios of ``images``; ``flip`` adds a horizontally flipped pass per
    scale. Call under ``torch.no_grad()`` / autocast as needed; the model should be in eval mode.
    """
    scales = _check_segment_args(mode, crop, stride, images, scales)
    H, W = images.shape[-2:]
    out_size = (H, W) if out_size is None else tuple(out_size)
    probs, n = None, 0
    for s in scales:
        x = images
        if s != 1.0:
            size = (max(int(H * s + 0.5), 1), max(int(W * s + 0.5), 1))
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            logits = whole_inference(model, xi) if mode == "whole" else slide_inference(model, xi, crop, stride)
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != out_size:
                logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            p = logits.softmax(dim=1)
            probs = p if probs is None else probs + p
            n += 1
    return probs / n


# --- labels without full-resolution logits ---------------------------------------------------------

def model_logits(model, images: torch.Tensor) -> torch.Tensor:
    """images: (B, 3, H, W) → the model's logits on its own grid (B, K, h, w), float32."""
    return main_logits(model(images)).float()


def label_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds class ids 0..num_classes-1: uint8 up to 256 classes."""
    if num_classes <= 256:
        return torch.uint8
    return torch.int16 if num_classes <= 1 << 15 else torch.int32


def model_input(images: torch.Tensor, region=None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """The model's input for ``region`` = (y1, y2, x1, x2) of ``images`` (None: all of it): float
    images as they are, uint8 pixels normalised (``(x - mean) / std``, as
    :func:`fastseg.data.transforms.normalize`) for that region only."""
    x = images if region is None else images[:, :, region[0]:region[1], region[2]:region[3]]
    return normalize_pixels(x, mean, std) if x.dtype == torch.uint8 else x


def _all_finite(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits).flatten(1).all(1)


def segment_labels(model, images: torch.Tensor, *, mode: str = "whole", crop=None, stride=None,
                   scales=(1.0,), flip: bool = False, out_size=None, return_scores: bool = False,
                   two_step: bool = False, return_finite: bool = False):
    """Class labels (B, *out_size) (default: the input size) with the labels of :func:`segment` (to
    rounding), never holding full-resolution logits (module docstring), in the smallest integer
    dtype that holds the model's classes (:func:`label_dtype`: uint8 up to 256 classes).

    ``images``: (B, 3, H, W) float, normalised, or uint8 pixels — then only one window (``slide``)
    or pass at a time is normalised, so the image is never held as floats beside the model's input.
    With ``return_scores`` also a confidence map (B, *out_size), float32: the winning interpolated
    logit on the fused path, the winning (averaged) probability otherwise. With
    ``return_finite`` also a (B,) bool tensor: whether every logit of each image was finite (labels
    of an image with NaN or Inf logits mean nothing; ``predict`` and ``eval`` report them).
    ``two_step=True`` runs :func:`segment` itself and takes its argmax (holds (B, K, H, W)).
    Call under ``torch.no_grad()`` / autocast as needed; the model should be in eval mode.
    """
    from fastseg.ops import upsample_argmax
    from fastseg.ops.upsample_argmax import upsample2_argmax, upsample2_in_one_pass

    def result(labels, scores, finite):
        out = (labels,) + ((scores,) if return_scores else ()) + ((finite,) if return_finite else ())
        return out if len(out) > 1 else labels

    if two_step:
        probs = segment(model, model_input(images), mode=mode, crop=crop, stride=stride, scales=scales, flip=flip,
                        out_size=out_size)
        best, labels = probs.max(1)
        return result(labels.to(label_dtype(probs.shape[1])), best, _all_finite(probs))
    scales = _check_segment_args(mode, crop, stride, images, scales)
    H, W = images.shape[-2:]
    out_size = (H, W) if out_size is None else tuple(out_size)
    passes = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    single = None  # whole mode, one pass: its logits
    if mode == "whole" and passes == [(1.0, False)]:
        single = model_logits(model, model_input(images))
        if out_size == (H, W):
            # one resize, logits' grid → out_size: the fused op gives the two-step labels
            found = upsample_argmax(single, out_size, return_scores=return_scores)
            labels, scores = found if return_scores else (found, None)
            return result(labels.to(label_dtype(single.shape[1])), scores, _all_finite(single))
        if not return_scores and (upsample2_in_one_pass(single)
                                  or single.shape[0] * single.shape[1] * H * W <= TWO_RESIZE_ELEMENTS):
            # a test scale (output size ≠ input size): the two-step's two resizes (logits' grid → input
            # size → out_size) and the argmax (the softmax changes no argmax). The C++ kernel makes the
            # first resize a row at a time; elsewhere the logits at the input size are made (bounded
            # here; bigger ones go band by band below).
            labels = upsample2_argmax(single, (H, W), out_size).to(label_dtype(single.shape[1]))
            return result(labels, None, _all_finite(single))
    if mode == "slide" and passes == [(1.0, False)]:
        return result(*_slide_labels_streamed(model, images, crop, stride, out_size, return_scores))
    held = []  # per pass: (whole-image logits, or [(window logits, y1, y2, x1, x2)]), input size, flipped
    finite = None
    x_full = model_input(images) if single is None else images  # several passes resize or mirror the whole image
    for s, flipped in passes:
        x = x_full
        if s != 1.0:
            size = (max(int(H * s + 0.5), 1), max(int(W * s + 0.5), 1))
            x = F.interpolate(x_full, size=size, mode="bilinear", align_corners=False)
        if flipped:
            x = x.flip(-1)
        if mode == "whole":
            found = single if single is not None else model_logits(model, x)
            ok = _all_finite(found)
        else:
            found = [(model_logits(model, x[:, :, y1:y2, x1:x2]), y1, y2, x1, x2)
                     for y1, y2, x1, x2 in _window_grid(x.shape[-2:], crop, stride)]
            ok = torch.stack([_all_finite(f[0]) for f in found]).all(0)
        finite = ok if finite is None else finite & ok
        held.append((found, tuple(x.shape[-2:]), flipped))
    del x_full, x
    first = held[0][0] if mode == "whole" else held[0][0][0][0]
    B, K = first.shape[:2]
    labels = torch.empty((B, *out_size), dtype=label_dtype(K), device=images.device)
    scores = torch.empty((B, *out_size), dtype=torch.float32, device=images.device) if return_scores else None
    rows = _band_rows(B, K, max(out_size[1], W))
    for r0 in range(0, out_size[0], rows):
        _finish_band(held, out_size, r0, min(out_size[0], r0 + rows), labels, scores)
    return result(labels, scores, finite)


def _band_rows(B: int, K: int, width: int) -> int:
    return max(1, BAND_ELEMENTS // max(1, B * K * width))


def _finish_band(held, out_size, r0: int, r1: int, labels, scores) -> None:
    """Labels (and scores) of output rows [r0, r1): every pass's rows, softmax, averaged, argmax."""
    probs = None
    for found, in_size, flipped in held:
        p = _pass_rows(found, in_size, out_size, r0, r1, flipped).softmax(dim=1)
        probs = p if probs is None else probs.add_(p)
    best, arg = probs.div_(len(held)).max(1)
    labels[:, r0:r1] = arg
    if scores is not None:
        scores[:, r0:r1] = best


def _slide_labels_streamed(model, images, crop, stride, out_size, return_scores):
    """One slide pass, memory bounded by the windows of two window rows, not the image.

    Windows run in raster order. Input row y is final once every window covering it has run,
    i.e. once the window row after it starts below y; the output rows that need only final input
    rows are then finished in bands (:func:`_finish_band`, the arithmetic of the whole-image
    banded path: each window's logits resized to its window, summed in raster order, divided by
    the count) and the windows no later output row needs are dropped. Returns labels, scores, finite.
    """
    H, W = images.shape[-2:]
    grid = _window_grid((H, W), crop, stride)
    window_rows = sorted({(y1, y2) for y1, y2, _, _ in grid})
    # the input rows each output row reads: [first_in[r], end_in[r])
    if out_size[0] == H:
        first_in = torch.arange(H)
        end_in = first_in + 1
    else:
        j0, j1, _ = _axis_rows(H, out_size[0], torch.arange(out_size[0]))
        first_in, end_in = j0, j1 + 1
    held, finite, labels, scores, done = [], None, None, None, 0
    for i, (y1, y2) in enumerate(window_rows):
        for wy1, wy2, x1, x2 in grid:
            if (wy1, wy2) != (y1, y2):
                continue
            logits = model_logits(model, model_input(images, (wy1, wy2, x1, x2)))
            ok = _all_finite(logits)
            finite = ok if finite is None else finite & ok
            held.append((logits, wy1, wy2, x1, x2))
        if labels is None:
            B, K = logits.shape[:2]
            labels = torch.empty((B, *out_size), dtype=label_dtype(K), device=images.device)
            if return_scores:
                scores = torch.empty((B, *out_size), dtype=torch.float32, device=images.device)
            rows = _band_rows(B, K, max(out_size[1], W))
        final = window_rows[i + 1][0] if i + 1 < len(window_rows) else H  # input rows < final are final
        ready = int(torch.searchsorted(end_in, torch.tensor([final]), right=True))
        for r0 in range(done, ready, rows):
            _finish_band([(held, (H, W), False)], out_size, r0, min(ready, r0 + rows), labels, scores)
        done = ready
        if done < out_size[0]:
            need = int(first_in[done])
            held = [w for w in held if w[2] > need]
    return labels, scores, finite


BAND_ELEMENTS = 1 << 22  # (B, K, rows, W) elements of one band of output rows (16 MB fp32)
# (B, K, H, W) logits at the input size that one whole pass with a test scale may hold (256 MB fp32:
# ADE20K's 150 classes at its 2048x512 test scale, 683x512, fit); that path ran ~10x faster than the
# bands (150 classes, 512x384 → 640x480, 2 threads)
TWO_RESIZE_ELEMENTS = 1 << 26


def _window_grid(size, crop, stride) -> list[tuple[int, int, int, int]]:
    crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
    stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if min(crop) < 1 or min(stride) < 1:
        raise ValueError(f"crop and stride must be positive, got crop={crop} stride={stride}")
    return [(y1, y2, x1, x2) for y1, y2 in _windows(size[0], crop[0], stride[0])
            for x1, x2 in _windows(size[1], crop[1], stride[1])]


def _axis_rows(n_in: int, n_out: int, rows: torch.Tensor):
    """Bilinear (align_corners=False) taps of output positions ``rows`` of an axis resized
    n_in → n_out, with aten's fp32 source-index formula: (i0, i1, λ)."""
    if n_in == n_out:
        return rows, rows, torch.zeros(rows.shape, dtype=torch.float32)
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    src = (scale * (rows.to(torch.float32) + 0.5) - 0.5).clamp_min_(0)
    i0 = src.floor().long().clamp_(max=n_in - 1)
    return i0, (i0 + 1).clamp_(max=n_in - 1), (src - i0).clamp_(0, 1)


def _resize_rows(x: torch.Tensor, n_out: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of the bilinear resize of x (B, K, h, w) along dim 2 to n_out rows."""
    i0, i1, lam = (t.to(x.device) for t in _axis_rows(x.shape[2], n_out, rows))
    if x.shape[2] == n_out:
        return x.index_select(2, i0)
    return torch.lerp(x.index_select(2, i0), x.index_select(2, i1), lam.to(x.dtype)[:, None])


def _resize_cols(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """x (B, K, rows, w) resized along its columns only (the rows are left as they are)."""
    if x.shape[3] == n_out:
        return x
    return F.interpolate(x, size=(x.shape[2], n_out), mode="bilinear", align_corners=False)


def _input_rows(found, in_size, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of a pass's logits at its input size: the whole-image logits resized, or the
    windows' logits each resized to its window, summed and divided by the count (slide)."""
    rows = torch.arange(lo, hi)
    if isinstance(found, torch.Tensor):
        return _resize_cols(_resize_rows(found, in_size[0], rows), in_size[1])
    total = count = None
    for logits, y1, y2, x1, x2 in found:
        a, b = max(lo, y1), min(hi, y2)
        if a >= b:
            continue
        part = _resize_cols(_resize_rows(logits, y2 - y1, torch.arange(a - y1, b - y1)), x2 - x1)
        if total is None:
            total = part.new_zeros(part.shape[0], part.shape[1], hi - lo, in_size[1])
            count = part.new_zeros(1, 1, hi - lo, in_size[1])
        total[:, :, a - lo:b - lo, x1:x2] += part
        count[:, :, a - lo:b - lo, x1:x2] += 1
    return total / count


def _pass_rows(found, in_size, out_size, r0: int, r1: int, flipped: bool) -> torch.Tensor:
    """Output rows [r0, r1) of one pass as :func:`segment` computes it for the whole image (logits
    resized to the pass's input size, mirrored back if flipped, resized to out_size), from the
    rows it needs only."""
    if in_size[0] == out_size[0]:
        lo, hi = r0, r1
        j0 = j1 = lam = None
    else:
        j0, j1, lam = _axis_rows(in_size[0], out_size[0], torch.arange(r0, r1))
        lo, hi = int(j0.min()), int(j1.max()) + 1
    mid = _input_rows(found, in_size, lo, hi)
    if flipped:
        mid = mid.flip(-1)
    if j0 is not None:
        j0, j1, lam = j0.to(mid.device), j1.to(mid.device), lam.to(mid.device, mid.dtype)
        mid = torch.lerp(mid.index_select(2, j0 - lo), mid.index_select(2, j1 - lo), lam[:, None])
    return _resize_cols(mid, out_size[1])


def _check_segment_args(mode, crop, stride, images, scales) -> tuple[float, ...]:
    if mode not in ("whole", "slide"):
        raise ValueError(f"unknown inference mode {mode!r}; choose 'whole' or 'slide'")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError("slide inference needs crop and stride")
    if images.ndim != 4:
        raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}")
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive ratios, got {scales}")
    return scales


# --- building and loading models -------------------------------------------------------------------

def _parse_overrides(overrides) -> dict:
    if overrides is None or overrides == "":
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    text = str(overrides)
    if not text.lstrip().startswith("{") and Path(text).is_file():
        text = Path(text).read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-config must be a JSON object or a JSON file: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--model-config must be a JSON object, got {type(value).__name__}")
    return value


def _setr_class():
    try:
        import fastseg

        return fastseg.SETR
    except (ImportError, AttributeError) as e:
        raise ValueError(
            "SETR is not available in this fastseg installation (fastseg.SETR could not be imported: "
            f"{e}); use --model segformer-b0 … segformer-b5"
        ) from None


def _build_setr(name: str, num_classes: int, init, fused: bool, overrides: dict, img_size):
    """``setr-<decoder>[-<encoder>]``: decoder naive | pup | mla, encoder one of
    ``fastseg.models.setr.ENCODERS`` (default vit_large_patch16, the paper's ViT-L/16)."""
    SETR = _setr_class()
    from fastseg.models.setr import DECODERS, ENCODERS, SETRConfig

    parts = name.split("-", 2)
    decoder = parts[1] if len(parts) > 1 else ""
    encoder = parts[2] if len(parts) > 2 else "vit_large_patch16"
    if decoder not in DECODERS or encoder not in ENCODERS:
        raise ValueError(f"unknown SETR model {name!r}; use setr-<decoder>[-<encoder>] with decoder in "
                         f"{list(DECODERS)} and encoder in {list(ENCODERS)}")
    if init is not None:
        if overrides:
            raise ValueError("--model-config cannot be combined with --init: the checkpoint fixes the architecture")
        return SETR.from_pretrained(init, num_classes=num_classes, decoder=decoder, img_size=img_size, fused=fused)
    dim, depth, heads = ENCODERS[encoder]
    fields = dict(encoder=encoder, decoder=decoder, embed_dim=dim, depth=depth, num_heads=heads,
                  num_classes=num_classes)
    if img_size is not None:
        fields["img_size"] = list(img_size)
    if overrides and "encoder" not in overrides and {"embed_dim", "depth", "num_heads"} & set(overrides):
        fields["encoder"] = None  # a custom ViT
    fields.update(overrides)
    fields["num_classes"] = num_classes
    return SETR(config=SETRConfig.from_dict(fields), fused=fused)


def build_model(name: str | None, num_classes: int, *, init=None, fused: bool = False, overrides=None,
                img_size=None):
    """A segmentation model by name: ``segformer-b0`` … ``segformer-b5`` or
    ``setr-<naive|pup|mla>[-<vit encoder>]``.

    ``init``: a checkpoint ``SegFormer.from_pretrained`` (or ``SETR.from_pretrained``) reads, e.g.
    an ImageNet MiT / ViT backbone; the classifier is built for ``num_classes``. ``overrides``:
    config fields (:class:`fastseg.SegFormerConfig` / ``SETRConfig``) as a dict, JSON text or a
    JSON file, for custom sizes. ``img_size``: SETR's training size (position-embedding grid).
    SETR is imported only when asked for.
    """
    overrides = _parse_overrides(overrides)
    if name is not None and name.startswith("setr"):
        return _build_setr(name, num_classes, init, fused, overrides, img_size)

    from fastseg import SegFormer, SegFormerConfig

    variant = None
    if name is not None:
        if not name.startswith("segformer-") or name[len("segformer-"):] not in SEGFORMER_VARIANTS:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
        variant = name[len("segformer-"):]
    if init is not None:
        if overrides:
            raise ValueError("--model-config cannot be combined with --init: the checkpoint fixes the architecture")
        model = SegFormer.from_pretrained(init, num_classes=num_classes, fused=fused)
        if variant is not None and model.variant is not None and model.variant != variant:
            raise ValueError(f"--init {init} holds a SegFormer-{model.variant}, but --model is {name}")
        return model
    cfg = SegFormerConfig.from_variant(variant or "b0", num_classes=num_classes)
    if overrides:
        known = set(SegFormerConfig.__dataclass_fields__)
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"unknown SegFormerConfig fields in --model-config: {bad}")
        merged = cfg.to_dict()
        merged.update(overrides)
        merged["num_classes"] = num_classes
        if "variant" not in overrides:
            from fastseg.models.config import variant_of

            merged["variant"] = variant_of(merged["embed_dims"], merged["depths"])
        cfg = SegFormerConfig.from_dict(merged)
    return SegFormer(config=cfg, fused=fused)


def model_config_dict(model) -> dict | None:
    cfg = getattr(model, "config", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else None


def rebuild_model(model_name: str, model_config: dict | None, num_classes: int):
    """The architecture a training checkpoint was made with (weights not loaded)."""
    if model_name and model_name.startswith("setr"):
        SETR = _setr_class()
        if model_config:
            from fastseg.models.setr import SETRConfig

            return SETR(config=SETRConfig.from_dict(model_config))
        return build_model(model_name, num_classes)
    from fastseg import SegFormer, SegFormerConfig

    if model_config:
        return SegFormer(config=SegFormerConfig.from_dict(model_config))
    return build_model(model_name, num_classes)


def is_train_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == TRAIN_CHECKPOINT_FORMAT


def load_model(checkpoint, *, model_name: str | None = None, num_classes: int | None = None):
    """A model for inference from a ``fastseg train`` checkpoint, a ``save_pretrained`` folder, or
    any checkpoint ``SegFormer.from_pretrained`` (``SETR.from_pretrained`` for ``setr-…``) reads.
    Returns ``(model, info)`` where info holds what the checkpoint says about its training data."""
    from fastseg.io import load_weights_file

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file() and path.suffix.lower() in (".pth", ".pt", ".ckpt"):
        obj, _ = load_weights_file(path)
        if is_train_checkpoint(obj):
            model = rebuild_model(obj["model_name"], obj.get("model_config"), obj["num_classes"])
            model.load_state_dict(obj["model"])
            info = {"dataset": obj.get("dataset"), "class_names": obj.get("class_names"),
                    "iteration": obj.get("iteration"), "model_name": obj["model_name"]}
            return model, info
    if model_name is not None and model_name.startswith("setr"):
        return _setr_class().from_pretrained(path, num_classes=num_classes), {}
    from fastseg import SegFormer

    return SegFormer.from_pretrained(path, num_classes=num_classes), {}
