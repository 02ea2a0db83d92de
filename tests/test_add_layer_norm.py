"""add_layer_norm (residual add + bias + LayerNorm) against its float64 reference on the cpp and
torch backends: odd shapes, with/without h_bias, mixed dtypes, non-contiguous inputs, forward and
backward (same upstream gradients, every gradient compared), bf16 by the 2x-eager rule, dispatch,
bad input, the write-into-h path; and the fused SegFormer blocks built on it."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fastseg import SegFormer, SegFormerConfig, parity
from fastseg.ops import add_layer_norm, add_layer_norm_reference, choose, use_backend
from fastseg.ops.add_layer_norm import _has_cpp_op
from oracles import randomize_
from test_fused_segformer import assert_grads_match

HAS_CPP = _has_cpp_op()
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the compiled extension (with add_layer_norm) is not built")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), "torch"]
ROWS = [(1,), (7,), (61 * 47,)]
CHANNELS = [1, 20, 33, 64, 320, 513]
EPS = 1e-6


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Deterministic mode fills every torch.empty with NaN, so an element a kernel never writes
    cannot pass."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.empty(4).isnan().all() and torch.empty(4, dtype=torch.bfloat16).isnan().all()
    yield
    torch.use_deterministic_algorithms(previous)


def make(rows, C, dtypes=(torch.float32,) * 5, with_bias=True):
    """x, h, h_bias, weight, bias with fresh random values (never zeros) in the given dtypes."""
    xd, hd, hbd, wd, bd = dtypes
    x = torch.randn(*rows, C).to(xd)
    h = (torch.randn(*rows, C) * 0.7 + 0.3).to(hd)
    hb = (torch.randn(C) * 0.5).to(hbd) if with_bias else None
    w = (1 + 0.3 * torch.randn(C)).to(wd)
    b = (0.2 * torch.randn(C)).to(bd)
    return x, h, hb, w, b


def leaves(tensors, dtype=None):
    return [None if t is None else (t.detach().to(dtype) if dtype else t.detach().clone()).requires_grad_()
            for t in tensors]


def run(fn, tensors, gs, gy, out_dtype=None):
    """Forward and backward of fn with upstream gradients gs (for s) and gy (for y): outputs + grads."""
    s, y = fn(*tensors, EPS, out_dtype)
    torch.autograd.backward([s, y], [gs.to(s.dtype), gy.to(y.dtype)])
    return [s, y] + [None if t is None else t.grad for t in tensors]


NAMES = ["s", "y", "dx", "dh", "dh_bias", "dweight", "dbias"]


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "NaN/Inf in the tested output"
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# --- fp32 against the float64 reference --------------------------------------------------------------

# The torch backend is stock ops: a subset of the channel counts is enough for it.
GRID = [pytest.param("cpp", C, marks=needs_cpp) for C in CHANNELS] + [("torch", C) for C in (1, 33, 320)]


@pytest.mark.parametrize("backend,C", GRID)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp32_forward_backward_match_the_fp64_reference(backend, C, rows, with_bias):
    tensors = make(rows, C, with_bias=with_bias)
    gs, gy = torch.randn(*rows, C), torch.randn(*rows, C)
    with use_backend(backend):
        got = run(add_layer_norm, leaves(tensors), gs, gy)
    want = run(add_layer_norm_reference, leaves(tensors, torch.float64), gs.double(), gy.double())
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        # C == 1: y is the bias and its gradient paths vanish; compare absolutely there. Stock
        # F.layer_norm's xhat at C == 1 is fp32 rounding of s - mean times rstd = 1/sqrt(eps)
        # (eager's own noise, not zero): the torch backend gets that much slack on the gradients.
        err = rel(g, w) if w.abs().max() > 1e-6 else (g.double() - w).abs().max().item()
        tol = 1e-2 if (backend, C) == ("torch", 1) and name.startswith("d") else 1e-4
        assert err <= tol, f"{name}: {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_output_used_in_the_backward(backend):
    tensors = make((5, 3), 40)
    for use in ("s", "y"):
        mine, gold = leaves(tensors), leaves(tensors, torch.float64)
        with use_backend(backend):
            s, y = add_layer_norm(*mine, EPS)
        s64, y64 = add_layer_norm_reference(*gold, EPS)
        g = torch.randn_like(s64)
        (s if use == "s" else y).backward(g.float())
        (s64 if use == "s" else y64).backward(g)
        for name, a, b in zip(NAMES[2:], mine, gold):
            if use == "s" and name in ("dweight", "dbias"):
                assert a.grad is None or a.grad.abs().max() == 0, name
                continue
            assert rel(a.grad, b.grad) <= 1e-4, (use, name)


# --- low precision and mixed dtypes --------------------------------------------------------------------

F32, BF16 = torch.float32, torch.bfloat16
MIXED = [
    # (x, h, h_bias, weight, bias), out_dtype
    ((F32, BF16, F32, F32, F32), BF16),    # autocast: fp32 residual, bf16 GEMM output, y in bf16
    ((F32, BF16, F32, F32, F32), None),
    ((BF16, BF16, F32, F32, F32), None),   # bf16 stream, fp32 parameters
    ((BF16, BF16, BF16, BF16, BF16), None),  # a bf16 model
    ((BF16, F32, BF16, BF16, F32), F32),
]


def eager(x, h, hb, w, b, eps, out_dtype=None):
    """What eager PyTorch computes in these dtypes (the stock expression, bias in h's dtype)."""
    s = x + (h if hb is None else h + hb.to(h.dtype))
    y = F.layer_norm(s, (s.shape[-1],), w.to(s.dtype) if s.dtype == torch.float32 else w,
                     b.to(s.dtype) if s.dtype == torch.float32 else b, eps)
    return s, y if out_dtype is None else y.to(out_dtype)


@needs_cpp
@pytest.mark.parametrize("dtypes,out_dtype", MIXED)
@pytest.mark.parametrize("C", [33, 64, 320])
def test_mixed_and_bf16_within_twice_eager_error(dtypes, out_dtype, C):
    rows = (3, 41)
    tensors = make(rows, C, dtypes)
    gs, gy = torch.randn(*rows, C), torch.randn(*rows, C)
    with use_backend("cpp"):
        got = run(add_layer_norm, leaves(tensors), gs, gy, out_dtype)
    ref = run(eager, leaves(tensors), gs, gy, out_dtype)
    gold = run(add_layer_norm_reference, leaves(tensors, torch.float64), gs.double(), gy.double())
    s_dtype = torch.promote_types(dtypes[0], dtypes[1])
    assert got[0].dtype == s_dtype and got[1].dtype == (out_dtype or s_dtype)
    for t, src in zip(got[2:], tensors):
        assert t is None or t.dtype == src.dtype
    for name, g, e, w in zip(NAMES, got, ref, gold):
        if w is None:
            continue
        mine, theirs = parity.errors(g, w), parity.errors(e, w)
        ok, why = parity.judge(mine, theirs, low_precision=True)
        assert ok, f"{name}: {why}"


@needs_cpp
def test_bf16_rounding_is_to_nearest_even_and_keeps_nan():
    C = 64
    xb = torch.ones(4, C, dtype=torch.bfloat16)
    hb = (torch.randn(4, C) * 0.05).bfloat16()
    # Exact ties between two bf16 neighbours of 1 (ulp 2^-7): 1 + 2^-8 goes down to 1 (even),
    # 1 + 3·2^-8 up to 1 + 2^-6 (even); and the same just off the tie.
    hb[0, :4] = torch.tensor([2**-8, 3 * 2**-8, -(2**-9), 2**-8 + 2**-15])
    w, b = 1 + 0.1 * torch.randn(C), torch.randn(C)
    with use_backend("cpp"):
        s, y32 = add_layer_norm(xb, hb, None, w, b, EPS, torch.float32)
        _, y16 = add_layer_norm(xb, hb, None, w, b, EPS, torch.bfloat16)
    assert s.dtype == torch.bfloat16
    assert s[0, :4].float().tolist() == [1.0, 1 + 2**-6, 1.0, 1 + 2**-7]
    assert torch.equal(s, (xb.float() + hb.float()).bfloat16())  # torch's conversion rounds to nearest even
    assert torch.equal(y16, y32.bfloat16())
    hb[1, 5] = float("nan")
    with use_backend("cpp"):
        s, y = add_layer_norm(xb, hb, None, w, b, EPS)
    assert s[1, 5].isnan() and y[1].isnan().all() and torch.isfinite(y[[0, 2, 3]]).all()


# --- layouts -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_gradients(backend):
    B, N, C = 3, 29, 48
    base = torch.randn(B, N, 2 * C)
    x = base[..., :C]                               # row-strided: read in place
    h = torch.randn(N, B, C).transpose(0, 1)        # rows not one stride: copied
    hb, w, b = torch.randn(2 * C)[::2], 1 + 0.1 * torch.randn(C), torch.randn(C)
    tensors = (x, h, hb, w, b)
    gs = torch.randn(1, 1, C).expand(B, N, C)       # stride-0 upstream gradients
    gy = torch.randn(N, B, C).transpose(0, 1)
    with use_backend(backend):
        got = run(add_layer_norm, leaves(tensors), gs, gy)
    want = run(add_layer_norm_reference, leaves(tensors, torch.float64), gs.double(), gy.double())
    for name, g, ww in zip(NAMES, got, want):
        assert rel(g, ww) <= 1e-4, name
    with use_backend(backend), torch.no_grad():
        s, y = add_layer_norm(*tensors, EPS)
    assert s.is_contiguous() and y.is_contiguous() and rel(y, want[1]) <= 1e-4


# --- dispatch and bad input ------------------------------------------------------------------------------

@needs_cpp
def test_dispatch_picks_cpp_for_fp32_bf16_and_torch_for_fp64():
    cpu = torch.device("cpu")
    assert choose("add_layer_norm", device=cpu, dtype=torch.float32).backend == "cpp"
    assert choose("add_layer_norm", device=cpu, dtype=torch.bfloat16).backend == "cpp"
    c = choose("add_layer_norm", device=cpu, dtype=torch.float64)
    assert c.backend == "torch" and "float64" in " ".join(c.skipped["cpp"])
    c = choose("add_layer_norm", device=cpu, dtype=torch.float32, dtypes=(torch.float32, torch.float64))
    assert c.backend == "torch"
    x, h, hb, w, b = make((4,), 16, (torch.float64,) * 5)
    s, y = add_layer_norm(x, h, hb, w, b, EPS)  # runs on torch, in float64
    s64, y64 = add_layer_norm_reference(x, h, hb, w, b, EPS)
    assert s.dtype == y.dtype == torch.float64 and rel(y, y64) < 1e-12 and rel(s, s64) < 1e-15


@pytest.mark.parametrize("change,error,match", [
    (lambda t: dict(h=t["h"][:, :-1]), ValueError, "same shape"),
    (lambda t: dict(weight=t["weight"][:-1]), ValueError, "weight must have shape"),
    (lambda t: dict(h_bias=t["h_bias"][None]), ValueError, "h_bias must have shape"),
    (lambda t: dict(x=t["x"].int()), TypeError, "x must be floating point"),
    (lambda t: dict(bias=t["bias"].to("meta")), ValueError, "bias is on meta"),
    (lambda t: dict(x=t["x"][:0], h=t["h"][:0]), ValueError, "empty input"),
    (lambda t: dict(x=t["x"].tolist()), TypeError, "x must be a torch.Tensor"),
    (lambda t: dict(out_dtype=torch.int32), TypeError, "out_dtype"),
    (lambda t: dict(eps=-1.0), ValueError, "eps"),
], ids=["shape", "weight-shape", "bias-rank", "int", "device", "empty", "not-tensor", "out-dtype", "eps"])
def test_bad_input_names_the_problem(change, error, match):
    x, h, hb, w, b = make((3,), 8)
    args = dict(x=x, h=h, h_bias=hb, weight=w, bias=b, eps=EPS, out_dtype=None)
    args.update(change(args))
    with pytest.raises(error, match=match):
        add_layer_norm(**args)


@needs_cpp
def test_kernel_refuses_float64_and_overlapping_in_place():
    x, h, hb, w, b = make((3,), 8)
    with pytest.raises(TypeError, match="float64"):
        torch.ops.fastseg_ext.add_layer_norm_fwd(x.double(), h, hb, w, b, EPS, None)
    with pytest.raises(ValueError, match="shares memory"):
        torch.ops.fastseg_ext.add_layer_norm_fwd_(x, x, hb, w, b, EPS, None)
    with pytest.raises(ValueError, match="cannot be written into h"):
        torch.ops.fastseg_ext.add_layer_norm_fwd_(x, h.bfloat16(), hb, w, b, EPS, None)


# --- writing s into h ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_reuse_h_writes_only_scratch_and_only_when_safe(backend):
    x, h, hb, w, b = make((5, 7), 64)
    keep = [t.clone() for t in (x, h, hb, w, b)]
    want_s, want_y = add_layer_norm_reference(x, h, hb, w, b, EPS)
    with use_backend(backend):
        # Without the promise, or where a gradient is needed, h is never touched.
        for grad in (False, True):
            hh = h.clone().requires_grad_(grad)
            s, y = add_layer_norm(x, hh, hb, w, b, EPS, reuse_h=not grad)
            if grad:
                assert torch.equal(hh.detach(), h)
        s, y = add_layer_norm(x, h, hb, w, b, EPS)
        assert torch.equal(h, keep[1])
        # Unsafe cases with the promise: a view, a dtype that cannot hold s, memory shared with x.
        big = h.clone().repeat(1, 1, 2)
        view = big[..., :64]
        with torch.inference_mode():
            add_layer_norm(x, view, hb, w, b, EPS, reuse_h=True)
        assert torch.equal(view, h)
        hb16 = h.bfloat16()
        add_layer_norm(x, hb16, hb, w, b, EPS, reuse_h=True)
        assert torch.equal(hb16, h.bfloat16())
        # The safe case: s is h's memory, every other input is untouched, the values are right.
        for mode in (torch.inference_mode, torch.no_grad):
            scratch = h.clone()
            with mode():
                s, y = add_layer_norm(x, scratch, hb, w, b, EPS, reuse_h=True)
            assert s.data_ptr() == scratch.data_ptr()
            assert rel(s, want_s) <= 1e-6 and rel(y, want_y) <= 1e-4
    for t, k in zip((x, h, hb, w, b), keep):
        assert torch.equal(t, k)


# --- torch.compile ---------------------------------------------------------------------------------------------

@needs_cpp
def test_compiled_forward_and_backward_without_graph_breaks():
    tensors = make((2, 9), 40)

    def f(x, h, hb, w, b):
        s, y = add_layer_norm(x, h, hb, w, b, EPS)
        return s, y

    torch._dynamo.reset()
    with use_backend("cpp"):
        explanation = torch._dynamo.explain(f)(*tensors)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        gs, gy = torch.randn(2, 9, 40), torch.randn(2, 9, 40)
        got = run(lambda *a: compiled(*a[:5]), leaves(tensors), gs, gy)
        want = run(lambda *a: f(*a[:5]), leaves(tensors), gs, gy)
    torch._dynamo.reset()
    for name, g, w in zip(NAMES, got, want):
        assert torch.equal(g, w), name


@needs_cpp
def test_opcheck_custom_ops():
    x, h, hb, w, b = make((3, 5), 24)
    s, y, mean, rstd = torch.ops.fastseg_ext.add_layer_norm_fwd(x, h, hb, w, b, EPS, None)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastseg_ext.add_layer_norm_fwd.default, (x, h, hb, w, b, EPS, torch.bfloat16),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.fastseg_ext.add_layer_norm_fwd.default, (x, h.bfloat16(), None, w, b, EPS, None),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.fastseg_ext.add_layer_norm_fwd_.default, (x, h.clone(), hb, w, b, EPS, None),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.fastseg_ext.add_layer_norm_bwd.default,
                          (torch.randn_like(y), torch.randn_like(s), s, w, mean, rstd), test_utils=tests)
    torch.library.opcheck(torch.ops.fastseg_ext.add_layer_norm_bwd.default,
                          (torch.randn_like(y), None, s, w, mean, rstd), test_utils=tests)


