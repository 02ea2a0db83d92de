"""Kernel-level tests of fastseg.kernels.dwconv3x3_gelu (forward + backward) against a float64
PyTorch reference. On CPU the kernels run under Triton's interpreter (slow: shapes are tiny);
with a GPU the same tests run on CUDA, plus a few larger GPU-only shapes.

Tolerances (DESIGN.md "Numerics"): fp32 max error <= 1e-4 x max |reference|; fp16/bf16
relative L2 error <= 2 x the eager low-precision reference's relative L2 error (both against
float64) + one unit roundoff of the dtype. A gradient returned in fp32 (fp32 weight/bias with
fp16/bf16 activations) is held to the fp32 tolerance.

Interpreter tiles (fastseg/kernels/dwconv3x3_gelu.py): forward 4 x 8 pixels x 64 channels, backward
4-row x 8-column strips x 64 channels, weight-gradient partials reduced 4 at a time; so
H = 5, 7, 13, W = 9, 11, 17 and C = 96, 160 cross tile edges and C = 40 is one ragged block.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastseg.kernels.dwconv3x3_gelu import dwconv3x3_gelu_bwd, dwconv3x3_gelu_fwd

from triton_devices import CPU, CPU_BF16, CUDA, HAS_CUDA


# ---------------------------------------------------------------------------- reference
def reference(x, H, W, weight, bias, approximate):
    """Plain PyTorch Mix-FFN DWConv + GELU: tokens (B, N, C) -> NCHW -> depthwise conv ->
    tokens -> GELU. Computes in the inputs' dtype."""
    B, N, C = x.shape
    img = x.transpose(1, 2).reshape(B, C, H, W)
    z = F.conv2d(img, weight, bias, stride=1, padding=1, groups=C)
    return F.gelu(z.flatten(2).transpose(1, 2), approximate=approximate)


def reference_with_grads(x, H, W, weight, bias, dy, approximate, dtype):
    """(y, dx, dweight, dbias) of the reference run entirely in `dtype`, driven by upstream
    gradient dy (dbias is None without a bias)."""
    xr = x.detach().to(dtype).requires_grad_()
    wr = weight.detach().to(dtype).requires_grad_()
    br = bias.detach().to(dtype).requires_grad_() if bias is not None else None
    y = reference(xr, H, W, wr, br, approximate)
    y.backward(dy.to(dtype))
    return y.detach(), xr.grad, wr.grad, (br.grad if br is not None else None)


def make_inputs(B, H, W, C, dtype, device, *, has_bias=True, param_dtype=None):
    # Unit-scale normals (never zeros); weights at 0.5 put z (std ~1.6) across GELU's bend.
    param_dtype = param_dtype or dtype
    x = torch.randn(B, H * W, C, device=device).to(dtype)
    weight = (0.5 * torch.randn(C, 1, 3, 3, device=device)).to(param_dtype)
    bias = (0.5 * torch.randn(C, device=device)).to(param_dtype) if has_bias else None
    dy = torch.randn(B, H * W, C, device=device).to(dtype)
    return x, weight, bias, dy


