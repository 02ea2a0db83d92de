"""The decoder's upsample-concat-fuse, rewritten so the 4E-channel concat never exists.

The NVlabs head computes, at 1/4 resolution,
    y = F · concat(up(L₄c₄ + l₄), up(L₃c₃ + l₃), up(L₂c₂ + l₂), L₁c₁ + l₁)
Bilinear upsampling (align_corners=False) commutes with per-pixel linear maps and its weights
sum to 1, so with F = [F₄ F₃ F₂ F₁] split by input block,
    y = Σᵢ up(Pᵢ) + b,    Pᵢ = cᵢ Mᵢᵀ,  Mᵢ = Fᵢ Lᵢ (E×Cᵢ),  b = Σᵢ Fᵢ lᵢ
Each Pᵢ is an E-channel map at its stage's own (small) resolution; one op then resizes, sums,
adds b, and (eval) applies the folded BN + ReLU and the classifier in the same pass.

This module holds that op (:func:`upsample_sum`, backends ``triton`` — one kernel for the forward
with the classifier GEMM in its epilogue, a gather kernel for the resize adjoint — and ``torch``)
and the weight folding (:func:`fold_mlp_head`, :func:`fold_mmseg_head`). The reference is the head's
own eager forward in :mod:`fastseg.models.segformer`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseg.ops import dispatch
from fastseg.ops.packed_linear import linear, packed_weight, weight_in
from fastseg.ops.sr_attention import triton_auto_reasons, triton_device_reasons


def _resize(m: torch.Tensor, out_hw) -> torch.Tensor:
    """(B, h, w, E) channels-last map → (B, H, W, E), bilinear, align_corners=False."""
    if tuple(m.shape[1:3]) == tuple(out_hw):
        return m
    up = F.interpolate(m.permute(0, 3, 1, 2), size=tuple(out_hw), mode="bilinear", align_corners=False)
    return up.permute(0, 2, 3, 1)


def _projected(maps, project, gemm=F.linear):
    """``maps`` with the projection ``x Wᵀ`` of ``project = (x, W)`` computed in front (or as is)."""
    return maps if project is None else [gemm(*project), *maps]


def upsample_sum_reference(maps, out_hw, bias=None, relu=False, classifier_weight=None, classifier_bias=None,
                           project=None):
    """Plain math: s = x Wᵀ + Σ resize(mapᵢ) + bias; ReLU; logits = s Wclsᵀ + bcls.  maps: (B, hᵢ, wᵢ, E)."""
    y = sum(_resize(m, out_hw) for m in _projected(maps, project))
    if bias is not None:
        y = y + bias.to(y.dtype)
    if relu:
        y = torch.relu(y)
    if classifier_weight is not None:
        y = F.linear(y, classifier_weight, classifier_bias)
    return y


BAND_ELEMENTS = 1 << 21  # elements of one (B, rows, W, E) band of the banded inference form (8 MB fp32)


def _resize_rows(m: torch.Tensor, out_hw, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of ``_resize(m, out_hw)``, computed from the source rows they need only:
    the rows are interpolated here (aten's source-index formula), the columns by F.interpolate
    over the band (its row count unchanged, so it only resizes columns, exactly as the full call)."""
    H, W = out_hw
    h, w = m.shape[1:3]
    if h == H:
        band = m[:, r0:r1]
    else:
        scale = torch.tensor(h, dtype=torch.float32) / torch.tensor(H, dtype=torch.float32)
        src = (scale * (torch.arange(r0, r1, dtype=torch.float32) + 0.5) - 0.5).clamp_min_(0).to(m.device)
        i0 = src.floor().long().clamp_(max=h - 1)
        lam = (src - i0).clamp_(0, 1).to(m.dtype)
        i1 = (i0 + 1).clamp_(max=h - 1)
        band = torch.lerp(m.index_select(1, i0), m.index_select(1, i1), lam[None, :, None, None])
    return band if w == W else _resize(band, (r1 - r0, W))


