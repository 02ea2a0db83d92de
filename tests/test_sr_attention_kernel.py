"""Kernel-level tests of fastseg.kernels.sr_attention (forward + backward) against a float64
PyTorch reference. On CPU the kernels run under Triton's interpreter (slow: shapes are tiny);
with a GPU the same tests run on CUDA, plus a few larger GPU-only shapes.

Tolerances (DESIGN.md "Numerics"): fp32 max error <= 1e-4 x max |reference|; fp16/bf16 max
error <= 2 x the error of the eager low-precision reference, plus a tiny absolute slack.
"""
from __future__ import annotations

import pytest
import torch

from fastseg.kernels.sr_attention import sr_attention_bwd, sr_attention_fwd

from triton_devices import CPU, CPU_BF16, CUDA, HAS_CUDA


def reference(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float):
    """Plain PyTorch SegFormer efficient attention after the projections.
    q: (B, N, C), kv: (B, Nkv, 2C) -> out (B, N, C), lse (B, heads, N). Computes in q's dtype."""
    B, N, C = q.shape
    Nkv = kv.shape[1]
    D = C // num_heads
    qh = q.reshape(B, N, num_heads, D).permute(0, 2, 1, 3)
    k, v = kv[..., :C], kv[..., C:]
    kh = k.reshape(B, Nkv, num_heads, D).permute(0, 2, 1, 3)
    vh = v.reshape(B, Nkv, num_heads, D).permute(0, 2, 1, 3)
    s = (qh @ kh.transpose(-2, -1)) * scale
    out = (s.softmax(dim=-1) @ vh).transpose(1, 2).reshape(B, N, C)
    return out, torch.logsumexp(s.float() if s.dtype != torch.float64 else s, dim=-1)


def reference_with_grads(q, kv, do, num_heads, scale, dtype):
    """(out, lse, dq, dkv) of the reference run in `dtype`, driven by upstream gradient do."""
    qr = q.detach().to(dtype).requires_grad_()
    kvr = kv.detach().to(dtype).requires_grad_()
    out, lse = reference(qr, kvr, num_heads, scale)
    out.backward(do.to(dtype))
    return out.detach(), lse.detach(), qr.grad, kvr.grad


def make_inputs(B, N, Nkv, H, D, dtype, device, sharp=1.0):
    # Unit-scale normals (never zeros); `sharp` > 1 peaks the softmax so the running max moves
    # between KV blocks and the online rescaling is exercised.
    C = H * D
    q = (torch.randn(B, N, C, device=device) * sharp).to(dtype)
    kv = torch.randn(B, Nkv, 2 * C, device=device).to(dtype)
    do = torch.randn(B, N, C, device=device).to(dtype)
    return q, kv, do


def nan_like(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def max_err(got, ref):
    return (got.double() - ref.double()).abs().max().item()


def check(name, got, ref64, eager, dtype):
    assert not torch.isnan(got).any(), f"{name}: NaN left in output (element not written?)"
    err = max_err(got, ref64)
    ref_max = ref64.abs().max().item()
    if dtype == torch.float32:
        # Floor of 1 (inputs are unit scale): with Nkv = 1 the true dq is exactly 0 and the
        # kernel's fp32 rounding of dP - delta (terms of size ~1) leaves ~1e-6.
        tol = 1e-4 * max(ref_max, 1.0)
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} (max |ref| {ref_max:.3e})"
    else:
        base = max_err(eager, ref64)
        tol = 2 * base + 1e-5 * max(1.0, ref_max)
        assert err <= tol, f"{name}: max error {err:.3e} > 2 x eager {dtype} error {base:.3e} + slack"


def run_and_check(device, dtype, B, N, Nkv, H, D, sharp=1.0, num_splits=None):
    q, kv, do = make_inputs(B, N, Nkv, H, D, dtype, device, sharp)
    C, scale = H * D, D ** -0.5

    out, lse = nan_like((B, N, C), dtype, device), nan_like((B, H, N), torch.float32, device)
    got_out, got_lse = sr_attention_fwd(q, kv, H, scale, out=out, lse=lse)
    assert got_out is out and got_lse is lse
    dq, dkv = nan_like((B, N, C), dtype, device), nan_like((B, Nkv, 2 * C), dtype, device)
    got_dq, got_dkv = sr_attention_bwd(do, q, kv, out, lse, H, scale, dq=dq, dkv=dkv, num_splits=num_splits)
    assert got_dq is dq and got_dkv is dkv

    r_out, r_lse, r_dq, r_dkv = reference_with_grads(q, kv, do, H, scale, torch.float64)
    e_out = e_dq = e_dkv = None
    if dtype != torch.float32:
        e_out, _, e_dq, e_dkv = reference_with_grads(q, kv, do, H, scale, dtype)
    check("out", out, r_out, e_out, dtype)
    lse_tol = (1e-4 if dtype == torch.float32 else 1e-3) * max(1.0, r_lse.abs().max().item())
    assert not torch.isnan(lse).any(), "lse: NaN left in output"
    assert max_err(lse, r_lse) <= lse_tol, f"lse: max error {max_err(lse, r_lse):.3e} > {lse_tol:.3e}"
    check("dq", dq, r_dq, e_dq, dtype)
    check("dk", dkv[..., :C], r_dkv[..., :C], None if e_dkv is None else e_dkv[..., :C], dtype)
    check("dv", dkv[..., C:], r_dkv[..., C:], None if e_dkv is None else e_dkv[..., C:], dtype)


