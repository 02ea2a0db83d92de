"""Spatial-reduction attention of the MiT encoder, after the linear projections.

    out = softmax(q_h k_hᵀ · scale) v_h   for every head h, written back as tokens

q: (B, N, C) from the q projection; kv: (B, Nkv, 2C) from the kv projection (k = kv[..., :C],
v = kv[..., C:]); head h owns channels [h·D, (h+1)·D) with D = C / heads; out: (B, N, C).

Backends:
- ``triton``: ``fastseg.kernels.sr_attention`` (forward + flash-style backward), registered as the
  custom ops ``fastseg::sr_attention_fwd`` / ``fastseg::sr_attention_bwd`` with fake
  implementations, so ``torch.compile`` and ``torch.export`` trace through without graph breaks.
- ``cpp``: the extension's C++ CPU kernel ``fastseg_ext::sr_attention_fwd``
  (``csrc/sr_attention_cpu.cpp``): register-blocked AVX2 micro-kernels (bf16 pair dot products where
  the CPU has AVX512-BF16), softmax in fp32, out written as tokens; forward for inference only: it is
  passed over when autograd needs gradients, so training keeps ``torch`` / ``triton``.
- ``torch``: ``scaled_dot_product_attention`` on strided views of the token tensors (no copies).
- reference: the official NVlabs math below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseg.ops import dispatch


def sr_attention_reference(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """The official NVlabs math: head split by permutes, full score matrix, softmax, transpose back."""
    B, N, C = q.shape
    head_dim = C // num_heads
    q = q.reshape(B, N, num_heads, head_dim).permute(0, 2, 1, 3)
    kv = kv.reshape(B, -1, 2, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, N, C)


def check_inputs(q, kv, num_heads: int) -> None:
    """Shapes, dtypes and devices, named in the error (never a kernel crash)."""
    for name, t in (("q", q), ("kv", kv)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3:
            raise ValueError(f"sr_attention: {name} must be a rank-3 tensor (B, N, C), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"sr_attention: {name} must be floating point, got {t.dtype}")
    B, N, C = q.shape
    if kv.shape[0] != B or kv.shape[2] != 2 * C:
        raise ValueError(f"sr_attention: kv must be (B={B}, Nkv, 2C={2 * C}), got {tuple(kv.shape)}")
    if B == 0 or N == 0 or kv.shape[1] == 0:
        raise ValueError(f"sr_attention: empty input, q {tuple(q.shape)}, kv {tuple(kv.shape)}")
    if num_heads < 1 or C % num_heads:
        raise ValueError(f"sr_attention: {C} channels are not divisible into {num_heads} heads")
    if q.dtype != kv.dtype:
        raise TypeError(f"sr_attention: q is {q.dtype} but kv is {kv.dtype}")
    if q.device != kv.device:
        raise ValueError(f"sr_attention: q is on {q.device} but kv is on {kv.device}")


# --- torch backend ------------------------------------------------------------------------------

def sr_attention_torch(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """SDPA on strided head views of the token tensors: no permute copies in or out."""
    B, N, C = q.shape
    D = C // num_heads
    qh = q.view(B, N, num_heads, D).transpose(1, 2)
    kh = kv[..., :C].unflatten(-1, (num_heads, D)).transpose(1, 2)
    vh = kv[..., C:].unflatten(-1, (num_heads, D)).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    # SDPA returns (B, h, N, D) as a transposed view of (B, N, h, D) storage: reshape is free.
    out = out.transpose(1, 2).reshape(B, N, C)
    # A non-finite value in a query row makes all its scores NaN or ±inf, so the reference's
    # softmax row is NaN; SDPA's CPU kernels treat a row with no finite score as fully masked and
    # return 0 there. q·0 is 0 where q is finite and NaN where it is not: add its per-head sum.
    # (Not covered: a row whose scores are all -inf through an Inf in k alone, with a tiny Nkv.)
    return (out.view(B, N, num_heads, D) + (qh.transpose(1, 2) * 0).sum(-1, keepdim=True)).view(B, N, C)


# --- triton backend -----------------------------------------------------------------------------

_kernel_module = None


def _kernels():
    """The Triton kernel module, or the ImportError text if Triton is unavailable (imported once).

    Each op keeps this small loader with a literal ``from … import``: torch.compile traces that
    form without a graph break, whereas ``importlib.import_module`` is a function Dynamo skips."""
    global _kernel_module
    if _kernel_module is None:
        try:
            from fastseg.kernels import sr_attention as module
        except ImportError as e:  # no triton installed
            module = str(e)
        _kernel_module = module
    return _kernel_module


@torch.library.custom_op("fastseg::sr_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().sr_attention_fwd(q, kv, num_heads, scale)


@_fwd_op.register_fake
def _(q, kv, num_heads, scale):
    B, N, C = q.shape
    return q.new_empty((B, N, C)), q.new_empty((B, num_heads, N), dtype=torch.float32)


@torch.library.custom_op("fastseg::sr_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
            num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().sr_attention_bwd(do, q, kv, out, lse, num_heads, scale)


@_bwd_op.register_fake
def _(do, q, kv, out, lse, num_heads, scale):
    return q.new_empty(q.shape), kv.new_empty(kv.shape)


class SRAttentionFunction(torch.autograd.Function):
    """Triton forward; backward recomputes the scores from q, k and the saved log-sum-exp."""

    @staticmethod
    def forward(ctx, q, kv, num_heads: int, scale: float):
        out, lse = torch.ops.fastseg.sr_attention_fwd(q, kv, num_heads, scale)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.num_heads, ctx.scale = num_heads, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, out, lse = ctx.saved_tensors
        dq, dkv = torch.ops.fastseg.sr_attention_bwd(dout, q, kv, out, lse, ctx.num_heads, ctx.scale)
        return dq, dkv, None, None


def sr_attention_triton(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    # The kernels read any row strides but need unit stride along channels.
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    return SRAttentionFunction.apply(q, kv, num_heads, float(scale))


def triton_device_reasons(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why Triton kernels cannot run on this device/dtype (shared by every Triton backend)."""
    from fastseg.kernels import interpreter_bf16_ok, interpreter_enabled, interpreter_ready

    if device.type == "cuda":
        if interpreter_enabled():
            return ["TRITON_INTERPRET=1 is set, so Triton cannot launch on CUDA tensors"]
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] < 8:
            return ["bfloat16 needs compute capability >= 8.0"]
        return []
    if device.type == "cpu":
        if not interpreter_enabled():
            return ["CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"]
        if not interpreter_ready():
            return ["triton was imported before its interpreter was switched on; set "
                    "TRITON_INTERPRET=1 before importing triton"]
        if dtype == torch.bfloat16 and not interpreter_bf16_ok():
            # The interpreter's own bf16 tl.dot returns garbage (triton 3.6-3.9); fastseg's fix
            # (fastseg.kernels.interpreter_bf16) could not be installed on this triton.
            return ["bfloat16 tl.dot is wrong under this triton's interpreter; check bf16 on a GPU"]
        return []
    return [f"device type {device.type!r}"]


