"""Kernel-level tests of fastseg.kernels.decoder_upsample_fuse (forward + adjoint backward) against
a float64 PyTorch reference (permute to NCHW, F.interpolate(bilinear, align_corners=False), sum,
bias, ReLU, classifier). On CPU the kernels run under Triton's interpreter (slow: shapes are
tiny); with a GPU the same tests run on CUDA, plus a few larger GPU-only shapes.

Tolerances (DESIGN.md "Numerics"): fp32 max error <= 1e-4 x max |reference|; fp16/bf16 relative
L2 error <= 2 x that of the eager low-precision reference + eps(dtype) / 2.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastseg.kernels.decoder_upsample_fuse import upsample_sum_bwd, upsample_sum_fwd

from triton_devices import CPU, CPU_BF16, CUDA, HAS_CUDA


# ---------------------------------------------------------------------------- reference
def reference(maps, out_hw, bias=None, relu=False, cw=None, cb=None):
    """Plain PyTorch in the inputs' dtype. maps: list of (B, Hi, Wi, E) -> (B, H, W, E or K)."""
    s = 0
    for m in maps:
        x = m.permute(0, 3, 1, 2)
        if tuple(x.shape[-2:]) != tuple(out_hw):
            x = F.interpolate(x, size=tuple(out_hw), mode="bilinear", align_corners=False)
        s = s + x
    s = s.permute(0, 2, 3, 1)
    if bias is not None:
        s = s + bias
    if relu:
        s = torch.relu(s)
    if cw is not None:
        s = torch.einsum("bhwe,ke->bhwk", s, cw)
        if cb is not None:
            s = s + cb
    return s


def reference_in(dtype, maps, out_hw, bias=None, relu=False, cw=None, cb=None):
    """The reference with every tensor cast to `dtype` (float64 oracle or the eager fp16/bf16)."""
    cast = (lambda t: None if t is None else t.detach().to(dtype))
    return reference([cast(m) for m in maps], out_hw, cast(bias), relu, cast(cw), cast(cb))


def reference_grads(dtype, maps, out_hw, dout):
    """d(Σ resize(mapᵢ))/d mapᵢ driven by dout, in `dtype`, as (B, Hi, Wi, E) tensors."""
    leaves = [m.detach().to(dtype).requires_grad_() for m in maps]
    reference(leaves, out_hw).backward(dout.detach().to(dtype))
    return [leaf.grad for leaf in leaves]