# (B, N, Nkv, heads, D, sharp). Under the interpreter: BLOCK_M 32, BLOCK_N 16, 64 rows per
# backward split, so these cross row/KV block edges, use 1-3 KV blocks and 1-2 splits.
CASES_FP32 = [
    (1, 37, 5, 1, 32, 1.0),
    (2, 61, 1, 2, 32, 1.0),    # a single key: softmax is 1, dq = 0
    (1, 70, 19, 5, 64, 1.0),   # two backward splits
    (2, 45, 33, 8, 32, 4.0),   # three KV blocks, peaked softmax
    (1, 37, 20, 2, 40, 1.0),   # D not a power of two
]
CASES_LOWP = [
    (torch.float16, (2, 70, 19, 2, 64, 1.0)),
    (torch.float16, (1, 37, 5, 5, 32, 1.0)),
    (torch.float16, (2, 61, 1, 8, 32, 1.0)),
]
CASES_BF16 = [(2, 70, 19, 2, 64, 1.0), (1, 37, 5, 5, 40, 1.0)]


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("case", CASES_FP32, ids=lambda c: "B{}-N{}-Nkv{}-H{}-D{}".format(*c))
def test_fp32_matches_reference(device, case):
    run_and_check(device, torch.float32, *case)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("dtype,case", CASES_LOWP, ids=lambda c: "B{}-N{}-Nkv{}-H{}-D{}".format(*c)
                         if isinstance(c, tuple) else str(c).replace("torch.", ""))
def test_fp16_within_2x_eager(device, dtype, case):
    run_and_check(device, dtype, *case)


@pytest.mark.parametrize("device", [CPU_BF16, CUDA])
@pytest.mark.parametrize("case", CASES_BF16, ids=lambda c: "B{}-N{}-Nkv{}-H{}-D{}".format(*c))
def test_bf16_within_2x_eager(device, case):
    run_and_check(device, torch.bfloat16, *case)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (too slow for the interpreter)")
@pytest.mark.parametrize("dtype,case", [
    (torch.float16, (2, 1000, 257, 2, 64, 1.0)),   # real GPU tiles, several KV blocks, splits
    (torch.bfloat16, (1, 600, 70, 1, 128, 2.0)),
    (torch.float32, (1, 333, 40, 2, 80, 1.0)),
    (torch.float16, (4, 4096, 256, 1, 32, 1.0)),   # SegFormer-B0 stage 1 at 256x256
], ids=["fp16-N1000-Nkv257-D64", "bf16-N600-Nkv70-D128", "fp32-N333-Nkv40-D80", "fp16-B4-N4096-Nkv256-D32"])
def test_gpu_larger_shapes(dtype, case):
    run_and_check("cuda", dtype, *case)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_backward_split_paths(device, num_splits):
    """The dK/dV kernel writes dkv directly (1 split) or through fp32 partials (3 splits)."""
    B, N, Nkv, H, D = 1, 70, 19, 2, 32
    q, kv, do = make_inputs(B, N, Nkv, H, D, torch.float32, device)
    scale = 0.3  # not D**-0.5: the scale is a real argument
    out, lse = sr_attention_fwd(q, kv, H, scale)
    dq, dkv = sr_attention_bwd(do, q, kv, out, lse, H, scale, num_splits=num_splits)
    assert dq.is_contiguous() and dkv.is_contiguous()
    assert dq.dtype == q.dtype and dkv.dtype == kv.dtype
    r_out, _, r_dq, r_dkv = reference_with_grads(q, kv, do, H, scale, torch.float64)
    check("out", out, r_out, None, torch.float32)
    check("dq", dq, r_dq, None, torch.float32)
    check("dkv", dkv, r_dkv, None, torch.float32)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_strided_inputs_and_outputs(device):
    """q, kv, do and all outputs are non-contiguous views: read/written through strides."""
    B, N, Nkv, H, D = 2, 37, 7, 2, 32
    C, scale = H * D, D ** -0.5
    # q: column slice of a wider (N, B, ·) tensor -> batch stride C + 24, row stride B*(C + 24).
    q = torch.randn(N, B, C + 24, device=device).transpose(0, 1)[..., 8:8 + C]
    kv = torch.randn(B, Nkv, 2 * C + 16, device=device)[..., 16:]
    do = torch.randn(B, N, 2 * C, device=device)[..., C:]
    assert not (q.is_contiguous() or kv.is_contiguous() or do.is_contiguous())
    out = nan_like((B, N, C + 8), torch.float32, device)[..., :C]
    dq = nan_like((B, N, C + 8), torch.float32, device)[..., 8:]
    dkv = nan_like((B, Nkv, 2 * C + 8), torch.float32, device)[..., :2 * C]
    out, lse = sr_attention_fwd(q, kv, H, scale, out=out)
    sr_attention_bwd(do, q, kv, out, lse, H, scale, dq=dq, dkv=dkv)
    r_out, r_lse, r_dq, r_dkv = reference_with_grads(q, kv, do, H, scale, torch.float64)
    check("out", out, r_out, None, torch.float32)
    check("dq", dq, r_dq, None, torch.float32)
    check("dkv", dkv, r_dkv, None, torch.float32)
    assert max_err(lse, r_lse) <= 1e-4 * max(1.0, r_lse.abs().max().item())

    # An expanded upstream gradient (what out.sum().backward() hands over: stride 0).
    do0 = torch.randn(1, 1, 1, device=device).expand(B, N, C)
    dq0, dkv0 = sr_attention_bwd(do0, q, kv, out, lse, H, scale)
    _, _, r_dq0, r_dkv0 = reference_with_grads(q, kv, do0, H, scale, torch.float64)
    check("dq (expanded do)", dq0, r_dq0, None, torch.float32)
    check("dkv (expanded do)", dkv0, r_dkv0, None, torch.float32)