# --- the fused SegFormer blocks -------------------------------------------------------------------------------

def small_pair(**cfg):
    config = SegFormerConfig.from_variant("b0", num_classes=5, **cfg)
    ref = randomize_(SegFormer(config=config))
    return ref, copy.deepcopy(ref).set_fused(True)


def test_mixffn_pre_bias_output_plus_bias_is_forward():
    ref, fused = small_pair()
    for model in (ref, fused):
        mlp = model.encoder.stages[1].blocks[0].mlp
        x = torch.randn(2, 8 * 6, mlp.fc1.in_features)
        with torch.no_grad():  # fp32: the bias added after the GEMM instead of inside it
            assert rel(mlp.forward_pre_bias(x, 8, 6) + mlp.fc2.bias, mlp(x, 8, 6)) < 1e-6


def test_fused_model_fp64_forward_matches_the_reference():
    ref, fused = small_pair()
    ref, fused = ref.double().eval(), fused.double().eval()
    x = torch.randn(1, 3, 61, 47, dtype=torch.float64)
    with torch.no_grad():
        feats_ref, feats = ref.forward_features(x), fused.forward_features(x)
        want, got = ref.decoder(feats_ref), fused.decoder(feats)
    for a, b in zip(feats, feats_ref):
        assert rel(a, b) < 1e-10
    assert rel(got, want) < 1e-10
    assert fused.backends(dtype=torch.float64)["add_layer_norm"].backend == "torch"


