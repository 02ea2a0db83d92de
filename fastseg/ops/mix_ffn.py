"""The Mix-FFN of a SegFormer block, whole: fc1 → depthwise 3×3 conv + bias → GELU → fc2, on tokens.

    y = fc2(GELU(dwconv3x3(fc1(x)) + dw_bias))      x: (B, N, C), hidden (B, N, Ch), y: (B, N, Co)

with N = H·W tokens of an H×W map, zero padding 1, exact (erf) or tanh GELU, and fc2's bias
optional (the fused Block adds it later, in ``add_layer_norm``).

Backends:

- ``cpp`` (CPU inference, fp32 / bf16): the extension's ``fastseg_ext::mix_ffn_fwd``
  (``csrc/mix_ffn_cpu.cpp``): per task a band of image rows of one image, walked in tiles of rows
  sized to L2; per tile fc1 (aten GEMM, or oneDNN with a packed weight) → dwconv + bias + GELU
  (the dwconv3x3_gelu kernel's code) → fc2 into the output, so the 4C-channel hidden tensor is
  never written to memory. bf16 runs its GEMMs in bf16 where the CPU has a fast bf16 GEMM
  (AVX-512 / AMX: oneDNN) and in fp32 on a converted tile elsewhere. Forward only: not chosen
  automatically when a gradient is needed (training keeps the ``torch`` backend); forced with
  ``use_backend("cpp")`` while training it runs the ``torch`` composition, whose dwconv step is
  then the cpp kernel.
- ``torch``: the composition the fused model used before: fc1 without its bias into
  :func:`fastseg.ops.dwconv3x3_gelu` (which adds it in-kernel where its backend can, else fc1 keeps
  it), then fc2. Its dwconv step picks its own backend (Triton on GPUs, cpp / torch on CPU).
- reference: eager ``fc1`` → :func:`dwconv3x3_gelu_reference` → ``fc2``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseg.ops import dispatch, packed_linear
from fastseg.ops.dwconv3x3_gelu import GELU_FORMS, dwconv3x3_gelu, dwconv3x3_gelu_reference, folds_in_bias

OP = "mix_ffn"
CPP_DTYPES = (torch.float32, torch.bfloat16)


def mix_ffn_reference(x, H: int, W: int, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias,
                      approximate: str = "none", **_) -> torch.Tensor:
    """The eager composition: Linear, the official dwconv + GELU, Linear (packed weights ignored)."""
    h = dwconv3x3_gelu_reference(F.linear(x, fc1_weight, fc1_bias), H, W, dw_weight, dw_bias, approximate)
    return F.linear(h, fc2_weight, fc2_bias)


def mix_ffn_torch(x, H: int, W: int, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias,
                  approximate: str = "none", **_) -> torch.Tensor:
    """Stock GEMMs around the fused dwconv3x3_gelu op (the fused model's path before the cpp kernel)."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if folds_in_bias(x.device, dtype):
        # fc1 without its bias: the C++ kernel adds it to the conv's input taps, saving the pass in
        # which addmm copies the bias into the whole (B, N, 4C) output.
        h = dwconv3x3_gelu(packed_linear.linear(x, fc1_weight), H, W, dw_weight, dw_bias, approximate,
                           in_bias=fc1_bias)
    else:
        h = dwconv3x3_gelu(packed_linear.linear(x, fc1_weight, fc1_bias), H, W, dw_weight, dw_bias, approximate)
    return packed_linear.linear(h, fc2_weight, fc2_bias)


# --- cpp backend -----------------------------------------------------------------------------------

def _has_cpp_op() -> bool:
    from fastseg.ops.overlap_patch_embed import extension_op_reasons

    return not extension_op_reasons("mix_ffn_fwd")


_fast_bf16_gemm: bool | None = None


def fast_bf16_gemm() -> bool:
    """Whether this CPU runs bf16 GEMMs fast (oneDNN's AVX-512 / AVX512-BF16 / AMX kernels; aten's
    bf16 matmul goes there). Without it (AVX2 CPUs) aten's bf16 GEMM measured 4–11 GFLOP/s against
    ~85 in fp32 on a Zen 3, so the cpp kernel converts the tile and runs its GEMMs in fp32."""
    global _fast_bf16_gemm
    if _fast_bf16_gemm is None:
        try:
            _fast_bf16_gemm = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _fast_bf16_gemm = False
    return _fast_bf16_gemm


_cpp_fake_registered = False


def _register_cpp_fake() -> None:
    global _cpp_fake_registered
    if _cpp_fake_registered or not _has_cpp_op():
        return
    _cpp_fake_registered = True

    @torch.library.register_fake("fastseg_ext::mix_ffn_fwd")
    def _(x, H, W, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, approximate, tile_rows,
          fp32_gemm, fc1_packed=None, fc2_packed=None):
        return x.new_empty((x.shape[0], x.shape[1], fc2_weight.shape[0]))  # the kernel writes contiguous y


def mix_ffn_cpp(x, H: int, W: int, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias,
                approximate: str = "none", fc1_packed=None, fc2_packed=None, *, tile_rows: int = 0,
                fp32_gemm: bool | None = None) -> torch.Tensor:
    """The ``cpp`` backend (inference). Under CPU autocast x is cast to the autocast dtype first, as
    fc1 would; the weights may stay fp32 (the kernel casts them once per call unless packed).
    tile_rows: 0 = sized to L2 by the kernel; fp32_gemm: None = unless the CPU has a fast bf16 GEMM."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
            x, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias)):
        # forced while training (see _cpp_auto_reasons): the differentiable composition
        return mix_ffn_torch(x, H, W, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, approximate)
    if torch.is_autocast_enabled("cpu"):
        x = x.to(torch.get_autocast_dtype("cpu"))
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    if fp32_gemm is None:
        fp32_gemm = x.dtype == torch.bfloat16 and not fast_bf16_gemm()
    if fc1_packed is None and fc2_packed is None and not torch.compiler.is_compiling():
        # oneDNN-packed weights where packed_linear routes this GEMM dtype to oneDNN (cached per
        # weight version); under torch.compile the kernel takes the dense weights.
        gemm_dtype = torch.float32 if fp32_gemm else x.dtype
        if not packed_linear.reasons(gemm_dtype):
            fc1_packed = packed_linear.packed_weight(fc1_weight, gemm_dtype)
            fc2_packed = packed_linear.packed_weight(fc2_weight, gemm_dtype)
    return torch.ops.fastseg_ext.mix_ffn_fwd(x, H, W, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias,
                                             approximate, tile_rows, fp32_gemm, fc1_packed, fc2_packed)


def _cpp_reasons(device: torch.device, dtype: torch.dtype, needs_grad: bool = False, **_) -> list[str]:
    from fastseg.ops.overlap_patch_embed import extension_op_reasons

    reasons = extension_op_reasons("mix_ffn_fwd")
    if reasons:
        return reasons
    if device.type != "cpu":
        reasons.append(f"device type {device.type!r} (the C++ kernel takes CPU tensors)")
    if dtype not in CPP_DTYPES:
        reasons.append(f"dtype {dtype} (the C++ kernel computes float32 and bfloat16)")
    return reasons


def _cpp_auto_reasons(needs_grad: bool = False, **_) -> list[str]:
    """The tiled kernel is inference-only: with a gradient the automatic choice is ``torch``. A
    forced ``cpp`` still runs (training), as that composition: its dwconv step is the cpp kernel."""
    return ["a gradient is needed (the C++ kernel is inference-only; training uses the torch backend)"] if needs_grad \
        else []


def check_inputs(x, H: int, W: int, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias,
                 approximate: str) -> None:
    """Ranks, shapes, dtypes and devices, named in the error. Parameters may be x's dtype or
    float32 (autocast gives bf16 activations with fp32 parameters)."""
    where = "mix_ffn"
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise ValueError(f"{where}: x must be tokens (B, N, C), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: x must be floating point, got {x.dtype}")
    B, N, C = x.shape
    if H * W != N:
        raise ValueError(f"{where}: {N} tokens do not form a {H}x{W} map")
    if x.numel() == 0:
        raise ValueError(f"{where}: empty input, x has shape {tuple(x.shape)}")
    if not isinstance(approximate, str) or approximate not in GELU_FORMS:
        raise ValueError(f"{where}: approximate must be one of {GELU_FORMS}, got {approximate!r}")
    for name, t in (("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise ValueError(f"{where}: {name} must be a Linear weight (out, in), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    Ch, Co = fc1_weight.shape[0], fc2_weight.shape[0]
    shapes = (("fc1_weight", fc1_weight, (Ch, C)), ("fc1_bias", fc1_bias, (Ch,)), ("dw_weight", dw_weight, (Ch, 1, 3, 3)),
              ("dw_bias", dw_bias, (Ch,)), ("fc2_weight", fc2_weight, (Co, Ch)), ("fc2_bias", fc2_bias, (Co,)))
    for name, t, shape in shapes:
        if t is None and name.endswith("bias"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: {name} must be {shape}, got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{where}: {name} is {t.dtype}; it must be x's dtype {x.dtype} or torch.float32")
        if t.device != x.device:
            raise ValueError(f"{where}: {name} is on {t.device} but x is on {x.device}")


def mix_ffn(x: torch.Tensor, H: int, W: int, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
            dw_weight: torch.Tensor, dw_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
            fc2_bias: torch.Tensor | None, approximate: str = "none", *, fc1_packed: torch.Tensor | None = None,
            fc2_packed: torch.Tensor | None = None) -> torch.Tensor:
    """Fused Mix-FFN; differentiable in x and every parameter (the backward runs on the ``torch``
    backend, which dispatch picks whenever a gradient is needed).

    x: (B, H·W, C) tokens; fc1_weight: (Ch, C), fc1_bias: (Ch,) or None; dw_weight: (Ch, 1, 3, 3),
    dw_bias: (Ch,) or None; fc2_weight: (Co, Ch), fc2_bias: (Co,) or None; approximate: "none"
    (erf) or "tanh". fc1_packed / fc2_packed (CPU inference, optional): the Linear weights in
    oneDNN's layout (``torch.ops.mkldnn._reorder_linear_weight``) in the dtype the GEMMs run in;
    only the ``cpp`` backend uses them. Returns (B, H·W, Co) in x's dtype (the autocast dtype under
    autocast).
    """
    check_inputs(x, H, W, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, approximate)
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias))
    choice = dispatch.choose(OP, device=x.device, dtype=dtype, needs_grad=needs_grad)
    return dispatch.implementation(OP, choice.backend)(x, H, W, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight,
                                                      fc2_bias, approximate, fc1_packed=fc1_packed,
                                                      fc2_packed=fc2_packed)


_register_cpp_fake()
dispatch.register_reference(OP, mix_ffn_reference)
dispatch.register(OP, dispatch.Backend("cpp", _cpp_reasons, mix_ffn_cpp, auto_reasons=_cpp_auto_reasons))
dispatch.register(OP, dispatch.Backend(
    "torch", lambda dtype, **_: [] if dtype.is_floating_point else [f"dtype {dtype}"], mix_ffn_torch))
