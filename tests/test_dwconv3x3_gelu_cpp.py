"""The cpp backend of dwconv3x3_gelu (C++ CPU kernel, csrc/dwconv3x3_gelu_cpu.cpp) against the
reference in fp64: forward and backward over odd shapes, with and without bias / in_bias, both
GELU forms; bf16 within 2x eager bf16's own error; strided input; poisoned outputs; dispatch;
bad input; torch.compile; the fused Mix-FFN (fc1 bias folded in) in fp32 and under autocast."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fastseg import parity
from fastseg.models.segformer import MixFFN
from fastseg.ops import dispatch, dwconv3x3_gelu, dwconv3x3_gelu_reference, use_backend
from fastseg.ops.dwconv3x3_gelu import _has_cpp_op, dwconv3x3_gelu_cpp
from oracles import randomize_

pytestmark = pytest.mark.skipif(not _has_cpp_op(), reason="the compiled extension (with dwconv3x3_gelu) is not built")

# (H, W, C): single pixel, single row / column, odd maps, C of 1, not a multiple of any SIMD width
CASES = [(1, 1, 20), (1, 7, 33), (7, 1, 1), (5, 3, 257), (61, 47, 5), (4, 6, 64)]
BIASES = [(True, True), (True, False), (False, True), (False, False)]


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Deterministic mode fills every torch.empty (here and in ATen's at::empty) with NaN, so an
    output element the kernel never writes cannot pass."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.empty(4).isnan().all()
    yield
    torch.use_deterministic_algorithms(previous)


def make_inputs(B, H, W, C, has_bias, has_in_bias, dtype=torch.float64):
    x = torch.randn(B, H * W, C, dtype=dtype)
    weight = torch.randn(C, 1, 3, 3, dtype=dtype) / 2
    bias = torch.randn(C, dtype=dtype) if has_bias else None
    in_bias = torch.randn(C, dtype=dtype) / 2 if has_in_bias else None
    return x, weight, bias, in_bias


def run(fn, x, H, W, weight, bias, in_bias, approximate, grad, dtype, param_dtype=None):
    """Output and gradients (x, weight, bias, in_bias) of fn on copies of the inputs in dtype."""
    param_dtype = param_dtype or dtype
    leaves = [x.to(dtype)] + [t.to(param_dtype) if t is not None else None for t in (weight, bias, in_bias)]
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in leaves]
    out = fn(leaves[0], H, W, leaves[1], leaves[2], approximate, in_bias=leaves[3])
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


NAMES = ["out", "dx", "dweight", "dbias", "din_bias"]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("has_bias,has_in_bias", BIASES)
@pytest.mark.parametrize("H,W,C", CASES)
def test_fp32_matches_fp64_reference(H, W, C, has_bias, has_in_bias, approximate):
    x, weight, bias, in_bias = make_inputs(2, H, W, C, has_bias, has_in_bias)
    grad = torch.randn(2, H * W, C, dtype=torch.float64)
    want = run(dwconv3x3_gelu_reference, x, H, W, weight, bias, in_bias, approximate, grad, torch.float64)
    with use_backend("cpp"):
        got = run(dwconv3x3_gelu, x, H, W, weight, bias, in_bias, approximate, grad, torch.float32)
    assert got[0].dtype == torch.float32
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None, name
            continue
        assert torch.isfinite(g).all(), name
        err = (g.double() - w).abs().max().item() / max(w.abs().max().item(), 1e-30)
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=["bf16-params", "fp32-params"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("H,W,C", [(61, 47, 5), (5, 3, 257), (1, 7, 33)])
def test_bf16_within_twice_eager_error(H, W, C, approximate, param_dtype):
    x, weight, bias, in_bias = make_inputs(2, H, W, C, True, True, torch.float32)
    x = x * 2
    grad = torch.randn(2, H * W, C)
    gold = run(dwconv3x3_gelu_reference, x, H, W, weight, bias, in_bias, approximate, grad, torch.float32)
    eager = run(dwconv3x3_gelu_reference, x, H, W, weight, bias, in_bias, approximate, grad, torch.bfloat16)
    with use_backend("cpp"):
        got = run(dwconv3x3_gelu, x, H, W, weight, bias, in_bias, approximate, grad, torch.bfloat16, param_dtype)
    assert got[0].dtype == torch.bfloat16
    for name, g, e, w in zip(NAMES, got, eager, gold):
        assert not torch.isnan(g).any(), name
        ok, why = parity.judge(parity.errors(g, w), parity.errors(e, w), low_precision=True)
        assert ok, f"{name}: {why}"


def test_bf16_rounds_to_nearest_even():
    """The store rounds the fp32 result to bf16 as torch's own cast does (ties to even)."""
    x, weight, bias, in_bias = make_inputs(1, 9, 11, 48, True, True, torch.float32)
    xb = x.bfloat16()
    with torch.no_grad():
        got = dwconv3x3_gelu_cpp(xb, 9, 11, weight, bias, "none", in_bias=in_bias)
        fp32 = dwconv3x3_gelu_cpp(xb.float(), 9, 11, weight, bias, "none", in_bias=in_bias)
    assert torch.equal(got, fp32.bfloat16())


