"""Fused bilinear upsample + argmax over classes: full-resolution labels without full-resolution logits.

    labels = F.interpolate(logits, size, mode="bilinear", align_corners=False).argmax(1)
    scores = the winning interpolated logit at each pixel (``return_scores=True``)

logits: (B, K, h, w), any strides (the eager SegFormer returns NCHW, the fused one a channels-last
view); size = (H, W); labels: (B, H, W) int64; scores: (B, H, W) in the logits' dtype. Ties go to the first maximum and NaN counts as the
maximum, as ``torch.argmax``.

Non-finite logits, on every backend: a pixel whose interpolated classes hold a NaN gets the
*first* NaN class (torch.argmax's rule: NaN beats +Inf; so an all-NaN image, what a NaN input
pixel makes of SegFormer's logits, is labelled 0 everywhere) and the score NaN; otherwise the
first maximum, +Inf included. The interpolated values are F.interpolate's, non-finite ones
included: a tap of weight 0 still multiplies (0 · Inf = NaN), so an Inf logit also turns into NaN
at the output pixels whose bilinear stencil reaches it with weight 0 — the two-step path does the
same. tests/test_nonfinite.py checks every backend against the reference.

Backends (:mod:`fastseg.ops.dispatch`):

- ``triton``: ``fastseg.kernels.upsample_argmax`` — one program per output row and column block,
  running max over K in registers (GPU; CPU tensors under Triton's interpreter). fp32/fp16/bf16.
  Custom op ``fastseg::upsample_argmax_fwd`` with a fake implementation (as the extension's
  ``fastseg_ext::upsample_argmax_fwd``), so ``torch.compile`` traces either without a graph break.
- ``cpp``: the extension's C++ kernel ``fastseg_ext::upsample_argmax_fwd``
  (``csrc/upsample_argmax_cpu.cpp``), rows over threads. fp32/fp64.
- reference: the two-step version itself, run over chunks of 64 classes with a running maximum,
  so it holds one (B, 64, H, W) slice at a time instead of (B, K, H, W); its labels are exactly
  those of the unchunked two-step (see :func:`upsample_argmax_reference`).

Exactness. The kernels reproduce ATen's bilinear formula (the fp32 source index ``scale·(y + ½) − ½``
with ``scale = h/H`` as float, λ₀ = 1 − λ₁, columns mixed before rows), with the fused
multiply-adds written out. ATen's own result is not one fixed arithmetic: its CPU kernels are
compiled per CPU capability with floating-point contraction on (in torch 2.13's AVX-512 build the
source index is an FMA, the mixes partly), channels-last input takes a different kernel (weights
multiplied out first), and GPUs contract differently again. So the kernels agree with
F.interpolate to a few ulps, not bit for bit, and their labels can differ from the two-step
labels only where the two best classes are that close: tests/test_upsample_argmax.py checks that
every disagreement is such a near-tie. The reference has no such gap.

No backward: the op is for inference. Its outputs never require grad (labels are integers;
scores are computed as under ``torch.no_grad()``); asking for a gradient of them raises the
usual "does not require grad" error.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseg.ops import dispatch
from fastseg.ops.sr_attention import triton_auto_reasons, triton_device_reasons

OP = "upsample_argmax"
CPP_DTYPES = (torch.float32, torch.float64)
REFERENCE_CHUNK = 64  # classes per slice; a multiple of every SIMD width, see upsample_argmax_reference


def _size(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2:
        raise ValueError(f"upsample_argmax: size must be (H, W), got {size!r}")
    H, W = (int(v) for v in size)
    if H < 1 or W < 1:
        raise ValueError(f"upsample_argmax: size must be positive, got {(H, W)}")
    return H, W


def check_inputs(logits, size) -> tuple[int, int]:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"upsample_argmax: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != 4:
        raise ValueError(f"upsample_argmax: logits must be (B, K, h, w), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"upsample_argmax: logits must be floating point, got {logits.dtype}")
    if min(logits.shape[1:]) < 1:
        raise ValueError(f"upsample_argmax: logits need at least one class and one pixel, got {tuple(logits.shape)}")
    return _size(size)


@torch.no_grad()
def upsample_argmax_reference(logits: torch.Tensor, size, *, return_scores: bool = False):
    """The two-step version: ``F.interpolate(...).argmax(1)``, over slices of 64 classes.

    Each slice is resized in the logits' own memory format, its maximum compared with the running
    one (strictly greater wins, so ties keep the earlier class, as argmax does; NaN wins once).
    Slices start at multiples of 64, so ATen's vectorised channels-last kernel puts every class in
    the same SIMD lane or scalar tail as in the unchunked call: the values, and so the labels, are
    those of the unchunked two-step. Peak extra memory: one (B, 64, H, W) slice.
    """
    H, W = _size(size)
    B, K = logits.shape[:2]
    best = arg = None
    fmt = torch.channels_last if (logits.is_contiguous(memory_format=torch.channels_last)
                                  and not logits.is_contiguous()) else torch.contiguous_format
    for k0 in range(0, K, REFERENCE_CHUNK):
        part = logits[:, k0:k0 + REFERENCE_CHUNK].contiguous(memory_format=fmt)
        up = F.interpolate(part, size=(H, W), mode="bilinear", align_corners=False)
        value, index = up.max(1)  # first maximum within the slice; NaN counts as the maximum
        del up
        if best is None:
            best, arg = value, index
            continue
        take = (value > best) | (value.isnan() & ~best.isnan())
        best = torch.where(take, value, best)
        arg = torch.where(take, index + k0, arg)
    arg = arg.to(torch.int64)
    return (arg, best) if return_scores else arg


# --- cpp backend -----------------------------------------------------------------------------------

def _extension():
    from fastseg.ops.overlap_patch_embed import extension

    return extension()


def _has_cpp_op() -> bool:
    ext = _extension()
    if isinstance(ext, str):
        return False
    return hasattr(torch.ops.fastseg_ext, "upsample_argmax_fwd")


_fake_registered = False


def _register_fake() -> None:
    global _fake_registered
    if _fake_registered or not _has_cpp_op():
        return
    _fake_registered = True

    @torch.library.register_fake("fastseg_ext::upsample_argmax_fwd")
    def _(logits, H, W, return_scores):
        B = logits.shape[0]
        return (logits.new_empty((B, H, W), dtype=torch.int64),
                logits.new_empty((B if return_scores else 0, H, W)))


def upsample_argmax_cpp(logits, size, *, return_scores=False):
    H, W = _size(size)
    labels, scores = torch.ops.fastseg_ext.upsample_argmax_fwd(logits.detach(), H, W, bool(return_scores))
    return (labels, scores) if return_scores else labels


def _cpp_reasons(device: torch.device, dtype: torch.dtype, **_) -> list[str]:
    ext = _extension()
    if isinstance(ext, str):
        return [f"extension not built ({ext})"]
    if not _has_cpp_op():
        return ["the built extension predates upsample_argmax; rebuild with `pip install --no-build-isolation -e .`"]
    reasons = []
    if device.type != "cpu":
        reasons.append(f"device type {device.type!r} (the C++ kernel takes CPU tensors)")
    if dtype not in CPP_DTYPES:
        reasons.append(f"dtype {dtype} (the C++ kernel computes in float32/float64)")
    return reasons


# --- triton backend --------------------------------------------------------------------------------

_kernel_module = None


def _kernels():
    global _kernel_module
    if _kernel_module is None:
        try:
            from fastseg.kernels import upsample_argmax as module
        except ImportError as e:
            module = str(e)
        _kernel_module = module
    return _kernel_module


@torch.library.custom_op("fastseg::upsample_argmax_fwd", mutates_args=())
def _triton_op(logits: torch.Tensor, H: int, W: int, return_scores: bool) -> tuple[torch.Tensor, torch.Tensor]:
    labels, scores = _kernels().upsample_argmax_fwd(logits, (H, W), return_scores)
    # custom ops return tensors only: an empty (0, H, W) stands for "no scores"
    return labels, scores if scores is not None else logits.new_empty((0, H, W))


@_triton_op.register_fake
def _(logits, H, W, return_scores):
    B = logits.shape[0]
    return logits.new_empty((B, H, W), dtype=torch.int64), logits.new_empty((B if return_scores else 0, H, W))


def upsample_argmax_triton(logits, size, *, return_scores=False):
    H, W = _size(size)
    labels, scores = torch.ops.fastseg.upsample_argmax_fwd(logits.detach(), H, W, bool(return_scores))
    return (labels, scores) if return_scores else labels


def _triton_reasons(device: torch.device, dtype: torch.dtype, **_) -> list[str]:
    kernels = _kernels()
    if isinstance(kernels, str):
        return [f"triton is not importable ({kernels})"]
    reasons = [] if dtype in kernels.SUPPORTED_DTYPES else [f"dtype {dtype}"]
    return reasons + triton_device_reasons(device, dtype)


# --- the op ----------------------------------------------------------------------------------------

def upsample_argmax(logits: torch.Tensor, size, *, return_scores: bool = False):
    """Labels of the bilinear (align_corners=False) upsampling of ``logits`` to ``size``.

    logits: (B, K, h, w) float, any strides; size: (H, W) (or one int). Returns labels (B, H, W)
    int64, and with ``return_scores=True`` also the winning interpolated logit (B, H, W): a
    confidence map (``labels, scores``). Inference only (no backward; see the module docstring).
    """
    H, W = check_inputs(logits, size)
    if logits.shape[0] == 0:
        labels = torch.empty((0, H, W), dtype=torch.int64, device=logits.device)
        return (labels, logits.new_empty((0, H, W))) if return_scores else labels
    with torch.no_grad():
        impl = dispatch.resolve(OP, device=logits.device, dtype=logits.dtype)
        return impl(logits, (H, W), return_scores=return_scores)


def upsample2_in_one_pass(logits: torch.Tensor) -> bool:
    """Whether :func:`upsample2_argmax` runs on these logits without making the intermediate."""
    return (dispatch.choose(OP, device=logits.device, dtype=logits.dtype).backend == "cpp"
            and hasattr(torch.ops.fastseg_ext, "upsample2_argmax_fwd"))


def upsample2_argmax(logits: torch.Tensor, mid_size, size) -> torch.Tensor:
    """Labels of two chained bilinear resizes, ``logits`` → ``mid_size`` → ``size``, then the
    argmax: the two-step labels of a test scale (logits to the network input's size, then to the
    image's), as ``upsample_argmax(F.interpolate(logits, mid_size, ...), size)``.

    Where the ``cpp`` backend serves these logits (CPU, fp32/fp64, nothing else forced), one C++
    pass makes the first resize a row at a time as the second reads it, so the (B, K, *mid_size)
    tensor never exists; elsewhere it is made and handed to :func:`upsample_argmax`. Labels agree
    with the two-step ones as :func:`upsample_argmax`'s do (near-ties aside: module docstring).
    Returns (B, H, W) int64.
    """
    H1, W1 = _size(mid_size)
    H, W = check_inputs(logits, size)
    with torch.no_grad():
        if upsample2_in_one_pass(logits):
            return torch.ops.fastseg_ext.upsample2_argmax_fwd(logits.detach(), H1, W1, H, W)
        mid = F.interpolate(logits, size=(H1, W1), mode="bilinear", align_corners=False)
        return upsample_argmax(mid, (H, W))


_register_fake()
dispatch.register_reference(OP, upsample_argmax_reference)
dispatch.register(OP, dispatch.Backend(
    "triton", _triton_reasons, upsample_argmax_triton, auto_reasons=lambda device, **_: triton_auto_reasons(device)))
dispatch.register(OP, dispatch.Backend("cpp", _cpp_reasons, upsample_argmax_cpp))
