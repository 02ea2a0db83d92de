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
``fastseg eval`` use): everything is accumulated on the logits' own grid (1/4 of the image for
SegFormer) and upsampled once, by the fused :func:`fastseg.ops.upsample_argmax`, so no
(B, K, H, W) full-resolution tensor is ever made.

- ``whole``: labels = upsample_argmax(logits, out_size) — one bilinear resize from the logits'
  grid straight to ``out_size``.
- ``slide``: each window's logits are added into a grid for the whole image with a count map
  (mmseg's averaging), window by window. A grid cell takes a window's value at the cell's centre,
  read off the window's own bilinear upsampling; when windows start on multiples of the
  logits' stride (4) and span a multiple of it, that is the window's own cell, copied exactly.
  Then grid / count is upsampled once.
- multi-scale / flip: each pass's softmax probabilities are resized (and mirrored back) onto
  the grid of the unscaled image and averaged there (mmseg's ``aug_test`` averages softmax
  probabilities too), then upsampled once.

How this differs from :func:`segment` (the two-step path, kept as the reference: it holds
(B, K, H, W)): bilinear upsampling is linear, so it commutes with the window sums and the
count division wherever the count is constant over a pixel's 2×2 neighbourhood of cells and no
window edge clamps the interpolation; labels then differ only at near-ties (rounding). They can
differ within about one cell (4 px) of window edges (a window's own upsampling clamps at its
edge; the whole-image one interpolates across it into the neighbour window), where a
``test_scale`` makes the two-step path resize twice (to the resized input, then to
``out_size``) instead of once, and with several passes, where the softmax is taken before the
upsampling instead of after it. tests/test_metrics_inference.py measures the agreement.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

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
    if mode not in ("whole", "slide"):
        raise ValueError(f"unknown inference mode {mode!r}; choose 'whole' or 'slide'")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError("slide inference needs crop and stride")
    if images.ndim != 4:
        raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}")
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive ratios, got {scales}")
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


def _cell_taps(cells: int, size: int, start: int, stop: int, crop: int, crop_cells: int):
    """Which cells of the image grid (``cells`` over ``size`` pixels) the window [start, stop)
    covers, and how to read them off the window's own grid (``crop_cells`` over ``crop`` pixels).

    Cell j's centre sits at pixel (j + ½)·size/cells − ½ (align_corners=False); the window owns
    the centres in [start − ½, stop − ½) and gives each the value of its own bilinear
    upsampling there. Returns (j0, j1, i0, i1, l1): cells j0…j1-1 take (1 − l1)·win[i0] + l1·win[i1].
    """
    j = torch.arange(cells, dtype=torch.float64)
    centre = (j + 0.5) * (size / cells) - 0.5
    inside = (centre >= start - 0.5) & (centre < stop - 0.5)
    js = inside.nonzero().flatten()
    if js.numel() == 0:  # a window narrower than a cell owns no cell centre
        return None
    j0, j1 = int(js[0]), int(js[-1]) + 1
    src = (centre[j0:j1] - start + 0.5) * (crop_cells / crop) - 0.5
    near = src.round()
    src = torch.where((src - near).abs() < 1e-6, near, src).clamp(0, crop_cells - 1)
    i0 = src.floor().long()
    l1 = src - i0
    i1 = (i0 + 1).clamp(max=crop_cells - 1)
    return j0, j1, i0, i1, l1.float()


def _read_window(logits: torch.Tensor, taps_h, taps_w) -> torch.Tensor:
    """The window's logits (B, K, hc, wc) at the cell centres it covers (exact copies when aligned)."""
    _, _, i0, i1, l1 = taps_h
    if (l1 == 0).all():
        out = logits.index_select(2, i0)
    else:
        out = torch.lerp(logits.index_select(2, i0), logits.index_select(2, i1), l1[:, None])
    _, _, i0, i1, l1 = taps_w
    if (l1 == 0).all():
        return out.index_select(3, i0)
    return torch.lerp(out.index_select(3, i0), out.index_select(3, i1), l1)