# ---------------------------------------------------------------------------- helpers
def nan_like(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def max_err(got, ref):
    return (got.double() - ref.double()).abs().max().item()


def rel_l2(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(name, got, ref64, eager, dtype):
    assert not torch.isnan(got).any(), f"{name}: NaN left in output (element not written?)"
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    if dtype == torch.float32:
        err, ref_max = max_err(got, ref64), ref64.abs().max().item()
        tol = 1e-4 * ref_max
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} (max |ref| {ref_max:.3e})"
    else:
        err, base = rel_l2(got, ref64), rel_l2(eager, ref64)
        tol = 2 * base + torch.finfo(dtype).eps / 2
        assert err <= tol, f"{name}: rel L2 error {err:.3e} > 2 x eager {dtype} error {base:.3e} + eps/2"


def make_maps(B, sizes, E, dtype, device):
    # Unit-scale normals, fresh every call (never zeros).
    return [torch.randn(B, h, w, E, device=device).to(dtype) for h, w in sizes]


def make_head(E, K, has_bias, has_cls_bias, device):
    bias = torch.randn(E, device=device) if has_bias else None  # fp32, as the op layer folds it
    cw = cb = None
    if K is not None:
        cw = torch.randn(K, E, device=device) / E ** 0.5
        cb = torch.randn(K, device=device) if has_cls_bias else None
    return bias, cw, cb


def run_forward_and_check(device, dtype, case):
    B, out_hw, sizes, E, has_bias, relu, K, has_cls_bias = case
    H, W = out_hw
    maps = make_maps(B, sizes, E, dtype, device)
    bias, cw, cb = make_head(E, K, has_bias, has_cls_bias, device)
    cw = None if cw is None else cw.to(dtype)  # classifier weight in the maps' dtype
    out = nan_like((B, H, W, E if K is None else K), dtype, device)
    got = upsample_sum_fwd(maps, out_hw, bias, relu, cw, cb, out=out)
    assert got is out
    ref64 = reference_in(torch.float64, maps, out_hw, bias, relu, cw, cb)
    eager = None if dtype == torch.float32 else reference_in(dtype, maps, out_hw, bias, relu, cw, cb)
    check("out", out, ref64, eager, dtype)


def run_backward_and_check(device, dtype, B, out_hw, sizes, E):
    H, W = out_hw
    maps = make_maps(B, sizes, E, dtype, device)
    dout = torch.randn(B, H, W, E, device=device).to(dtype)
    bufs = [nan_like((B, h, w, E), dtype, device) for h, w in sizes]
    got = upsample_sum_bwd(dout, [m.shape for m in maps], out=bufs)
    assert all(g is buf for g, buf in zip(got, bufs))
    ref64 = reference_grads(torch.float64, maps, out_hw, dout)
    eager = [None] * len(maps) if dtype == torch.float32 else reference_grads(dtype, maps, out_hw, dout)
    for i, (g, r, e) in enumerate(zip(got, ref64, eager)):
        check(f"dmap[{i}] {tuple(sizes[i])}", g, r, e, dtype)


# ---------------------------------------------------------------------------- forward
# (B, (H, W), map sizes, E, bias?, relu?, K or None, classifier bias?). Under the interpreter:
# BLOCK_P 32, BLOCK_E 16, BLOCK_K 16, so these cross pixel, channel and class tile edges.
PYR_EVEN = ((16, 12), [(16, 12), (8, 6), (4, 3), (2, 2)])
PYR_ODD = ((15, 11), [(15, 11), (8, 6), (4, 3), (2, 2)])  # ceil-halving of odd sizes
DOWN = ((6, 5), [(11, 9), (3, 2), (6, 5)])                 # a downsampled map, an upsampled, as is
ODD_RATIOS = ((13, 10), [(5, 4), (7, 3), (1, 1)])          # non-integer ratios, a 1x1 map

FWD_CASES_FP32 = [
    (2, *PYR_EVEN, 24, True, True, None, False),
    (1, *PYR_ODD, 40, False, False, None, False),
    (2, *PYR_ODD, 24, True, True, 19, True),     # classifier: two class tiles
    (1, *PYR_EVEN, 40, False, True, 5, False),
    (1, *DOWN, 24, True, True, None, False),
    (1, *DOWN, 24, True, False, 1, True),        # K = 1
    (2, *ODD_RATIOS, 24, False, False, 5, True),
    (2, (9, 7), [(4, 3)], 24, True, False, None, False),  # a single map
]
FWD_CASES_LOWP = [
    (2, *PYR_EVEN, 24, True, True, None, False),
    (1, *PYR_ODD, 40, True, True, 19, True),
    (1, *DOWN, 24, True, False, 5, False),
]


def _fwd_id(case):
    B, (H, W), sizes, E, has_bias, relu, K, has_cls_bias = case
    parts = [f"B{B}", f"{H}x{W}", "+".join(f"{h}x{w}" for h, w in sizes), f"E{E}"]
    parts += ["bias"] * has_bias + ["relu"] * relu
    if K is not None:
        parts.append(f"K{K}" + ("b" if has_cls_bias else ""))
    return "-".join(parts)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("case", FWD_CASES_FP32, ids=_fwd_id)
def test_forward_fp32_matches_reference(device, case):
    run_forward_and_check(device, torch.float32, case)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("case", FWD_CASES_LOWP, ids=_fwd_id)
def test_forward_fp16_within_2x_eager(device, case):
    run_forward_and_check(device, torch.float16, case)


@pytest.mark.parametrize("device", [CPU_BF16, CUDA])
@pytest.mark.parametrize("case", FWD_CASES_LOWP, ids=_fwd_id)
def test_forward_bf16_within_2x_eager(device, case):
    run_forward_and_check(device, torch.bfloat16, case)


# ---------------------------------------------------------------------------- backward
# (B, (H, W), map sizes, E). The gather's cost under the interpreter grows with the window
# (2H/Hi + 2 rows x 2W/Wi + 2 columns), so batch 2 and E = 40 are used once each.
BWD_CASES_FP32 = [
    (1, *PYR_EVEN, 40),
    (2, *PYR_ODD, 24),
    (1, *DOWN, 24),
    (2, *ODD_RATIOS, 24),
]
BWD_CASES_LOWP = [(1, *PYR_ODD, 24), (1, *DOWN, 24)]


def _bwd_id(case):
    B, (H, W), sizes, E = case
    return "-".join([f"B{B}", f"{H}x{W}", "+".join(f"{h}x{w}" for h, w in sizes), f"E{E}"])


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("case", BWD_CASES_FP32, ids=_bwd_id)
def test_backward_fp32_matches_autograd(device, case):
    run_backward_and_check(device, torch.float32, *case)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("case", BWD_CASES_LOWP, ids=_bwd_id)
def test_backward_fp16_within_2x_eager(device, case):
    run_backward_and_check(device, torch.float16, *case)


@pytest.mark.parametrize("device", [CPU_BF16, CUDA])
@pytest.mark.parametrize("case", BWD_CASES_LOWP, ids=_bwd_id)
def test_backward_bf16_within_2x_eager(device, case):
    run_backward_and_check(device, torch.bfloat16, *case)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_backward_identity_map_and_default_outputs(device):
    """A full-size map's gradient is dout itself when dout is contiguous (documented aliasing),
    a contiguous copy otherwise; resized maps get fresh contiguous tensors in dout's dtype."""
    B, (H, W), E = 2, (7, 5), 24
    dout = torch.randn(B, H, W, E, device=device)
    same, small = upsample_sum_bwd(dout, [(H, W), (B, 3, 2, E)])
    assert same is dout
    assert small.shape == (B, 3, 2, E) and small.is_contiguous() and small.dtype == dout.dtype
    maps = make_maps(B, [(H, W), (3, 2)], E, torch.float32, device)
    check("dmap[1]", small, reference_grads(torch.float64, maps, (H, W), dout)[1], None, torch.float32)

    wide = torch.randn(B, H, W, E + 8, device=device)
    dout_nc = wide[..., 8:]  # channel stride 1, not contiguous
    (g,) = upsample_sum_bwd(dout_nc, [(H, W)])
    assert g.is_contiguous() and g.data_ptr() != wide.data_ptr() and torch.equal(g, dout_nc)


# One axis only (the other is 1), so the window loop is short: up- and downsampling ratios,
# integer and not, a 1-pixel source, and ratios where source coordinates land exactly on
# integers (the float-rounding margin of the adjoint window).
AXIS_PAIRS = [(1, 37), (3, 50), (50, 3), (7, 64), (64, 7), (2, 3), (3, 2), (5, 16), (16, 5),
              (33, 64), (13, 100), (100, 13), (4, 12), (12, 4)]


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_any_ratio_forward_and_adjoint(device, axis):
    for n_in, n_out in AXIS_PAIRS:
        out_hw, size = ((n_out, 1), (n_in, 1)) if axis == "rows" else ((1, n_out), (1, n_in))
        maps = make_maps(1, [size], 3, torch.float32, device)
        got = upsample_sum_fwd(maps, out_hw)
        check(f"out {n_in}->{n_out}", got, reference_in(torch.float64, maps, out_hw), None, torch.float32)
        dout = torch.randn(1, *out_hw, 3, device=device)
        (g,) = upsample_sum_bwd(dout, [size])
        check(f"dmap {n_in}->{n_out}", g, reference_grads(torch.float64, maps, out_hw, dout)[0], None, torch.float32)


# ---------------------------------------------------------------------------- strides
@pytest.mark.parametrize("device", [CPU, CUDA])
def test_strided_inputs_and_outputs(device):
    """Maps, bias, classifier weight, dout and all outputs are non-contiguous views: read and
    written through their strides, never copied."""
    B, (H, W), sizes, E, K = 2, *PYR_ODD, 24, 5
    maps = [
        torch.randn(B, 15, 11, E + 16, device=device)[..., 8:8 + E],             # channel slice
        torch.randn(8, B, 6, E + 8, device=device).transpose(0, 1)[..., :E],    # batch stride < row stride
        torch.randn(B, 3, 4, E, device=device).transpose(1, 2),                 # (4, 3) view, x stride > y stride
        torch.randn(B, 2, 2, 2 * E, device=device)[..., E:],
    ]
    assert [tuple(m.shape[1:3]) for m in maps] == sizes
    assert not any(m.is_contiguous() for m in maps)
    bias = torch.randn(2 * E, device=device)[::2]
    cw = torch.randn(E, K, device=device).t() / E ** 0.5  # (K, E) with strides (1, K)
    cb = torch.randn(K, 3, device=device)[:, 1]

    out = nan_like((B, H, W, E + 8), torch.float32, device)[..., 4:4 + E]
    upsample_sum_fwd(maps, (H, W), bias, True, out=out)
    check("out", out, reference_in(torch.float64, maps, (H, W), bias, True), None, torch.float32)

    logits = nan_like((B, W, H, K), torch.float32, device).transpose(1, 2)  # (B, H, W, K) view
    upsample_sum_fwd(maps, (H, W), bias, True, cw, cb, out=logits)
    check("logits", logits, reference_in(torch.float64, maps, (H, W), bias, True, cw, cb), None, torch.float32)

    dout = torch.randn(B, H, W, 2 * E, device=device)[..., :E]
    bufs = [nan_like((B, h, w, E + 4), torch.float32, device)[..., 4:] for h, w in sizes]
    got = upsample_sum_bwd(dout, sizes, out=bufs)
    for i, (g, r) in enumerate(zip(got, reference_grads(torch.float64, maps, (H, W), dout))):
        check(f"dmap[{i}]", g, r, None, torch.float32)

    # An expanded upstream gradient (what s.sum().backward() hands over: channel stride 0).
    dout0 = torch.randn(1, 1, 1, 1, device=device).expand(B, H, W, E)
    got = upsample_sum_bwd(dout0, sizes[1:3])
    for i, (g, r) in enumerate(zip(got, reference_grads(torch.float64, maps[1:3], (H, W), dout0))):
        check(f"dmap[{i}] (expanded dout)", g, r, None, torch.float32)


# ---------------------------------------------------------------------------- GPU sizes
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (too slow for the interpreter)")
@pytest.mark.parametrize("dtype,B,out_hw,E,K", [
    (torch.float16, 2, (128, 128), 256, 150),    # SegFormer-B0, ADE20K, 512x512
    (torch.bfloat16, 1, (128, 256), 768, 19),    # B2+, Cityscapes crop 512x1024
    (torch.float32, 1, (61, 47), 256, None),     # odd sizes, real GPU tiles
    (torch.float16, 1, (64, 64), 96, 300),       # K > 256: the grid splits classes
], ids=["fp16-b0-ade", "bf16-b2-city", "fp32-odd", "fp16-K300"])
def test_gpu_larger_shapes(dtype, B, out_hw, E, K):
    H, W = out_hw
    sizes = [(H, W), (-(-H // 2), -(-W // 2)), (-(-H // 4), -(-W // 4)), (-(-H // 8), -(-W // 8))]
    run_forward_and_check("cuda", dtype, (B, out_hw, sizes, E, True, True, K, K is not None))
    run_forward_and_check("cuda", dtype, (B, out_hw, sizes, E, True, False, None, False))
    run_backward_and_check("cuda", dtype, B, out_hw, sizes, E)


# ---------------------------------------------------------------------------- bad input
BAD_DEVICE = "cuda" if HAS_CUDA else "cpu"


def _good_maps(B=1, E=8, dtype=torch.float32):
    return make_maps(B, [(4, 4), (2, 2)], E, dtype, BAD_DEVICE)


@pytest.mark.parametrize("make,exc,match", [
    (lambda m: dict(maps=m[0]), TypeError, "maps must be a list"),
    (lambda m: dict(maps=[]), ValueError, "1 to 4 tensors, got 0"),
    (lambda m: dict(maps=m * 3), ValueError, "1 to 4 tensors, got 6"),
    (lambda m: dict(maps=[m[0], m[1].tolist()]), TypeError, r"maps\[1\] must be a torch.Tensor"),
    (lambda m: dict(maps=[m[0], m[1][0]]), ValueError, r"maps\[1\] must have 4 dims"),
    (lambda m: dict(maps=[m[0], m[1][..., :-1]]), ValueError, r"maps\[1\] has 7 channels"),
    (lambda m: dict(maps=[m[0], torch.cat([m[1], m[1]])]), ValueError, r"maps\[1\] batch 2 != maps\[0\] batch 1"),
    (lambda m: dict(maps=[m[0], m[1].half()]), TypeError, "does not match maps.0. dtype"),
    (lambda m: dict(maps=[m[0].double(), m[1].double()]), TypeError, "dtype must be one of"),
    (lambda m: dict(maps=[m[0], m[1].to("meta")]), ValueError, r"maps\[1\] is on meta"),
    (lambda m: dict(maps=[m[0], m[1].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)]),
     ValueError, "stride 1 in its channel"),
    (lambda m: dict(maps=[m[0][:0], m[1][:0]]), ValueError, "empty input"),
    (lambda m: dict(out_hw=(4, 0)), ValueError, "out_hw must be a pair of positive ints"),
    (lambda m: dict(out_hw=4), ValueError, "out_hw must be a pair"),
    (lambda m: dict(bias=torch.randn(7, device=BAD_DEVICE)), ValueError, r"bias must have shape \(8,\)"),
    (lambda m: dict(bias=torch.randn(8, device=BAD_DEVICE).double()), TypeError, "bias dtype"),
    (lambda m: dict(relu=1), TypeError, "relu must be a bool"),
    (lambda m: dict(classifier_weight=torch.randn(5, 7, device=BAD_DEVICE)), ValueError,
     r"classifier_weight must have shape \(K, E=8\)"),
    (lambda m: dict(classifier_weight=torch.randn(5, device=BAD_DEVICE)), ValueError,
     "classifier_weight must have 2 dims"),
    (lambda m: dict(classifier_weight=torch.randn(5, 8, device=BAD_DEVICE).half()), TypeError,
     "classifier_weight dtype"),
    (lambda m: dict(classifier_weight=torch.randn(5, 8, device=BAD_DEVICE),
                    classifier_bias=torch.randn(4, device=BAD_DEVICE)), ValueError,
     r"classifier_bias must have shape \(5,\)"),
    (lambda m: dict(classifier_bias=torch.randn(5, device=BAD_DEVICE)), ValueError, "without classifier_weight"),
    (lambda m: dict(out=torch.empty(1, 4, 4, 9, device=BAD_DEVICE)), ValueError, "out must have shape"),
    (lambda m: dict(out=torch.empty(1, 4, 4, 8, device=BAD_DEVICE).half()), TypeError, "out must have dtype"),
    (lambda m: dict(classifier_weight=torch.randn(5, 8, device=BAD_DEVICE),
                    out=torch.empty(1, 4, 4, 8, device=BAD_DEVICE)), ValueError, r"out must have shape \(1, 4, 4, 5\)"),
], ids=["not-list", "no-maps", "too-many", "not-tensor", "rank", "E-mismatch", "B-mismatch", "dtype-mix",
        "float64", "device-mix", "channel-stride", "empty", "zero-size", "hw-not-pair", "bias-shape",
        "bias-dtype", "relu-type", "cls-shape", "cls-rank", "cls-dtype", "cls-bias-shape",
        "cls-bias-alone", "out-shape", "out-dtype", "out-shape-cls"])
def test_forward_rejects_bad_input(make, exc, match):
    kwargs = dict(maps=_good_maps(), out_hw=(4, 4))
    kwargs.update(make(kwargs["maps"]))
    with pytest.raises(exc, match=match):
        upsample_sum_fwd(**kwargs)


@pytest.mark.parametrize("make,exc,match", [
    (lambda d: (d[0], [(4, 4)]), ValueError, "dout must have 4 dims"),
    (lambda d: (d.double(), [(4, 4)]), TypeError, "dout dtype must be one of"),
    (lambda d: (d[:0], [(4, 4)]), ValueError, "empty input"),
    (lambda d: (d, (2, 2)), ValueError, r"map_shapes\[0\] must be"),
    (lambda d: (d, torch.Size([1, 2, 2, 8])), ValueError, r"map_shapes\[0\] must be"),
    (lambda d: (d, []), ValueError, "1 to 4 shapes, got 0"),
    (lambda d: (d, [(2, 2)] * 5), ValueError, "1 to 4 shapes, got 5"),
    (lambda d: (d, [(1, 2, 2, 7)]), ValueError, "does not match dout's batch 1 / channels 8"),
    (lambda d: (d, [(2, 2, 2, 8)]), ValueError, "does not match dout's batch 1 / channels 8"),
    (lambda d: (d, [(0, 2)]), ValueError, "empty size"),
    (lambda d: (d, 3), TypeError, "map_shapes must be a list"),
], ids=["rank", "float64", "empty", "flat-shape", "size-not-list", "no-shapes", "too-many",
        "E-mismatch", "B-mismatch", "zero-size", "not-list"])
def test_backward_rejects_bad_input(make, exc, match):
    dout = torch.randn(1, 4, 4, 8, device=BAD_DEVICE)
    with pytest.raises(exc, match=match):
        upsample_sum_bwd(*make(dout))


def test_backward_rejects_bad_buffers():
    dout = torch.randn(1, 4, 4, 8, device=BAD_DEVICE)
    with pytest.raises(ValueError, match="out must be a list of 2 buffers"):
        upsample_sum_bwd(dout, [(4, 4), (2, 2)], out=[None])
    with pytest.raises(ValueError, match=r"out\[1\] must have shape \(1, 2, 2, 8\)"):
        upsample_sum_bwd(dout, [(4, 4), (2, 2)], out=[None, torch.empty(1, 2, 3, 8, device=BAD_DEVICE)])
    with pytest.raises(TypeError, match=r"out\[0\] must have dtype"):
        upsample_sum_bwd(dout, [(2, 2)], out=[torch.empty(1, 2, 2, 8, device=BAD_DEVICE).half()])
    with pytest.raises(ValueError, match="stride 1 in its channel"):
        buf = torch.empty(1, 8, 2, 2, device=BAD_DEVICE).permute(0, 2, 3, 1)
        upsample_sum_bwd(dout, [(2, 2)], out=[buf])