def triton_auto_reasons(device: torch.device, **_) -> list[str]:
    if device.type == "cpu":
        return ["on CPU Triton runs only under its interpreter (a test tool, slow); FASTSEG_BACKEND=triton forces it"]
    return []


def _triton_reasons(device: torch.device, dtype: torch.dtype, head_dim: int = 64, **_) -> list[str]:
    kernels = _kernels()
    if isinstance(kernels, str):
        return [f"triton is not importable ({kernels})"]
    reasons = []
    if dtype not in kernels.SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype} (supports {', '.join(map(str, kernels.SUPPORTED_DTYPES))})")
    if not kernels.MIN_HEAD_DIM <= head_dim <= kernels.MAX_HEAD_DIM:
        reasons.append(f"head dim {head_dim} outside [{kernels.MIN_HEAD_DIM}, {kernels.MAX_HEAD_DIM}]")
    return reasons + triton_device_reasons(device, dtype)


# --- cpp backend ----------------------------------------------------------------------------------

CPP_DTYPES = (torch.float32, torch.bfloat16)
CPP_HEAD_DIM_MULTIPLE = 8  # the micro-kernels' channel panels


# The instruction set the C++ kernel uses per dtype on this CPU ("" if it cannot run), asked once
# when the extension loads (a plain dict, so dispatch under torch.compile reads a constant).
CPP_ISA: dict[torch.dtype, str] = {}