def slide_logits(model, images: torch.Tensor, crop, stride) -> torch.Tensor:
    """images: (B, 3, H, W) → logits on the grid of the whole image (B, K, h, w), averaged over the
    overlapping ``crop`` windows (count map), accumulated window by window at that resolution."""
    crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
    stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if min(crop) < 1 or min(stride) < 1:
        raise ValueError(f"crop and stride must be positive, got crop={crop} stride={stride}")
    B, _, H, W = images.shape
    total = count = None
    for y1, y2 in _windows(H, crop[0], stride[0]):
        for x1, x2 in _windows(W, crop[1], stride[1]):
            logits = model_logits(model, images[:, :, y1:y2, x1:x2])
            hc, wc = logits.shape[-2:]
            if total is None:  # the image's grid: the windows' cells per pixel, over the image
                gh, gw = math.ceil(H * hc / (y2 - y1) - 1e-9), math.ceil(W * wc / (x2 - x1) - 1e-9)
                total = logits.new_zeros(B, logits.shape[1], gh, gw)
                count = logits.new_zeros(1, 1, gh, gw)
            th = _cell_taps(total.shape[2], H, y1, y2, y2 - y1, hc)
            tw = _cell_taps(total.shape[3], W, x1, x2, x2 - x1, wc)
            if th is None or tw is None:
                continue
            total[:, :, th[0]:th[1], tw[0]:tw[1]] += _read_window(logits, th, tw)
            count[:, :, th[0]:th[1], tw[0]:tw[1]] += 1
    return total.div_(count.clamp_min_(1))


def segment_labels(model, images: torch.Tensor, *, mode: str = "whole", crop=None, stride=None,
                   scales=(1.0,), flip: bool = False, out_size=None, return_scores: bool = False,
                   two_step: bool = False):
    """Class labels (B, *out_size) int64 (default: the input size), never holding full-resolution
    logits (see the module docstring for how it accumulates and how it differs from :func:`segment`).
    ``two_step=True`` runs the previous path instead (:func:`segment`, then argmax: mmseg's
    arithmetic, holding (B, K, H, W); scores are then the winning probability).

    With ``return_scores`` also a confidence map (B, *out_size): the winning interpolated logit
    (one pass) or the winning averaged probability (several scales / flip).
    Call under ``torch.no_grad()`` / autocast as needed; the model should be in eval mode.
    """
    from fastseg.ops import upsample_argmax

    if two_step:
        probs = segment(model, images, mode=mode, crop=crop, stride=stride, scales=scales, flip=flip,
                        out_size=out_size)
        best, labels = probs.max(1)
        return (labels, best) if return_scores else labels
    scales = _check_segment_args(mode, crop, stride, images, scales)
    H, W = images.shape[-2:]
    out_size = (H, W) if out_size is None else tuple(out_size)
    passes = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    passes.sort(key=lambda p: p[0] != 1.0)  # the unscaled pass first: its grid is the common one

    def run(x):
        return model_logits(model, x) if mode == "whole" else slide_logits(model, x, crop, stride)

    if len(passes) == 1 and passes[0] == (1.0, False):
        return upsample_argmax(run(images), out_size, return_scores=return_scores)
    probs, grid = None, None
    for s, flipped in passes:
        x = images
        if s != 1.0:
            size = (max(int(H * s + 0.5), 1), max(int(W * s + 0.5), 1))
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        logits = run(x.flip(-1) if flipped else x)
        if flipped:
            logits = logits.flip(-1)
        if grid is None:  # the grid the model gives the unscaled image
            grid = (max(round(logits.shape[-2] / s), 1), max(round(logits.shape[-1] / s), 1))
        p = logits.softmax(dim=1)
        del logits
        if tuple(p.shape[-2:]) != grid:
            p = F.interpolate(p, size=grid, mode="bilinear", align_corners=False)
        probs = p if probs is None else probs.add_(p)
    return upsample_argmax(probs.div_(len(passes)), out_size, return_scores=return_scores)


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