def _upsample_sum_banded(maps, out_hw, bias, relu, classifier_weight, classifier_bias, project):
    """Inference form of :func:`upsample_sum_torch` over bands of output rows: the resized
    E-channel maps (and the projection ``project``) exist one band at a time, and only the result
    is full size (for the classifier form: K channels, not E)."""
    H, W = out_hw
    B, E = _batch_and_channels(maps, project)
    C = E if classifier_weight is None else classifier_weight.shape[0]
    out = (maps[0] if maps else project[0]).new_empty((B, H, W, C), dtype=_compute_dtype(maps, project))
    rows = max(1, BAND_ELEMENTS // max(1, B * W * E))
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        parts = ([linear(project[0][:, r0:r1], project[1])] if project is not None else []) + [
            _resize_rows(m, out_hw, r0, r1) for m in maps]
        y = parts[0] + parts[1] if len(parts) > 1 else parts[0].clone()
        for part in parts[2:]:
            y.add_(part)
        if bias is not None:
            y.add_(bias.to(y.dtype))
        if relu:
            y.relu_()
        if classifier_weight is not None:
            y = linear(y, classifier_weight, classifier_bias)
        out[:, r0:r1] = y
    return out


def _compute_dtype(maps, project) -> torch.dtype:
    """The sum's dtype: the maps', or without maps that of ``F.linear(*project)`` (autocast's)."""
    if maps:
        return maps[0].dtype
    device = project[0].device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else project[0].dtype


def _batch_and_channels(maps, project) -> tuple[int, int]:
    if project is not None:
        return project[0].shape[0], project[1].shape[0]
    return maps[0].shape[0], maps[0].shape[3]


def upsample_sum_torch(maps, out_hw, bias=None, relu=False, classifier_weight=None, classifier_bias=None,
                       project=None):
    """Stock ops on channels-last views: one fresh full-resolution buffer, summed into in place.

    Without autograd (inference), when one resized map is larger than a band, the
    sum runs over bands of output rows instead (:func:`_upsample_sum_banded`; 8 MB bands: measured
    1181 MB peak RSS for a b2 forward at 2048×1024 against 1319 MB with 32 MB bands): at 2048×1024
    a b2's decoder otherwise holds two or three 768-channel maps at 1/4 resolution (0.4 GB each)
    at once. The result matches the unbanded one to rounding (the rows are interpolated by a
    lerp here instead of inside F.interpolate).
    """
    B, E = _batch_and_channels(maps, project)
    if not _needs_grad(maps, bias, classifier_weight, classifier_bias, project) and (
            B * out_hw[0] * out_hw[1] * E > BAND_ELEMENTS and out_hw[0] > 1):
        return _upsample_sum_banded(maps, tuple(out_hw), bias, relu, classifier_weight, classifier_bias, project)
    maps = _projected(maps, project, linear)
    y = _resize(maps[0], out_hw)
    y = y + _resize(maps[1], out_hw) if len(maps) > 1 else y.clone()
    for m in maps[2:]:
        y.add_(_resize(m, out_hw))
    if bias is not None:
        y.add_(bias.to(y.dtype))
    if relu:
        y.relu_()
    if classifier_weight is not None:
        y = linear(y, classifier_weight, classifier_bias)
    return y


# --- triton backend -------------------------------------------------------------------------------

_kernel_module = None


def _kernels():
    """The Triton kernel module, or the ImportError text (imported once)."""
    global _kernel_module
    if _kernel_module is None:
        try:
            from fastseg.kernels import decoder_upsample_fuse as module
        except ImportError as e:
            module = str(e)
        _kernel_module = module
    return _kernel_module


@torch.library.custom_op("fastseg::upsample_sum_fwd", mutates_args=())
def _fwd_op(maps: list[torch.Tensor], H: int, W: int, bias: torch.Tensor | None, relu: bool,
            classifier_weight: torch.Tensor | None, classifier_bias: torch.Tensor | None) -> torch.Tensor:
    return _kernels().upsample_sum_fwd(maps, (H, W), bias, relu, classifier_weight, classifier_bias)


@_fwd_op.register_fake
def _(maps, H, W, bias, relu, classifier_weight, classifier_bias):
    B, E = maps[0].shape[0], maps[0].shape[3]
    return maps[0].new_empty((B, H, W, E if classifier_weight is None else classifier_weight.shape[0]))


@torch.library.custom_op("fastseg::upsample_sum_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Adjoint of the resize for maps of sizes (h₀, w₀, h₁, w₁, …), none of them at full size."""
    shapes = [(sizes[i], sizes[i + 1]) for i in range(0, len(sizes), 2)]
    return _kernels().upsample_sum_bwd(dout, shapes)


@_bwd_op.register_fake
def _(dout, sizes):
    B, _, _, E = dout.shape
    return [dout.new_empty((B, sizes[i], sizes[i + 1], E)) for i in range(0, len(sizes), 2)]


class UpsampleSumFunction(torch.autograd.Function):
    """Forward: the Triton kernel. Backward (the training form: no ReLU, no classifier): dout for
    maps already at full size, the gather adjoint kernel for resized ones, Σ dout for the bias."""

    @staticmethod
    def forward(ctx, H: int, W: int, bias, *maps):
        ctx.sizes = [tuple(m.shape[1:3]) for m in maps]
        ctx.has_bias = bias is not None
        return torch.ops.fastseg.upsample_sum_fwd(list(maps), H, W, bias, False, None, None)

    @staticmethod
    def backward(ctx, dout):
        H, W = dout.shape[1:3]
        resized = [hw for hw in ctx.sizes if hw != (H, W)]
        flat = [v for hw in resized for v in hw]
        adjoints = iter(torch.ops.fastseg.upsample_sum_bwd(dout, flat) if resized else [])
        dmaps = [dout if hw == (H, W) else next(adjoints) for hw in ctx.sizes]
        dbias = dout.sum((0, 1, 2)) if ctx.has_bias else None
        return (None, None, dbias, *dmaps)


def upsample_sum_triton(maps, out_hw, bias=None, relu=False, classifier_weight=None, classifier_bias=None,
                        project=None):
    H, W = out_hw
    maps = _projected(maps, project)
    if relu or classifier_weight is not None:  # inference form: no backward (see _triton_reasons)
        return torch.ops.fastseg.upsample_sum_fwd(maps, H, W, bias, relu, classifier_weight, classifier_bias)
    return UpsampleSumFunction.apply(H, W, bias, *maps)


def _triton_reasons(device: torch.device, dtype: torch.dtype, needs_grad: bool = False,
                    inference_form: bool = False, **_) -> list[str]:
    kernels = _kernels()
    if isinstance(kernels, str):
        return [f"triton is not importable ({kernels})"]
    reasons = [] if dtype in kernels.SUPPORTED_DTYPES else [f"dtype {dtype}"]
    if needs_grad and inference_form:
        reasons.append("the kernel's backward covers the training form (no ReLU/classifier inside)")
    return reasons + triton_device_reasons(device, dtype)


def check_maps(maps, out_hw, project=None) -> None:
    if not isinstance(maps, (list, tuple)) or not (0 if project is not None else 1) <= len(maps) <= 4:
        raise ValueError(f"upsample_sum: expected a list of 1 to 4 maps, got "
                         f"{len(maps) if isinstance(maps, (list, tuple)) else type(maps).__name__}")
    if len(out_hw) != 2 or min(out_hw) < 1:
        raise ValueError(f"upsample_sum: bad output size {out_hw}")
    if project is not None:
        if not isinstance(project, (tuple, list)) or len(project) != 2:
            raise ValueError("upsample_sum: project must be a pair (x (B, H, W, C), weight (E, C))")
        x, weight = project
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:3]) != tuple(out_hw):
            raise ValueError(f"upsample_sum: project's x must be (B, {out_hw[0]}, {out_hw[1]}, C), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != x.shape[3]:
            raise ValueError(f"upsample_sum: project's weight must be (E, {x.shape[3]}), got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    B, E = _batch_and_channels(maps, project)
    first = maps[0] if maps else project[0]
    for i, m in enumerate(maps):
        if not isinstance(m, torch.Tensor) or m.ndim != 4:
            raise ValueError(f"upsample_sum: map {i} must be a (B, h, w, E) tensor")
        if m.shape[0] != B or m.shape[3] != E:
            raise ValueError(f"upsample_sum: map {i} has shape {tuple(m.shape)}, expected batch {B} and {E} channels")
        if m.dtype != first.dtype or m.device != first.device:
            raise TypeError(f"upsample_sum: map {i} is {m.dtype} on {m.device}, expected {first.dtype} on {first.device}")
    if project is not None and (project[0].device != first.device or project[1].device != first.device):
        raise ValueError(f"upsample_sum: project's tensors are on {project[0].device}/{project[1].device}, "
                         f"the maps on {first.device}")


def _needs_grad(maps, bias, classifier_weight, classifier_bias, project) -> bool:
    tensors = [*maps, bias, classifier_weight, classifier_bias, *(project or ())]
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def upsample_sum(maps, out_hw, bias=None, relu=False, classifier_weight=None, classifier_bias=None, project=None):
    """Resize every map to ``out_hw``, sum, add ``bias``, optionally ReLU and a classifier.

    maps: 0–4 tensors (B, hᵢ, wᵢ, E) (channels-last images; a map already at ``out_hw`` is added
    as is); bias: (E,); classifier_weight: (K, E), classifier_bias: (K,); project: an optional
    pair (x (B, H, W, C), weight (E, C)) whose projection ``x weightᵀ`` joins the sum — a map at
    full size that backends may build one band at a time instead of whole.
    Returns (B, H, W, E), or (B, H, W, K) logits with a classifier. Differentiable.
    """
    check_maps(maps, out_hw, project)
    first = maps[0] if maps else project[0]
    impl = dispatch.resolve("decoder_upsample_fuse", device=first.device, dtype=_compute_dtype(maps, project),
                            needs_grad=_needs_grad(maps, bias, classifier_weight, classifier_bias, project),
                            inference_form=relu or classifier_weight is not None)
    return impl(list(maps), tuple(out_hw), bias, relu, classifier_weight, classifier_bias,
                project=None if project is None else tuple(project))


# --- cpp backend (inference) ----------------------------------------------------------------------

CPP_DTYPES = (torch.float32, torch.bfloat16)


def _has_cpp_op() -> bool:
    from fastseg.ops.overlap_patch_embed import extension_op_reasons

    return not extension_op_reasons("decoder_head_fwd")


def upsample_sum_cpp(maps, out_hw, bias=None, relu=False, classifier_weight=None, classifier_bias=None,
                     project=None):
    """The extension's banded head (``csrc/decoder_head_cpu.cpp``): per band of output rows, the
    projection, the bilinear taps of every map, bias + ReLU and the classifier GEMM, so neither
    the full-size E-channel projection nor any resized map exists. Inference only.

    Its two GEMMs run on oneDNN with the weights packed once per version
    (:func:`fastseg.ops.packed_linear.packed_weight`) where oneDNN computes the dtype; weights in
    another dtype than the maps' (autocast) are cast once per version, not per call. While
    torch.compile traces, the dense weights go in (a pack is a runtime cache, not a graph value)."""
    dtype = _compute_dtype(maps, project)
    compiling = torch.compiler.is_compiling()
    cast = (lambda t: t.to(dtype)) if compiling else (lambda t: weight_in(t, dtype))
    pack = (lambda t: None) if compiling else (lambda t: packed_weight(t, dtype))
    x, weight, x_packed = None, None, None
    if project is not None:
        x, weight = project[0].to(dtype).contiguous(), cast(project[1]).contiguous()
        x_packed = pack(project[1])
    cls_w = cls_b = cls_packed = None
    if classifier_weight is not None:
        cls_w, cls_packed = cast(classifier_weight), pack(classifier_weight)
        cls_b = None if classifier_bias is None else cast(classifier_bias)
    packs = () if compiling or not _head_takes_packs() else (x_packed, cls_packed)
    return torch.ops.fastseg_ext.decoder_head_fwd(
        [m.contiguous() for m in maps], x, weight, out_hw[0], out_hw[1],
        None if bias is None else bias.float(), relu, cls_w, cls_b, *packs)


_takes_packs = None


def _head_takes_packs() -> bool:
    """Whether the loaded extension's head takes packed weights (an older build does not)."""
    global _takes_packs
    if _takes_packs is None:
        schema = torch.ops.fastseg_ext.decoder_head_fwd.default._schema
        _takes_packs = any(a.name == "x_weight_packed" for a in schema.arguments)
    return _takes_packs


def _cpp_reasons(device: torch.device, dtype: torch.dtype, needs_grad: bool = False, **_) -> list[str]:
    from fastseg.ops.overlap_patch_embed import extension_op_reasons

    reasons = extension_op_reasons("decoder_head_fwd")
    if reasons:
        return reasons
    if device.type != "cpu":
        reasons.append(f"device type {device.type!r} (the C++ kernel takes CPU tensors)")
    if dtype not in CPP_DTYPES:
        reasons.append(f"dtype {dtype} (the C++ kernel computes float32/bfloat16)")
    if needs_grad:
        reasons.append("no backward (the kernel is the inference form)")
    return reasons


_fake_registered = False


def _register_fake() -> None:
    global _fake_registered
    if _fake_registered or not _has_cpp_op():
        return
    _fake_registered = True

    @torch.library.register_fake("fastseg_ext::decoder_head_fwd")
    def _(maps, x, x_weight, H, W, bias, relu, cls_weight, cls_bias, x_weight_packed=None, cls_weight_packed=None):
        first = x if x is not None else maps[0]
        E = x_weight.shape[0] if x_weight is not None else maps[0].shape[3]
        return first.new_empty((first.shape[0], H, W, E if cls_weight is None else cls_weight.shape[0]))


# --- weight folding ------------------------------------------------------------------------------

def _fold_dtype(dtype: torch.dtype) -> torch.dtype:
    """Fold in fp32 at least (fp64 models keep fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _bn_affine(bn: torch.nn.BatchNorm2d):
    """Eval-mode BN as y·s + t, in the fold precision."""
    dt = _fold_dtype(bn.weight.dtype)
    s = bn.weight.to(dt) * torch.rsqrt(bn.running_var.to(dt) + bn.eps)
    return s, bn.bias.to(dt) - bn.running_mean.to(dt) * s


def fold_mlp_head(linears, fuse_weight: torch.Tensor, bn: torch.nn.BatchNorm2d | None):
    """Mᵢ = Fᵢ Lᵢ and b = Σ Fᵢ lᵢ for the NVlabs head (concat order c4, c3, c2, c1).

    With ``bn`` (eval), its affine is folded into Mᵢ and b. Folding is done in fp32 (fp64 for fp64
    weights) and cast to the weights' dtype once. Differentiable (training builds Mᵢ with autograd).
    Returns ([M₁..M₄] each (E, Cᵢ), b (E,)).
    """
    E = fuse_weight.shape[0]
    dt = _fold_dtype(fuse_weight.dtype)
    fuse = fuse_weight.reshape(E, -1).to(dt)
    n = len(linears)
    Ms, b = [], 0
    for i, lin in enumerate(linears):
        Fi = fuse[:, (n - 1 - i) * E:(n - i) * E]
        Ms.append(Fi @ lin.weight.to(dt))
        b = b + Fi @ lin.bias.to(dt)
    if bn is not None:
        s, t = _bn_affine(bn)
        Ms = [s[:, None] * M for M in Ms]
        b = s * b + t
    dtype = fuse_weight.dtype
    return [M.to(dtype) for M in Ms], b


def fold_mmseg_head(branches, fuse_weight: torch.Tensor, bn: torch.nn.BatchNorm2d | None):
    """mmseg head: per-branch 1×1 conv + BN + ReLU stay at low resolution (the ReLU does not
    commute with the resize); only the fusion conv Fᵢ (concat order c1..c4) moves before it.
    Returns ([F₁..F₄] each (E, E) with ``bn`` folded when given, b (E,) or None)."""
    E = fuse_weight.shape[0]
    fuse = fuse_weight.reshape(E, -1).to(_fold_dtype(fuse_weight.dtype))
    Fs = [fuse[:, i * E:(i + 1) * E] for i in range(len(branches))]
    b = None
    if bn is not None:
        s, t = _bn_affine(bn)
        Fs = [s[:, None] * Fi for Fi in Fs]
        b = t
    return [Fi.to(fuse_weight.dtype) for Fi in Fs], b


dispatch.register_reference("decoder_upsample_fuse", upsample_sum_reference)
dispatch.register("decoder_upsample_fuse", dispatch.Backend(
    "triton", _triton_reasons, upsample_sum_triton, auto_reasons=triton_auto_reasons))
_register_fake()
dispatch.register("decoder_upsample_fuse", dispatch.Backend("cpp", _cpp_reasons, upsample_sum_cpp))
dispatch.register("decoder_upsample_fuse", dispatch.Backend(
    "torch", lambda dtype, **_: [] if dtype.is_floating_point else [f"dtype {dtype}"], upsample_sum_torch))