def _cpp_isa(dtype: torch.dtype) -> str:
    return CPP_ISA.get(dtype, "")


def _cpp_reasons(device: torch.device, dtype: torch.dtype, head_dim: int = 64, needs_grad: bool = False,
                 **_) -> list[str]:
    from fastseg.ops.overlap_patch_embed import extension_op_reasons

    reasons = extension_op_reasons("sr_attention_fwd")
    if reasons:
        return reasons
    if device.type != "cpu":
        reasons.append(f"device type {device.type!r} (the C++ kernel takes CPU tensors)")
    if dtype not in CPP_DTYPES:
        reasons.append(f"dtype {dtype} (the C++ kernel computes float32 and bfloat16)")
    elif not _cpp_isa(dtype):
        reasons.append("this CPU lacks AVX2 + FMA (or the extension was built for another architecture)")
    if head_dim % CPP_HEAD_DIM_MULTIPLE:
        reasons.append(f"head dim {head_dim} is not a multiple of {CPP_HEAD_DIM_MULTIPLE}")
    if needs_grad:
        reasons.append("autograd needs gradients (the C++ kernel is forward-only, for inference)")
    return reasons


_cpp_fake_registered = False


def _register_cpp_fake() -> None:
    from fastseg.ops.overlap_patch_embed import extension_op_reasons

    global _cpp_fake_registered
    if _cpp_fake_registered or extension_op_reasons("sr_attention_fwd"):
        return
    _cpp_fake_registered = True
    CPP_ISA.update({dtype: torch.ops.fastseg_ext.sr_attention_isa(dtype) for dtype in CPP_DTYPES})

    @torch.library.register_fake("fastseg_ext::sr_attention_fwd")
    def _(q, kv, num_heads, scale):
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # the kernel writes contiguous tokens


def sr_attention_cpp(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """The C++ kernel, reading q and kv in place where their channel stride is 1."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    return torch.ops.fastseg_ext.sr_attention_fwd(q, kv, num_heads, float(scale))


def _torch_reasons(device: torch.device, dtype: torch.dtype, **_) -> list[str]:
    return [] if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else [f"dtype {dtype}"]


dispatch.register_reference("sr_attention", sr_attention_reference)
dispatch.register("sr_attention", dispatch.Backend(
    "triton", _triton_reasons, sr_attention_triton, auto_reasons=triton_auto_reasons))
dispatch.register("sr_attention", dispatch.Backend("cpp", _cpp_reasons, sr_attention_cpp))
dispatch.register("sr_attention", dispatch.Backend("torch", _torch_reasons, sr_attention_torch))
_register_cpp_fake()


def sr_attention(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Fused spatial-reduction attention; the backend is chosen by :mod:`fastseg.ops.dispatch`.

    q: (B, N, C), kv: (B, Nkv, 2C) → (B, N, C). Differentiable in q and kv.
    """
    check_inputs(q, kv, num_heads)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad)
    impl = dispatch.resolve("sr_attention", device=q.device, dtype=q.dtype, head_dim=q.shape[-1] // num_heads,
                            needs_grad=needs_grad)
    return impl(q, kv, num_heads, scale)