def test_fused_training_step_gradients_match():
    """fp64: fused = reference to 1e-8 per gradient; fp32 (the cpp kernels): against the fp64
    gold, within 1e-4 or twice the eager fp32 model's own error (tests/test_fused_segformer.py)."""
    ref, fused = small_pair(drop_path_rate=0.0, decoder_dropout=0.0)
    gold, gold_fused = copy.deepcopy(ref).double(), copy.deepcopy(fused).double()
    x = torch.randn(1, 3, 61, 47)
    grad = torch.randn(1, 5, 16, 12)
    for model, dtype in ((ref, torch.float32), (fused, torch.float32), (gold, torch.float64),
                         (gold_fused, torch.float64)):
        model.train()(x.to(dtype)).backward(grad.to(dtype))
    floor = 1e-6 * max(p.grad.abs().max().item() for p in gold.parameters())
    for (name, p), q in zip(gold.named_parameters(), gold_fused.parameters()):
        scale = max(p.grad.abs().max().item(), floor)
        assert (q.grad - p.grad).abs().max().item() / scale < 1e-8, name
    assert_grads_match(fused, ref, gold)


def test_drop_path_stays_exact_in_training():
    """DropPath active (p > 0): the same random masks as eager, so fp64 outputs and gradients agree."""
    ref, fused = small_pair(drop_path_rate=0.3, decoder_dropout=0.0)
    ref, fused = ref.double().train(), fused.double().train()
    x = torch.randn(2, 3, 35, 33, dtype=torch.float64)
    grad = torch.randn(2, 5, 9, 9, dtype=torch.float64)
    torch.manual_seed(7)
    want = ref(x)
    torch.manual_seed(7)
    got = fused(x)
    assert rel(got, want) < 1e-10
    want.backward(grad)
    got.backward(grad)
    floor = 1e-6 * max(p.grad.abs().max().item() for p in ref.parameters())
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert (q.grad - p.grad).abs().max().item() <= 1e-8 * max(p.grad.abs().max().item(), floor), name


def test_stage_outputs_under_bf16_autocast_keep_eager_dtype_and_accuracy():
    ref, fused = small_pair()
    ref, fused = ref.eval(), fused.eval()
    x = torch.randn(1, 3, 61, 47)
    with torch.inference_mode():
        gold = ref.forward_features(x)
        with torch.autocast("cpu", torch.bfloat16):
            eager, mine = ref.forward_features(x), fused.forward_features(x)
    for g, e, m in zip(gold, eager, mine):
        assert m.dtype == e.dtype and m.shape == e.shape
        ok, why = parity.judge(parity.errors(m, g), parity.errors(e, g), low_precision=True)
        assert ok, why
