"""The cpp backend of mix_ffn (C++ CPU kernel in row tiles, csrc/mix_ffn_cpu.cpp) against the
eager composition: fp32 against an fp64 reference over odd maps, batches and tile sizes, both
GELU forms, with and without each bias; bf16 (GEMMs in bf16 and in fp32) within 2x eager bf16's
own error; oneDNN-packed weights; non-finite input; poisoned outputs; bad input; dispatch
(inference only); torch.compile; the fused SegFormer b0 with the op."""
import copy

import pytest
import torch

from conftest import rel_err
from fastseg import SegFormer, SegFormerConfig, parity
from fastseg.models.segformer import MixFFN
from fastseg.ops import dispatch, mix_ffn, mix_ffn_reference, use_backend
from fastseg.ops.mix_ffn import _has_cpp_op, fast_bf16_gemm, mix_ffn_cpp
from oracles import randomize_

pytestmark = pytest.mark.skipif(not _has_cpp_op(), reason="the compiled extension (with mix_ffn) is not built")

# (B, H, W, C, tile_rows): odd maps, a single pixel / row, a row wider than a small tile's token
# budget, tiles that do not divide H, batch > 1 (bands = whole images), one-row bands.
CASES = [(1, 13, 7, 16, 0), (2, 1, 1, 8, 0), (2, 2, 33, 8, 0), (1, 13, 7, 16, 2), (1, 13, 7, 16, 5),
         (3, 9, 5, 8, 3), (1, 4, 70, 4, 2), (1, 31, 3, 12, 0)]


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Deterministic mode fills every torch.empty (here and in ATen's at::empty) with NaN, so an
    output element the kernel never writes cannot pass."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.empty(4).isnan().all()
    yield
    torch.use_deterministic_algorithms(previous)


def make_params(C, hidden=None, fc1_bias=True, dw_bias=True, fc2_bias=True, dtype=torch.float64):
    Ch = hidden or 4 * C
    p = [torch.randn(Ch, C, dtype=dtype) / C ** 0.5, torch.randn(Ch, dtype=dtype) / 2,
         torch.randn(Ch, 1, 3, 3, dtype=dtype) / 3, torch.randn(Ch, dtype=dtype),
         torch.randn(C, Ch, dtype=dtype) / Ch ** 0.5, torch.randn(C, dtype=dtype)]
    for i, keep in ((1, fc1_bias), (3, dw_bias), (5, fc2_bias)):
        if not keep:
            p[i] = None
    return p


def cast(params, dtype):
    return [None if t is None else t.to(dtype) for t in params]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("B,H,W,C,tile", CASES)
def test_fp32_matches_fp64_reference(B, H, W, C, tile, approximate):
    x = torch.randn(B, H * W, C, dtype=torch.float64)
    params = make_params(C)
    want = mix_ffn_reference(x, H, W, *params, approximate)
    got = mix_ffn_cpp(x.float(), H, W, *cast(params, torch.float32), approximate, tile_rows=tile)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("biases", [(False, True, True), (True, False, True), (True, True, False),
                                    (False, False, False)])
def test_each_bias_optional(biases):
    B, H, W, C = 2, 6, 5, 8
    x = torch.randn(B, H * W, C, dtype=torch.float64)
    params = make_params(C, 24, *biases)
    want = mix_ffn_reference(x, H, W, *params)
    got = mix_ffn_cpp(x.float(), H, W, *cast(params, torch.float32), tile_rows=2)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("fp32_gemm", [True, False])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_bf16_within_twice_eager_bf16(fp32_gemm, param_dtype):
    B, H, W, C = 2, 11, 9, 16
    x = torch.randn(B, H * W, C)
    params = make_params(C, dtype=torch.float32)
    gold = mix_ffn_reference(x, H, W, *params)
    eager = mix_ffn_reference(x.bfloat16(), H, W, *cast(params, torch.bfloat16))
    got = mix_ffn_cpp(x.bfloat16(), H, W, *cast(params, param_dtype), tile_rows=3, fp32_gemm=fp32_gemm)
    assert got.dtype == torch.bfloat16
    ok, why = parity.judge(parity.errors(got, gold), parity.errors(eager, gold), low_precision=True)
    assert ok, why


def _pack(w, rows):
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w, rows)
    except (AttributeError, RuntimeError) as e:
        pytest.skip(f"oneDNN cannot pack a {w.dtype} linear weight here: {e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fc2_bias", [True, False])
