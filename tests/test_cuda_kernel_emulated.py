"""The CUDA patch-embedding kernels, run on CPU by the CUDA emulation (tests/cuda_emulator.py).

The kernel source (csrc/overlap_patch_embed_kernel.cu) and the host driver that packs the
weight, plans the launch and adds the conv gradients (csrc/overlap_patch_embed_kernel_host.cpp)
are the very code the extension's CUDA op runs; only the CUDA runtime is stood in for. So these
tests check, without a GPU, the kernels' index math, padding, K orders, row tiles, the fp32 FFMA
and fp16/bf16 tensor-core (WMMA) main loops, the LayerNorm epilogues, the column sums, shared
memory sizing and barriers. They say nothing about speed or about what only hardware shows
(real warps' races, the memory model): tests/test_overlap_patch_embed.py runs the compiled
kernels whenever a GPU is present.
"""
import pytest
import torch

import cuda_emulator
from fastseg.ops.overlap_patch_embed import _as_image, overlap_patch_embed_reference
from test_overlap_patch_embed import CONFIGS, NAMES, assert_close_fp32, gold, ids, make_case, run

if cuda_emulator.cuda_include_dir() is None:
    pytest.skip("the CUDA headers are not installed (set CUDA_HOME)", allow_module_level=True)

# Real stage shapes at a small image, C = 64 ... 1000: all three row tiles (64, 32, 16 rows), the
# tensor-core fragment counts, and the > 48 KB shared-memory opt-in (C >= 512 in fp32).
STAGES = [(2, 3, 67, 45, 64, 7, 4, False), (2, 64, 17, 12, 128, 3, 2, True), (2, 128, 9, 6, 320, 3, 2, True),
          (2, 320, 5, 3, 512, 3, 2, True), (1, 8, 4, 4, 1000, 3, 2, True)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def emulator():
    return cuda_emulator.load()


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Deterministic mode fills every torch.empty with NaN (the driver's outputs, grad_y and the
    partial sums included), so an element a kernel never writes cannot pass unnoticed."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.empty(4).isnan().all(), "deterministic mode does not poison torch.empty here"
    yield
    torch.use_deterministic_algorithms(previous)


class EmulatedFunction(torch.autograd.Function):
    """The emulated kernels wired exactly as the extension's CUDA op: the backward recomputes."""

    @staticmethod
    def forward(ctx, ops, x, weight, bias, ln_weight, ln_bias, stride, eps):
        padding = weight.shape[-1] // 2
        out, mean, rstd, _ = ops.overlap_patch_embed_fwd(x, weight, bias, ln_weight, ln_bias, stride, padding, eps)
        ctx.save_for_backward(x, weight, bias, ln_weight, mean, rstd)
        ctx.ops, ctx.stride, ctx.padding = ops, stride, padding
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, ln_weight, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db, dg, dbeta = ctx.ops.overlap_patch_embed_bwd(grad, x, weight, bias, ln_weight, mean, rstd,
                                                                ctx.stride, ctx.padding, need[1], need[2])
        return (None, dx if need[1] else None, dw if need[2] else None, db if bias is not None else None, dg, dbeta,
                None, None)


def emulated(ops):
    def fn(x, weight, bias, stride, ln_weight, ln_bias, eps, hw=None):
        x4 = _as_image(x, hw)
        out = EmulatedFunction.apply(ops, x4, weight, bias, ln_weight, ln_bias, stride, eps)
        k = weight.shape[-1]
        return out, (x4.shape[2] + 2 * (k // 2) - k) // stride + 1, (x4.shape[3] + 2 * (k // 2) - k) // stride + 1
    return fn


def check(ops, cfg, dtype):
    """fp32 within 1e-4 of the float64 reference; fp16/bf16 no further from it than twice eager's
    error in the same dtype, plus one rounding unit (the CUDA tests' rule)."""
    tensors, meta = make_case(cfg)
    want = gold(tensors, meta)
    low = [t.to(dtype) for t in tensors]
    got = run(emulated(ops), low, meta)
    if dtype == torch.float32:
        assert_close_fp32(got, want)
        return
    eager = run(overlap_patch_embed_reference, low, meta)
    unit = torch.finfo(dtype).eps / 2
    skip = set()
    if dtype == torch.bfloat16 and meta["out_hw"][1] == 1:
        # dx and dweight come from ATen's convolution_backward, which on CPU in bfloat16 (oneDNN)
        # returns garbage when the output is one column wide (reproduced with torch alone; see
        # fastseg/ops/conv.py, which the Python paths use to avoid it). On a GPU they are cuDNN's;
        # here only the kernel's own outputs are judged.
        skip = {"dx", "dweight"}
    for name, g, e, w in zip(NAMES, [got[0]] + got[1], [eager[0]] + eager[1], [want[0]] + want[1]):
        if name in skip:
            continue
        assert g.dtype == dtype, f"{name} is {g.dtype}"
        assert torch.isfinite(g).all(), f"{name} has NaN/Inf"
        scale = w.norm().item()
        err, eager_err = [(t.double() - w).norm().item() / scale for t in (g, e)]
        assert err <= 2 * eager_err + unit, f"{name}: kernel {err:.2e} vs eager {eager_err:.2e} ({dtype})"


@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_cuda_kernel_matches_reference(emulator, cfg, dtype):
    check(emulator, cfg, dtype)


@pytest.mark.parametrize("cfg", STAGES, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_cuda_kernel_stage_shapes(emulator, cfg, dtype):
    check(emulator, cfg, dtype)


def test_emulated_cuda_kernel_strided_inputs_and_no_bias(emulator):
    """Inputs read in place through their strides: a column-subsampled NCHW image, a channel slice
    of a wider token tensor (unit channel stride, pixel stride > Cin), a channels-last image;
    and bias=None."""
    B, H, W, C = 2, 11, 9, 40
    cases = [(torch.randn(B, 3, H, 2 * W)[..., ::2], None, 3),
             (torch.randn(B, H * W, 48)[..., 8:40], (H, W), 32),
             (torch.randn(B, 16, H, W).to(memory_format=torch.channels_last), None, 16)]
    for x, hw, cin in cases:
        k, s = (7, 4) if cin == 3 else (3, 2)
        weight = torch.randn(C, cin, k, k) / (cin * k * k) ** 0.5
        params = [1 + 0.2 * torch.randn(C), 0.1 * torch.randn(C)]
        Ho, Wo = (H + 2 * (k // 2) - k) // s + 1, (W + 2 * (k // 2) - k) // s + 1
        meta = dict(stride=s, hw=hw, eps=1e-5, out_hw=(Ho, Wo))
        for bias in (0.1 * torch.randn(C), None):
            fn = emulated(emulator)
            leaves = [t.clone().requires_grad_(True) for t in (x, weight, *params)]
            out, _, _ = fn(leaves[0], leaves[1], bias, s, leaves[2], leaves[3], 1e-5, hw)
            grad = torch.randn_like(out)
            out.backward(grad)
            ref_leaves = [t.double().requires_grad_(True) for t in (x, weight, *params)]
            want, _, _ = overlap_patch_embed_reference(ref_leaves[0], ref_leaves[1],
                                                       None if bias is None else bias.double(), s, ref_leaves[2],
                                                       ref_leaves[3], 1e-5, hw)
            want.backward(grad.double())
            got_grads = [t.grad for t in leaves]
            want_grads = [t.grad for t in ref_leaves]
            assert_close_fp32((out.detach(), got_grads), (want.detach(), want_grads))
            assert (Ho, Wo) == meta["out_hw"]


def test_emulated_cuda_kernel_refuses_what_it_cannot_take(emulator):
    """The host driver's limits, with errors that say what to do."""
    x = torch.randn(1, 8, 4, 4)
    w = torch.randn(1100, 8, 3, 3)
    v = torch.randn(1100)
    with pytest.raises(ValueError, match="at most 1024 output channels"):
        emulator.overlap_patch_embed_fwd(x, w, v, v, v, 2, 1, 1e-5)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        emulator.overlap_patch_embed_fwd(x.double(), w[:16].double(), v[:16].double(), v[:16].double(),
                                         v[:16].double(), 2, 1, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_cuda_kernel_propagates_nonfinite(emulator, dtype):
    """NaN / +Inf / -Inf pixels: NaN and ±Inf in the tokens exactly where the reference has them
    (a LayerNorm row that sees one is NaN), the rest close to it (tests/test_nonfinite.py checks
    the CPU backends the same way)."""
    from test_nonfinite import NONFINITE, assert_same_nonfinite, plant

    fn = emulated(emulator)
    for value in NONFINITE.values():
        for tokens in (False, True):
            if tokens:
                H, W, Cin, k, s, hw = 9, 7, 8, 3, 2, (9, 7)
                x = plant(torch.randn(2, H * W, Cin, dtype=dtype), value, [(0, 20, 3), (1, 0, 0)])
            else:
                Cin, k, s, hw = 3, 7, 4, None
                x = plant(torch.randn(2, Cin, 13, 11, dtype=dtype), value, [(0, 1, 6, 5), (1, 2, 12, 0)])
            C = 16
            w, b = torch.randn(C, Cin, k, k, dtype=dtype) * 0.2, torch.randn(C, dtype=dtype)
            lw, lb = torch.rand(C, dtype=dtype) + 0.5, torch.randn(C, dtype=dtype)
            ref = overlap_patch_embed_reference(x, w, b, s, lw, lb, 1e-6, hw)[0]
            assert not torch.isfinite(ref).all()
            with torch.no_grad():
                out = fn(x, w, b, s, lw, lb, 1e-6, hw)[0]
            assert_same_nonfinite(out, ref, dtype, f"{value} {'tokens' if tokens else 'image'}")
