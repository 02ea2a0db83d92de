"""The cpp backend of sr_attention (C++ CPU kernel, csrc/sr_attention_cpu.cpp) against the reference:
fp32 vs the fp64 reference over odd N, Nkv off the kernel's 16-column panels and its KV chunks, head
dims 32 / 64 / 40 and several heads, batches; bf16 within 2x eager bf16's error; strided views as the
models hand them over; outputs poisoned before the run; non-finite input as the reference gives;
dispatch (inference only); bad input; opcheck / torch.compile; the fused SegFormer b0."""
import copy

import pytest
import torch

from fastseg import parity
from fastseg.models import SegFormer
from fastseg.ops import BackendUnavailable, choose, dispatch, sr_attention, sr_attention_reference, use_backend
from fastseg.ops.overlap_patch_embed import extension_op_reasons
from fastseg.ops.sr_attention import CPP_ISA, sr_attention_cpp
from oracles import randomize_

pytestmark = pytest.mark.skipif(bool(extension_op_reasons("sr_attention_fwd")) or not CPP_ISA.get(torch.float32),
                                reason="the compiled extension with an sr_attention kernel for this CPU is not built")

CPU = torch.device("cpu")

# (B, N, Nkv, heads, head_dim): odd N (61*47 tokens), Nkv of 1, below / across / not a multiple of a
# 16-column panel, several KV chunks (1100 > 512: online softmax), head dims 32, 64 and 40 (not a
# multiple of the 16-channel panel), 2, 5 and 8 heads, batches of 1 to 3.
CASES = [
    (2, 61 * 47, 37, 2, 32),
    (1, 61 * 47, 1, 1, 32),
    (3, 50, 300, 1, 64),
    (1, 77, 1100, 1, 32),
    (2, 13, 16, 5, 64),
    (1, 29, 17, 1, 40),
    (1, 7, 256, 8, 64),
]


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Deterministic mode fills every torch.empty (here and in ATen's at::empty, which the kernel
    allocates its output with) with NaN: an output element the kernel never writes cannot pass."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.empty(4).isnan().all()
    yield
    torch.use_deterministic_algorithms(previous)


def make(B, N, Nkv, heads, head_dim, dtype=torch.float32):
    C = heads * head_dim
    return torch.randn(B, N, C, dtype=dtype), torch.randn(B, Nkv, 2 * C, dtype=dtype)


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.mark.parametrize("B,N,Nkv,heads,head_dim", CASES)
def test_fp32_matches_fp64_reference(B, N, Nkv, heads, head_dim):
    q, kv = make(B, N, Nkv, heads, head_dim)
    q, kv = 2 * q, 2 * kv  # peaked softmax rows too
    scale = head_dim ** -0.5
    with torch.no_grad():
        got = sr_attention_cpp(q, kv, heads, scale)
    want = sr_attention_reference(q.double(), kv.double(), heads, scale)
    assert got.dtype == torch.float32 and got.shape == q.shape and got.is_contiguous()
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("B,N,Nkv,heads,head_dim", CASES[:2] + CASES[3:])
def test_bf16_within_twice_eager_error(B, N, Nkv, heads, head_dim):
    q, kv = make(B, N, Nkv, heads, head_dim)
    scale = head_dim ** -0.5
    gold = sr_attention_reference(q, kv, heads, scale)
    qb, kvb = q.bfloat16(), kv.bfloat16()
    eager = sr_attention_reference(qb, kvb, heads, scale)
    with torch.no_grad():
        got = sr_attention_cpp(qb, kvb, heads, scale)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert not got.isnan().any()
    ok, why = parity.judge(parity.errors(got, gold), parity.errors(eager, gold), low_precision=True)
    assert ok, why