# ---------------------------------------------------------------------------- bad input
BAD_DEVICE = "cuda" if HAS_CUDA else "cpu"


def _good(B=1, N=5, Nkv=3, H=2, D=16, dtype=torch.float32):
    return make_inputs(B, N, Nkv, H, D, dtype, BAD_DEVICE)


@pytest.mark.parametrize("make,exc,match", [
    (lambda q, kv: (q[0], kv, 2), ValueError, "q must have 3 dims"),
    (lambda q, kv: (q, kv, 3), ValueError, "not divisible by num_heads 3"),
    (lambda q, kv: (q, kv[..., :-1], 2), ValueError, "kv last dim must be 2 . C = 64"),
    (lambda q, kv: (q, kv[:0], 2), ValueError, "batch"),
    (lambda q, kv: (q[:0], kv[:0], 2), ValueError, "empty input"),
    (lambda q, kv: (q, kv.half(), 2), TypeError, "does not match q dtype"),
    (lambda q, kv: (q.double(), kv.double(), 2), TypeError, "dtype must be one of"),
    (lambda q, kv: (q.tolist(), kv, 2), TypeError, "q must be a torch.Tensor"),
    (lambda q, kv: (q, kv.to("meta"), 2), ValueError, "kv is on meta"),
    (lambda q, kv: (q.transpose(1, 2).contiguous().transpose(1, 2), kv, 2), ValueError, "stride 1"),
    (lambda q, kv: (q, kv, 0), ValueError, "num_heads must be a positive int"),
    (lambda q, kv: (q, kv, 4), ValueError, r"head dim 8 .* outside \[16, 128\]"),
], ids=["rank", "heads", "kv-width", "batch-mismatch", "empty", "dtype-mix", "float64", "not-tensor",
        "device-mix", "last-stride", "zero-heads", "head-dim-8"])
def test_forward_rejects_bad_input(make, exc, match):
    q, kv, _ = _good()
    args = make(q, kv)
    with pytest.raises(exc, match=match):
        sr_attention_fwd(*args, scale=0.25)


def test_rejects_bad_buffers_and_backward_inputs():
    q, kv, do = _good()
    B, N, C = q.shape
    with pytest.raises(ValueError, match="out must have shape"):
        sr_attention_fwd(q, kv, 2, 0.25, out=torch.empty(B, N + 1, C, device=q.device))
    with pytest.raises(TypeError, match="out must have dtype"):
        sr_attention_fwd(q, kv, 2, 0.25, out=torch.empty(B, N, C, device=q.device, dtype=torch.float16))
    with pytest.raises(ValueError, match="head dim 160"):
        sr_attention_fwd(torch.randn(1, 3, 160, device=q.device), torch.randn(1, 2, 320, device=q.device), 1, 0.1)
    with pytest.raises(ValueError, match="scale must be a finite float"):
        sr_attention_fwd(q, kv, 2, float("nan"))
    out = torch.randn_like(q)
    lse = torch.randn(B, 2, N, device=q.device)
    with pytest.raises(ValueError, match="lse must be float32 of shape"):
        sr_attention_bwd(do, q, kv, out, lse[:, :1], 2, 0.25)
    with pytest.raises(TypeError, match="do dtype"):
        sr_attention_bwd(do.half(), q, kv, out, lse, 2, 0.25)
    with pytest.raises(ValueError, match="out must have shape"):
        sr_attention_bwd(do, q, kv, out[:, :-1], lse, 2, 0.25)
    with pytest.raises(ValueError, match="dkv must have shape"):
        sr_attention_bwd(do, q, kv, out, lse, 2, 0.25, dkv=torch.empty_like(q))