def test_packed_weights(dtype, fc2_bias):
    if dtype == torch.bfloat16 and not fast_bf16_gemm():
        pytest.skip("bf16 packed weights need a CPU with oneDNN's bf16 GEMM (AVX-512 / AMX)")
    B, H, W, C = 2, 9, 7, 16
    x = torch.randn(B, H * W, C, dtype=torch.float64)
    params = make_params(C, fc2_bias=fc2_bias)
    want = mix_ffn_reference(x, H, W, *params)
    p = cast(params, dtype)
    packed = _pack(p[0], 2 * W), _pack(p[4], 2 * W)
    got = mix_ffn_cpp(x.to(dtype), H, W, *p, "none", *packed, tile_rows=2, fp32_gemm=False)
    plain = mix_ffn_cpp(x.to(dtype), H, W, *p, "none", tile_rows=2, fp32_gemm=False)
    bar = 1e-5 if dtype == torch.float32 else 2 * rel_err(plain, want) + 1e-3
    assert rel_err(got, want) <= bar


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_propagates_as_in_the_reference(value):
    B, H, W, C = 1, 7, 6, 8
    x = torch.randn(B, H * W, C)
    x[0, 3 * W + 2, 1] = value
    params = cast(make_params(C), torch.float32)
    want = mix_ffn_reference(x, H, W, *params)
    got = mix_ffn_cpp(x, H, W, *params, tile_rows=2)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    assert not finite.all() and rel_err(got[finite], want[finite]) <= 1e-5


def test_dispatch_is_inference_only():
    cpu = torch.device("cpu")
    assert dispatch.choose("mix_ffn", device=cpu, dtype=torch.float32).backend == "cpp"
    assert dispatch.choose("mix_ffn", device=cpu, dtype=torch.bfloat16).backend == "cpp"
    choice = dispatch.choose("mix_ffn", device=cpu, dtype=torch.float32, needs_grad=True)
    assert choice.backend == "torch" and "gradient" in " ".join(choice.skipped["cpp"])
    assert "dtype" in " ".join(dispatch.choose("mix_ffn", device=cpu, dtype=torch.float64).skipped["cpp"])
    # forced while training: the differentiable composition (its dwconv step the cpp kernel)
    x = torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True)
    params = make_params(4)
    with use_backend("cpp"):
        got = torch.autograd.grad(mix_ffn(x.float(), 2, 3, *cast(params, torch.float32)).sum(), x)[0]
    want = torch.autograd.grad(mix_ffn_reference(x, 2, 3, *params).sum(), x)[0]
    assert rel_err(got, want) < 1e-5


def test_training_keeps_the_torch_path_and_its_gradients():
    dim, H, W = 8, 5, 7
    ref = randomize_(MixFFN(dim, 4 * dim))
    fused = copy.deepcopy(ref)
    fused.fused = True
    x = torch.randn(2, H * W, dim)
    out = fused(x.requires_grad_(True), H, W)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in fused.parameters())
    with torch.no_grad():
        assert rel_err(fused(x, H, W), ref(x, H, W)) < 1e-5
        assert rel_err(fused.forward_pre_bias(x, H, W) + ref.fc2.bias, ref(x, H, W)) < 1e-5


def test_bad_input_is_named():
    params = cast(make_params(4), torch.float32)
    with pytest.raises(ValueError, match="tokens"):
        mix_ffn(torch.randn(6, 4), 2, 3, *params)
    with pytest.raises(ValueError, match="do not form"):
        mix_ffn(torch.randn(1, 6, 4), 2, 2, *params)
    with pytest.raises(TypeError, match="floating point"):
        mix_ffn(torch.ones(1, 6, 4, dtype=torch.int32), 2, 3, *params)
    with pytest.raises(ValueError, match="empty"):
        mix_ffn(torch.randn(0, 6, 4), 2, 3, *params)
    bad = list(params)
    bad[2] = torch.randn(16, 1, 5, 5)
    with pytest.raises(ValueError, match="dw_weight"):
        mix_ffn(torch.randn(1, 6, 4), 2, 3, *bad)
    bad = list(params)
    bad[4] = params[4].half()
    with pytest.raises(TypeError, match="fc2_weight"):
        mix_ffn(torch.randn(1, 6, 4), 2, 3, *bad)
    with pytest.raises(ValueError, match="approximate"):
        mix_ffn(torch.randn(1, 6, 4), 2, 3, *params, "fast")
    # the kernel's own checks: a dense tensor passed as packed, a bad tile, fp32_gemm on fp32
    with pytest.raises(ValueError, match="fc1_packed"):
        mix_ffn_cpp(torch.randn(1, 6, 4), 2, 3, *params, "none", params[0], None)
    with pytest.raises(ValueError, match="tile_rows"):
        mix_ffn_cpp(torch.randn(1, 6, 4), 2, 3, *params, tile_rows=-1)
    with pytest.raises(ValueError, match="fp32_gemm"):
        mix_ffn_cpp(torch.randn(1, 6, 4), 2, 3, *params, fp32_gemm=True)


def test_torch_compile_traces_the_op():
    H, W, C = 5, 6, 8
    x = torch.randn(2, H * W, C)
    params = cast(make_params(C), torch.float32)

    def f(x, *p):
        return mix_ffn(x, H, W, *p)

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got, want = compiled(x, *params), f(x, *params)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("H,W", [(61, 47), (37, 33)])
def test_fused_segformer_b0_with_the_op(H, W):
    config = SegFormerConfig.from_variant("b0", num_classes=7)
    ref = randomize_(SegFormer(config=config)).eval()
    fused = copy.deepcopy(ref).set_fused(True)
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        assert fused.backends()["mix_ffn"].backend == "cpp"
        want, got = ref(x), fused(x)
        gold = ref.double()(x.double())
    assert rel_err(got, gold) <= max(1e-4, 2 * rel_err(want, gold))
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.999