def test_strided_input_is_read_in_place():
    H, W, C = 6, 5, 24
    x, weight, bias, in_bias = make_inputs(2, H, W, C, True, True, torch.float32)
    want = dwconv3x3_gelu_reference(x.double(), H, W, weight.double(), bias.double(), in_bias=in_bias.double())
    wide = torch.randn(2, H * W, 3 * C)
    wide[:, :, C:2 * C] = x
    strided = wide[:, :, C:2 * C]  # token stride 3C, channel stride 1
    transposed = x.transpose(1, 2).contiguous().transpose(1, 2)  # channel stride N: copied first
    with use_backend("cpp"):
        for t in (strided, transposed):
            got = dwconv3x3_gelu(t, H, W, weight, bias, in_bias=in_bias)
            assert got.is_contiguous()
            assert (got.double() - want).abs().max() / want.abs().max() < 1e-5


def test_extreme_values_stay_finite():
    """Large |z| (the erf tails, exp clamped) and a NaN input: finite where the input is, NaN kept."""
    C = 40
    x = torch.linspace(-60, 60, 3 * 4 * C).reshape(1, 12, C)
    weight = torch.zeros(C, 1, 3, 3)
    weight[:, 0, 1, 1] = 1.0  # identity conv: y = GELU(x)
    for dtype in (torch.float32, torch.bfloat16):
        for approximate in ("none", "tanh"):
            y = dwconv3x3_gelu_cpp(x.to(dtype), 3, 4, weight, None, approximate)
            want = F.gelu(x.to(dtype).float(), approximate=approximate)
            assert torch.isfinite(y).all()
            assert (y.float() - want).abs().max() <= 1e-5 * 60 + (0.25 if dtype == torch.bfloat16 else 0)
    xn = x.clone()
    xn[0, 5, 3] = float("nan")
    y = dwconv3x3_gelu_cpp(xn.bfloat16(), 3, 4, weight, None, "none")
    # NaN reaches the 3x3 neighbourhood of pixel (1, 1) (0 * NaN is NaN, as in conv2d), nothing else
    assert y[0, 5, 3].isnan() and torch.isfinite(y[0, 11]).all() and torch.isfinite(y[0, :, :3]).all()