def test_isa_matches_the_cpu_flags():
    """bf16 takes the AVX512-BF16 dot products exactly where the CPU has them; fp32 the AVX-512
    micro-kernel where the CPU has AVX-512F, else the AVX2 one."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU flags from")
    fp32 = "avx512" if "avx512f" in flags else "avx2"
    assert CPP_ISA[torch.float32] == fp32
    assert CPP_ISA[torch.bfloat16] == ("avx512_bf16" if {"avx512f", "avx512_bf16"} <= flags else fp32)


@pytest.mark.skipif(CPP_ISA.get(torch.bfloat16) != "avx512_bf16",
                    reason="this CPU has no AVX512-BF16: the bf16 dot-product path cannot run here "
                           "(bf16 runs the fp32-widening AVX2 path, tested above)")
def test_avx512_bf16_path_matches_the_widening_math():
    """The bf16 dot products against the same inputs widened to fp32 (the AVX2 path's math): only
    P's rounding to bf16 separates them."""
    q, kv = make(2, 61 * 47, 300, 2, 32, torch.bfloat16)
    with torch.no_grad():
        got = sr_attention_cpp(q, kv, 2, 32 ** -0.5)
        wide = sr_attention_cpp(q.float(), kv.float(), 2, 32 ** -0.5)
    assert rel_err(got, wide) < 2e-2


def test_strided_views_are_read_in_place():
    """q and kv as column slices of one wider projection (SETR's qkv); a channel-strided q is copied."""
    B, N, Nkv, heads, D = 2, 45, 21, 2, 32
    C = heads * D
    wide = torch.randn(B, N, 3 * C)
    q, kv = wide[..., :C], wide[..., C:][:, :Nkv]
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # channel stride N
    want = sr_attention_reference(q.double(), kv.double(), heads, 0.2)
    with torch.no_grad():
        for qq in (q, qt):
            assert rel_err(sr_attention_cpp(qq, kv, heads, 0.2), want) <= 1e-5


# --- non-finite input -----------------------------------------------------------------------------

def assert_same_as_reference(got, want):
    """Same NaN / +inf / -inf positions as the fp32 reference; finite values close."""
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isposinf(), want.isposinf()) and torch.equal(got.isneginf(), want.isneginf())
    finite = torch.isfinite(want)
    assert finite.any()
    assert torch.allclose(got[finite], want[finite], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_as_reference(where, value):
    B, N, Nkv, heads, D = 2, 53, 40, 2, 32
    C = heads * D
    q, kv = make(B, N, Nkv, heads, D)
    if where == "q":
        q[0, 5, 3] = value  # head 0 of row 5
        q[1, 9, C - 1] = value  # head 1 of row 9
    elif where == "k":
        kv[0, 7, 3] = value  # a key of head 0: every row of head 0 sees it
    else:
        kv[1, 11, C + D + 4] = value  # a value of head 1, channel 4
    with torch.no_grad():
        got = sr_attention_cpp(q, kv, heads, D ** -0.5)
    want = sr_attention_reference(q, kv, heads, D ** -0.5)
    assert_same_as_reference(got, want)


def test_minus_inf_scores_get_zero_probability_across_chunks():
    """k channel 0 = +inf for every key of the first KV chunk: rows with q[..., 0] < 0 score -inf
    there (probability 0, a whole chunk of -inf before finite ones: online softmax must not turn it
    into NaN), rows with q[..., 0] > 0 score +inf (NaN rows, as in the reference)."""
    N, Nkv, D = 40, 1100, 32
    q, kv = make(1, N, Nkv, 1, D)
    kv[0, :300, 0] = float("inf")
    with torch.no_grad():
        got = sr_attention_cpp(q, kv, 1, D ** -0.5)
    want = sr_attention_reference(q, kv, 1, D ** -0.5)
    assert_same_as_reference(got, want)
    negative = q[0, :, 0] < 0
    assert torch.isfinite(got[0, negative]).all() and got[0, ~negative].isnan().all()


# --- dispatch, bad input, tracing -----------------------------------------------------------------

def test_dispatch_picks_cpp_for_inference_only():
    for dtype in (torch.float32, torch.bfloat16):
        assert choose("sr_attention", device=CPU, dtype=dtype, head_dim=32).backend == "cpp"
    for facts, why in ((dict(dtype=torch.float64, head_dim=32), "float64"),
                       (dict(dtype=torch.float16, head_dim=32), "float16"),
                       (dict(dtype=torch.float32, head_dim=36), "head dim 36"),
                       (dict(dtype=torch.float32, head_dim=32, needs_grad=True), "autograd")):
        choice = choose("sr_attention", device=CPU, **facts)
        assert choice.backend == "torch" and why in " ".join(choice.skipped["cpp"])
    q, kv = make(1, 9, 4, 2, 32)
    q.requires_grad_(True)
    with use_backend("cpp"), pytest.raises(BackendUnavailable, match="autograd"):
        sr_attention(q, kv, 2, 0.1)
    out = sr_attention(q, kv, 2, 0.1)  # training keeps the torch backend: gradients flow
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad(), use_backend("cpp"):
        assert rel_err(sr_attention(q, kv, 2, 0.1), sr_attention_reference(q.double(), kv.double(), 2, 0.1)) <= 1e-5


@pytest.mark.parametrize("q,kv,heads,error,match", [
    (torch.randn(1, 9, 64, dtype=torch.float64), torch.randn(1, 4, 128, dtype=torch.float64), 2,
     BackendUnavailable, "float64"),
    (torch.randn(1, 9, 72), torch.randn(1, 4, 144), 2, BackendUnavailable, "head dim 36"),
    (torch.randn(1, 9, 64), torch.randn(1, 4, 128).bfloat16(), 2, TypeError, "bfloat16"),
    (torch.randn(1, 9, 64), torch.randn(1, 4, 128, device="meta"), 2, ValueError, "meta"),
    (torch.randn(9, 64), torch.randn(1, 4, 128), 2, ValueError, "rank-3"),
    (torch.randn(1, 9, 64), torch.randn(1, 4, 96), 2, ValueError, "2C=128"),
    (torch.randn(1, 0, 64), torch.randn(1, 4, 128), 2, ValueError, "empty"),
])
def test_bad_input(q, kv, heads, error, match):
    with use_backend("cpp"), torch.no_grad(), pytest.raises(error, match=match):
        sr_attention(q, kv, heads, 0.1)


def test_kernel_checks_name_the_problem():
    op = torch.ops.fastseg_ext.sr_attention_fwd
    q, kv = torch.randn(1, 9, 64), torch.randn(1, 4, 128)
    for args, match in (((q.double(), kv.double(), 2, 0.1), "float32 or bfloat16"),
                        ((q, kv.bfloat16(), 2, 0.1), "kv is BFloat16"),
                        ((q, kv, 3, 0.1), "not divisible"),
                        ((torch.randn(1, 9, 24), torch.randn(1, 4, 48), 2, 0.1), "head dim 12"),
                        ((q, kv[..., :96], 2, 0.1), "2C=128"),
                        ((q.transpose(1, 2).contiguous().transpose(1, 2), kv, 2, 0.1), "stride 1"),
                        ((q[0], kv, 2, 0.1), "rank 3")):
        with pytest.raises(RuntimeError, match=match):
            op(*args)


def test_opcheck():
    q, kv = make(2, 23, 5, 2, 32)
    torch.library.opcheck(torch.ops.fastseg_ext.sr_attention_fwd.default, (q, kv, 2, 0.125),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_inference():
    q, kv = make(2, 23, 7, 2, 32)
    torch._dynamo.reset()
    with torch.no_grad(), use_backend("cpp"):
        compiled = torch.compile(lambda a, b: sr_attention(a, b, 2, 0.125), backend="aot_eager", fullgraph=True)
        got = compiled(q, kv)
    assert rel_err(got, sr_attention_reference(q.double(), kv.double(), 2, 0.125)) <= 1e-5


# --- the whole model ------------------------------------------------------------------------------

def test_fused_segformer_b0_with_the_cpp_kernel(images, monkeypatch):
    """b0 at 61x47 (stage 1: N = 16*12 tokens, Nkv = 2*2), fused, the automatic choice on CPU."""
    model = randomize_(SegFormer("b0", num_classes=5)).eval()
    gold = copy.deepcopy(model).double()
    model.set_fused(True)
    assert model.backends()["sr_attention"].backend == "cpp"
    calls = []
    implementation = dispatch.implementation

    def counting(op, backend):
        fn = implementation(op, backend)
        if op != "sr_attention":
            return fn
        return lambda *args: calls.append(backend) or fn(*args)

    monkeypatch.setattr(dispatch, "implementation", counting)
    with torch.no_grad():
        want = gold(images.double())
        got = model(images)
    assert calls == ["cpp"] * sum(model.config.depths)
    assert rel_err(got, want) <= 1e-4
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.999