def nan_like(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def max_err(got, ref):
    return (got.double() - ref.double()).abs().max().item()


def rel_l2(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check(name, got, ref64, eager, dtype):
    """fp32 tensors: max error <= 1e-4 x max |ref|. fp16/bf16 tensors: relative L2 error <=
    2 x the eager `dtype` reference's + the dtype's unit roundoff."""
    assert not torch.isnan(got).any(), f"{name}: NaN left in output (element not written?)"
    assert torch.isfinite(got).all(), f"{name}: Inf in output"
    if got.dtype == torch.float32:
        err, ref_max = max_err(got, ref64), ref64.abs().max().item()
        tol = 1e-4 * ref_max
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} (max |ref| {ref_max:.3e})"
    else:
        err, base = rel_l2(got, ref64), rel_l2(eager, ref64)
        tol = 2 * base + torch.finfo(dtype).eps / 2
        assert err <= tol, (f"{name}: relative L2 error {err:.3e} > 2 x eager {dtype} error "
                            f"{base:.3e} + eps/2 = {tol:.3e}")


def run_and_check(device, dtype, B, H, W, C, approximate, has_bias, param_dtype=None):
    x, weight, bias, dy = make_inputs(B, H, W, C, dtype, device, has_bias=has_bias, param_dtype=param_dtype)
    N = H * W

    out = nan_like((B, N, C), dtype, device)
    got_y = dwconv3x3_gelu_fwd(x, H, W, weight, bias, approximate, out=out)
    assert got_y is out
    dx = nan_like((B, N, C), dtype, device)
    got_dx, dw, db = dwconv3x3_gelu_bwd(dy, x, H, W, weight, bias, approximate, dx=dx)
    assert got_dx is dx
    assert dw.shape == weight.shape and dw.dtype == weight.dtype
    if has_bias:
        assert db.shape == bias.shape and db.dtype == bias.dtype
    else:
        assert db is None

    r_y, r_dx, r_dw, r_db = reference_with_grads(x, H, W, weight, bias, dy, approximate, torch.float64)
    e_y = e_dx = e_dw = e_db = None
    if dtype != torch.float32:
        e_y, e_dx, e_dw, e_db = reference_with_grads(x, H, W, weight, bias, dy, approximate, dtype)
    check("y", out, r_y, e_y, dtype)
    check("dx", dx, r_dx, e_dx, dtype)
    check("dweight", dw, r_dw, e_dw, dtype)
    if has_bias:
        check("dbias", db, r_db, e_db, dtype)


def _ids(c):
    if isinstance(c, tuple):
        B, H, W, C, approx, has_bias = c[:6]
        return f"B{B}-{H}x{W}-C{C}-{approx}" + ("" if has_bias else "-nobias")
    return str(c).replace("torch.", "")


# (B, H, W, C, approximate, has_bias)
CASES_FP32 = [
    (1, 1, 1, 40, "none", True),     # one pixel: only the centre tap sees data
    (2, 5, 3, 96, "tanh", True),
    (1, 7, 9, 40, "none", False),    # no bias, ragged channel block
    (1, 13, 11, 96, "tanh", True),   # 4 row strips, 2 column tiles, 2 channel blocks
    (1, 6, 17, 160, "none", True),   # 3 column tiles, 3 channel blocks
    (1, 3, 5, 320, "none", True),    # the odd sizes and non-power-of-two widths
    (1, 1, 1, 1280, "none", True),
    (1, 61, 47, 40, "none", True),
]
CASES_FP16 = [
    ((2, 7, 9, 40, "none", True), None),
    ((1, 13, 11, 96, "tanh", False), None),
    ((1, 5, 3, 160, "none", True), torch.float32),  # fp32 weight/bias with fp16 activations
    ((1, 3, 5, 1280, "none", True), None),
]
CASES_BF16 = [
    ((2, 7, 9, 40, "none", True), None),
    ((1, 13, 11, 96, "tanh", True), torch.float32),
]


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("case", CASES_FP32, ids=_ids)
def test_fp32_matches_reference(device, case):
    run_and_check(device, torch.float32, *case)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("case,param_dtype", CASES_FP16, ids=_ids)
def test_fp16_within_2x_eager(device, case, param_dtype):
    run_and_check(device, torch.float16, *case, param_dtype=param_dtype)


@pytest.mark.parametrize("device", [CPU_BF16, CUDA])
@pytest.mark.parametrize("case,param_dtype", CASES_BF16, ids=_ids)
def test_bf16_within_2x_eager(device, case, param_dtype):
    run_and_check(device, torch.bfloat16, *case, param_dtype=param_dtype)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_bf16_within_one_ulp(device):
    """bf16 loads/stores and the fp32 math on bf16 data: every y and dx element is within one
    bf16 ulp of the float64 result on the same inputs (true for round-to-nearest on a GPU and
    for the interpreter's truncation alike); fp32 weight/bias give fp32 dweight/dbias."""
    B, H, W, C = 1, 7, 9, 96
    x, weight, bias, dy = make_inputs(B, H, W, C, torch.bfloat16, device, param_dtype=torch.float32)
    y = dwconv3x3_gelu_fwd(x, H, W, weight, bias, "tanh", out=nan_like((B, H * W, C), torch.bfloat16, device))
    dx, dw, db = dwconv3x3_gelu_bwd(dy, x, H, W, weight, bias, "tanh",
                                    dx=nan_like((B, H * W, C), torch.bfloat16, device))
    r_y, r_dx, r_dw, r_db = reference_with_grads(x, H, W, weight, bias, dy, "tanh", torch.float64)
    eps = torch.finfo(torch.bfloat16).eps
    for name, got, ref in (("y", y, r_y), ("dx", dx, r_dx)):
        assert got.dtype == torch.bfloat16 and not torch.isnan(got).any(), name
        bound = eps * ref.abs() + 1e-5 * ref.abs().max()  # the floor covers fp32 math near 0
        excess = ((got.double() - ref).abs() - bound).max().item()
        assert excess <= 0, f"{name}: an element is {excess:.3e} beyond one bf16 ulp"
    check("dweight", dw, r_dw, None, torch.float32)
    check("dbias", db, r_db, None, torch.float32)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (too slow for the interpreter)")
@pytest.mark.parametrize("dtype,case,param_dtype", [
    (torch.float16, (2, 128, 128, 128, "none", True), None),       # SegFormer-B0 stage 1 at 512^2
    (torch.bfloat16, (2, 128, 128, 128, "tanh", True), torch.float32),
    (torch.float32, (1, 61, 47, 160, "none", False), None),         # odd map, many tiles
    (torch.bfloat16, (1, 16, 16, 2048, "none", True), None),        # late stage: few pixels, wide C
    (torch.float16, (3, 33, 65, 640, "tanh", True), None),
], ids=["fp16-B2-128x128-C128", "bf16-B2-128x128-C128-tanh", "fp32-61x47-C160",
        "bf16-16x16-C2048", "fp16-B3-33x65-C640"])
def test_gpu_larger_shapes(dtype, case, param_dtype):
    run_and_check("cuda", dtype, *case, param_dtype=param_dtype)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_strided_inputs_and_outputs(device):
    """x, dy and both output buffers are non-contiguous views read/written through strides;
    weight is a non-contiguous view too."""
    B, H, W, C = 2, 5, 9, 40
    N = H * W
    # x: column slice of a wider (N, B, .) tensor -> batch stride C + 24, token stride B*(C + 24).
    x = torch.randn(N, B, C + 24, device=device).transpose(0, 1)[..., 8:8 + C]
    dy = torch.randn(B, N, 2 * C, device=device)[..., C:]
    weight = (0.5 * torch.randn(3, 3, C, 1, device=device)).permute(2, 3, 0, 1)  # (C, 1, 3, 3)
    bias = torch.randn(2 * C, device=device)[::2]
    assert not (x.is_contiguous() or dy.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
    out = nan_like((B, N, C + 8), torch.float32, device)[..., :C]
    dx = nan_like((N, B, C + 8), torch.float32, device).transpose(0, 1)[..., 8:]
    dwconv3x3_gelu_fwd(x, H, W, weight, bias, out=out)
    _, dw, db = dwconv3x3_gelu_bwd(dy, x, H, W, weight, bias, dx=dx)
    r_y, r_dx, r_dw, r_db = reference_with_grads(x, H, W, weight, bias, dy, "none", torch.float64)
    check("y", out, r_y, None, torch.float32)
    check("dx", dx, r_dx, None, torch.float32)
    check("dweight", dw, r_dw, None, torch.float32)
    check("dbias", db, r_db, None, torch.float32)

    # An expanded upstream gradient (what y.sum().backward() hands over: all strides 0).
    dy0 = torch.randn(1, 1, 1, device=device).expand(B, N, C)
    dx0, dw0, db0 = dwconv3x3_gelu_bwd(dy0, x, H, W, weight, bias)
    _, r_dx0, r_dw0, r_db0 = reference_with_grads(x, H, W, weight, bias, dy0, "none", torch.float64)
    check("dx (expanded dy)", dx0, r_dx0, None, torch.float32)
    check("dweight (expanded dy)", dw0, r_dw0, None, torch.float32)
    check("dbias (expanded dy)", db0, r_db0, None, torch.float32)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_default_outputs_and_determinism(device):
    """Without buffers the outputs are new contiguous tensors in the right dtypes, and the
    weight/bias gradients (fixed-order reduction of partials) are bitwise reproducible."""
    B, H, W, C = 2, 7, 9, 40
    x, weight, bias, dy = make_inputs(B, H, W, C, torch.float16, device, param_dtype=torch.float32)
    y = dwconv3x3_gelu_fwd(x, H, W, weight, bias)
    assert y.is_contiguous() and y.dtype == torch.float16 and y.shape == x.shape
    dx1, dw1, db1 = dwconv3x3_gelu_bwd(dy, x, H, W, weight, bias)
    dx2, dw2, db2 = dwconv3x3_gelu_bwd(dy, x, H, W, weight, bias)
    assert dx1.is_contiguous() and dx1.dtype == torch.float16
    assert dw1.is_contiguous() and dw1.dtype == torch.float32 and db1.dtype == torch.float32
    assert torch.equal(dx1, dx2) and torch.equal(dw1, dw2) and torch.equal(db1, db2)


# ---------------------------------------------------------------------------- bad input
BAD_DEVICE = "cuda" if HAS_CUDA else "cpu"


def _good(B=1, H=3, W=5, C=8, dtype=torch.float32):
    return make_inputs(B, H, W, C, dtype, BAD_DEVICE)


@pytest.mark.parametrize("make,exc,match", [
    (lambda x, w, b: (x[0], 3, 5, w, b), ValueError, "x must have 3 dims"),
    (lambda x, w, b: (x, 3, 4, w, b), ValueError, "N = 15 tokens but H . W = 3 . 4 = 12"),
    (lambda x, w, b: (x, 3.0, 5, w, b), TypeError, "H must be an int"),
    (lambda x, w, b: (x, 0, 5, w, b), ValueError, "H must be >= 1"),
    (lambda x, w, b: (x[:0], 3, 5, w, b), ValueError, "empty input"),
    (lambda x, w, b: (x, 3, 5, w[:, :, :2], b), ValueError, r"weight must have shape \(8, 1, 3, 3\)"),
    (lambda x, w, b: (x, 3, 5, w[:4], b[:4]), ValueError, r"weight must have shape \(8, 1, 3, 3\)"),
    (lambda x, w, b: (x, 3, 5, w, b[:7]), ValueError, r"bias must have shape \(8,\)"),
    (lambda x, w, b: (x, 3, 5, w, b[None]), ValueError, "bias must have 1 dims"),
    (lambda x, w, b: (x.double(), 3, 5, w, b), TypeError, "x dtype must be one of"),
    (lambda x, w, b: (x, 3, 5, w.half(), b), TypeError, "weight dtype must be x's dtype"),
    (lambda x, w, b: (x.half(), 3, 5, w, b.bfloat16()), TypeError, "bias dtype must be x's dtype"),
    (lambda x, w, b: (x.tolist(), 3, 5, w, b), TypeError, "x must be a torch.Tensor"),
    (lambda x, w, b: (x, 3, 5, w.to("meta"), b), ValueError, "weight is on meta"),
    (lambda x, w, b: (x.transpose(1, 2).contiguous().transpose(1, 2), 3, 5, w, b), ValueError, "stride 1"),
], ids=["rank", "N-vs-HW", "H-float", "H-zero", "empty", "weight-kernel", "weight-channels", "bias-len",
        "bias-rank", "float64", "weight-dtype", "bias-dtype", "not-tensor", "device-mix", "channel-stride"])
def test_forward_rejects_bad_input(make, exc, match):
    x, w, b, _ = _good()
    args = make(x, w, b)
    with pytest.raises(exc, match=match):
        dwconv3x3_gelu_fwd(*args)
    if isinstance(args[0], torch.Tensor) and args[0].dim() == 3:
        # The backward validates the same way before touching dy.
        with pytest.raises(exc, match=match):
            dwconv3x3_gelu_bwd(torch.randn_like(args[0]), *args)


def test_rejects_bad_buffers_and_backward_inputs():
    x, w, b, dy = _good()
    B, N, C = x.shape
    with pytest.raises(ValueError, match="approximate must be one of"):
        dwconv3x3_gelu_fwd(x, 3, 5, w, b, "fast")
    with pytest.raises(ValueError, match="out must have shape"):
        dwconv3x3_gelu_fwd(x, 3, 5, w, b, out=torch.empty(B, N + 1, C, device=x.device))
    with pytest.raises(TypeError, match="out must have dtype"):
        dwconv3x3_gelu_fwd(x, 3, 5, w, b, out=torch.empty(B, N, C, device=x.device, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must not share memory with x"):
        dwconv3x3_gelu_fwd(x, 3, 5, w, b, out=x)
    with pytest.raises(ValueError, match="dy must have shape"):
        dwconv3x3_gelu_bwd(dy[:, :-1], x, 3, 5, w, b)
    with pytest.raises(TypeError, match="dy dtype"):
        dwconv3x3_gelu_bwd(dy.half(), x, 3, 5, w, b)
    with pytest.raises(TypeError, match="dy must be a torch.Tensor"):
        dwconv3x3_gelu_bwd(None, x, 3, 5, w, b)
    with pytest.raises(ValueError, match="dx must have shape"):
        dwconv3x3_gelu_bwd(dy, x, 3, 5, w, b, dx=torch.empty(B, N, C + 1, device=x.device))
    with pytest.raises(ValueError, match="dx must not share memory with dy"):
        dwconv3x3_gelu_bwd(dy, x, 3, 5, w, b, dx=dy)