def test_dispatch_picks_cpp_for_fp32_bf16_and_torch_otherwise():
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        assert dispatch.choose("dwconv3x3_gelu", device=cpu, dtype=dtype).backend == "cpp"
    for dtype in (torch.float64, torch.float16):
        choice = dispatch.choose("dwconv3x3_gelu", device=cpu, dtype=dtype)
        assert choice.backend == "torch"
        assert any("dtype" in r for r in choice.skipped["cpp"])
    with use_backend("cpp"), pytest.raises(dispatch.BackendUnavailable, match="float64"):
        dwconv3x3_gelu(torch.randn(1, 4, 8, dtype=torch.float64), 2, 2, torch.randn(8, 1, 3, 3, dtype=torch.float64),
                       None)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(in_bias=torch.randn(7)), ValueError, "in_bias"),
    (dict(in_bias=torch.ones(8, dtype=torch.int32)), TypeError, "in_bias"),
    (dict(in_bias=torch.randn(8, dtype=torch.float64)), TypeError, "in_bias"),
    (dict(bias=torch.randn(8, dtype=torch.float64)), TypeError, "bias"),
    (dict(weight=torch.randn(8, 1, 3, 3, dtype=torch.float64)), TypeError, "weight"),
    (dict(approximate="sigmoid"), ValueError, "approximate"),
    (dict(x=torch.randn(0, 4, 8)), ValueError, "empty"),
    (dict(in_bias="b1"), TypeError, "in_bias"),
])
def test_bad_input(kwargs, error, match):
    args = dict(x=torch.randn(1, 4, 8), H=2, W=2, weight=torch.randn(8, 1, 3, 3), bias=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        dwconv3x3_gelu(**args)


def test_kernel_checks_name_the_problem():
    x = torch.randn(1, 4, 8)
    with pytest.raises(RuntimeError, match="tokens do not form"):
        torch.ops.fastseg_ext.dwconv3x3_gelu_fwd(x, 3, 2, torch.randn(8, 1, 3, 3), None, None, "none")
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.fastseg_ext.dwconv3x3_gelu_fwd(x.double(), 2, 2, torch.randn(8, 1, 3, 3), None, None, "none")


def test_opcheck():
    x = torch.randn(2, 5 * 3, 20)
    args = (x, 5, 3, torch.randn(20, 1, 3, 3), torch.randn(20), torch.randn(20), "none")
    torch.library.opcheck(torch.ops.fastseg_ext.dwconv3x3_gelu_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_forward_backward():
    H, W, C = 5, 4, 24
    x, weight, bias, in_bias = make_inputs(2, H, W, C, True, True, torch.float32)
    leaves = [t.requires_grad_(True) for t in (x, weight, bias, in_bias)]

    def f(x, weight, bias, in_bias):
        return dwconv3x3_gelu(x, H, W, weight, bias, in_bias=in_bias).square().sum()

    torch._dynamo.reset()
    with use_backend("cpp"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(*leaves), leaves)
        want = torch.autograd.grad(f(*leaves), leaves)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)


def test_mix_ffn_fused_cpp_matches_reference():
    dim, H, W = 12, 7, 5
    ref = randomize_(MixFFN(dim, 4 * dim))
    fused = copy.deepcopy(ref)
    fused.fused = True
    gold = copy.deepcopy(ref).double()
    x = torch.randn(2, H * W, dim)
    grad = torch.randn(2, H * W, dim)

    def grads(module, x, grad):
        x = x.detach().clone().requires_grad_(True)
        out = module(x, H, W)
        out.backward(grad)
        return [out.detach(), x.grad] + [p.grad for p in module.parameters()]

    want = grads(gold, x.double(), grad.double())
    with use_backend("cpp"):
        got = grads(fused, x, grad)
    for name, g, w in zip(["out", "dx"] + [n for n, _ in ref.named_parameters()], got, want):
        err = (g.double() - w).abs().max().item() / w.abs().max().item()
        assert err < 1e-4, f"{name}: {err:.2e}"


def test_mix_ffn_fused_cpp_under_autocast():
    """bf16 activations with fp32 parameters (CPU autocast): the kernel computes in fp32."""
    dim, H, W = 16, 9, 6
    ref = randomize_(MixFFN(dim, 4 * dim)).eval()
    fused = copy.deepcopy(ref)
    fused.fused = True
    x = torch.randn(1, H * W, dim)
    with torch.no_grad():
        gold = ref(x, H, W)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = ref(x, H, W)
            with use_backend("cpp"):
                got = fused(x, H, W)
    assert got.dtype == torch.bfloat16
    ok, why = parity.judge(parity.errors(got, gold), parity.errors(eager, gold), low_precision=True)
    assert ok, why


def test_fc1_bias_goes_into_the_op_only_where_the_kernel_adds_it():
    """MixFFN hands fc1's bias to the op only for backends that add it in-kernel (cpp); with any
    other backend (the torch one here, Triton on a GPU) fc1 keeps it, and either way the block
    computes the reference."""
    from fastseg.ops.dwconv3x3_gelu import folds_in_bias

    cpu = torch.device("cpu")
    assert folds_in_bias(cpu, torch.float32) == _has_cpp_op()
    assert not folds_in_bias(cpu, torch.float64)
    torch.manual_seed(0)
    ref = MixFFN(20, 80).double()
    randomize_(ref)
    fused = copy.deepcopy(ref)
    fused.fused = True
    x = torch.randn(2, 7 * 5, 20, dtype=torch.float64)
    with use_backend("torch"):
        assert not folds_in_bias(cpu, torch.float32)
        got = fused(x, 7, 5)
    assert (got - ref(x, 7, 5)).abs().max() < 1e-10
