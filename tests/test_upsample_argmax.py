"""upsample_argmax against the two-step F.interpolate(...).argmax(1), on every backend: random
and odd sizes, K = 1, 19, 150, 300, NCHW and channels-last logits, ties, NaN, bad input."""
import random

import pytest
import torch
import torch.nn.functional as F

from fastseg import ops
from fastseg.ops import dispatch
from fastseg.ops.upsample_argmax import _has_cpp_op, upsample_argmax_cpp, upsample_argmax_reference, upsample_argmax_triton

from triton_devices import CPU, CUDA

HAS_CPP = _has_cpp_op()
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the compiled extension (with upsample_argmax) is not built")


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Deterministic mode fills every torch.empty (labels: the int64 maximum, scores: NaN), so a
    pixel a kernel never writes cannot pass as a label or a score."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.empty(4).isnan().all() and (torch.empty(4, dtype=torch.int64) == torch.iinfo(torch.int64).max).all()
    yield
    torch.use_deterministic_algorithms(previous)


def two_step(logits, size):
    up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return up, up.argmax(1)


def random_case(K, max_in=24, max_out=70, channels_last=None):
    h, w = random.randint(1, max_in), random.randint(1, max_in)
    H, W = random.randint(1, max_out) | 1, random.randint(1, max_out)  # odd heights
    x = torch.randn(random.randint(1, 2), K, h, w) * 3
    if channels_last if channels_last is not None else random.random() < 0.5:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, (H, W)


def assert_labels_match(labels, scores, logits, size, rel_tol=1e-5, score_tol=4e-6):
    """Labels equal to the two-step ones except at near-ties (the two best interpolated values within
    a few ulps), and the scores are the interpolated maxima to a few ulps."""
    up, ref = two_step(logits.double() if logits.dtype == torch.float64 else logits, size)
    assert labels.shape == ref.shape and labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < logits.shape[1]
    top = up.max(1).values
    at_label = up.gather(1, labels[:, None])[:, 0]
    gap = (top - at_label) / (1 + top.abs())
    assert gap.max() <= rel_tol, f"a label is not a (near-)maximum: gap {gap.max().item():.3g}"
    disagree = (labels != ref).float().mean().item()
    assert disagree <= 2e-3, f"{disagree:.2%} of the labels differ from the two-step version"
    if scores is not None:
        torch.testing.assert_close(scores, at_label, rtol=score_tol, atol=score_tol)
    return disagree


# --- reference -----------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [1, 19, 150, 300])
def test_reference_is_exactly_the_two_step_version(K):
    for trial in range(4):
        x, size = random_case(K, channels_last=bool(trial % 2))
        up, ref = two_step(x, size)
        labels, scores = upsample_argmax_reference(x, size, return_scores=True)
        assert torch.equal(labels, ref), (K, tuple(x.shape), size)
        assert torch.equal(scores, up.max(1).values)


def test_reference_ties_and_nan_follow_torch_argmax():
    x = torch.zeros(1, 130, 3, 4)
    x[:, 70] = 1.0
    x[:, 100] = 1.0  # a tie across two 64-class slices: the first wins
    assert (upsample_argmax_reference(x, (5, 7)) == 70).all()
    x[0, 90, 1, 2] = float("nan")
    labels = upsample_argmax_reference(x, (3, 4))
    assert labels[0, 1, 2] == 90 and torch.equal(labels, x.argmax(1))


# --- C++ and Triton kernels ------------------------------------------------------------------------

def _backend_impls():
    impls = [pytest.param(upsample_argmax_cpp, "cpu", marks=needs_cpp, id="cpp")]
    for dev in (CPU, CUDA):
        impls.append(pytest.param(upsample_argmax_triton, dev.values[0], marks=dev.marks, id=f"triton-{dev.values[0]}"))
    return impls


@needs_cpp
@pytest.mark.parametrize("K", [1, 19, 150, 300])
def test_cpp_kernel_against_the_two_step_version(K):
    total = 0.0
    for trial in range(8):
        x, size = random_case(K, max_in=32, max_out=130, channels_last=bool(trial % 2))
        labels, scores = upsample_argmax_cpp(x, size, return_scores=True)
        total += assert_labels_match(labels, scores, x, size)
        assert torch.equal(upsample_argmax_cpp(x, size), labels)
    # float64 too
    x, size = random_case(K)
    labels, scores = upsample_argmax_cpp(x.double(), size, return_scores=True)
    assert_labels_match(labels, scores, x.double(), size, rel_tol=1e-12)


@needs_cpp
def test_cpp_kernel_at_the_segformer_ratio_and_odd_layouts():
    # x4 upsampling of 1/4 logits to an odd image size, a sliced (non-contiguous) view, K = 150
    x = torch.randn(1, 150, 16, 13)
    for logits in (x, x.contiguous(memory_format=torch.channels_last), torch.randn(1, 300, 16, 13)[:, ::2]):
        labels, scores = upsample_argmax_cpp(logits, (61, 51), return_scores=True)
        assert_labels_match(labels, scores, logits, (61, 51))
    # same size in and out: a pure argmax, exact
    assert torch.equal(upsample_argmax_cpp(x, (16, 13)), x.argmax(1))


@pytest.mark.parametrize("impl,device", _backend_impls())
def test_kernel_ties_and_nan(impl, device):
    x = torch.zeros(2, 21, 4, 5, device=device)
    x[:, 3] = 2.0
    x[:, 17] = 2.0
    assert (impl(x, (9, 11)) == 3).all()
    x[1, 8, 2, 2] = float("nan")
    labels = impl(x, (4, 5))
    assert torch.equal(labels.cpu(), x.cpu().argmax(1))


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("K", [1, 19, 150, 300])
def test_triton_kernel_against_the_two_step_version(K, device):
    # small shapes: the interpreter runs every class of every program in Python
    max_in, max_out = (12, 21) if K <= 19 or device == "cuda" else (6, 7)
    for trial in range(2 if K <= 150 or device == "cuda" else 1):
        x, size = random_case(K, max_in=max_in, max_out=max_out, channels_last=bool(trial % 2))
        x = x.to(device)
        labels, scores = upsample_argmax_triton(x, size, return_scores=True)
        assert_labels_match(labels.cpu(), scores.cpu(), x.cpu(), size)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_triton_kernel_low_precision_logits(device):
    x = torch.randn(1, 19, 7, 6).to(device)
    for dtype in (torch.float16, torch.bfloat16):
        labels, scores = upsample_argmax_triton(x.to(dtype), (13, 11), return_scores=True)
        # interpolated in fp32 from the rounded logits
        assert_labels_match(labels.cpu(), scores.cpu().float(), x.to(dtype).float().cpu(), (13, 11), rel_tol=1e-2,
                            score_tol=1e-2)
        assert scores.dtype == dtype


# --- the op: dispatch, bad input, no gradient ----------------------------------------------------

def test_op_dispatch_and_every_forced_backend_agrees():
    x = torch.randn(2, 19, 9, 7)
    ref = upsample_argmax_reference(x, (33, 29))
    choice = dispatch.choose("upsample_argmax", device=x.device, dtype=x.dtype)
    assert choice.backend == ("cpp" if HAS_CPP else "reference")
    for name in ["reference"] + (["cpp"] if HAS_CPP else []):
        with ops.use_backend(name):
            labels, scores = ops.upsample_argmax(x, (33, 29), return_scores=True)
        assert_labels_match(labels, scores, x, (33, 29))
        assert (labels == ref).float().mean() > 0.998


def test_bad_input_and_no_gradient():
    x = torch.randn(1, 4, 5, 6)
    with pytest.raises(ValueError, match=r"\(B, K, h, w\)"):
        ops.upsample_argmax(x[0], (8, 8))
    with pytest.raises(TypeError, match="floating point"):
        ops.upsample_argmax(x.long(), (8, 8))
    with pytest.raises(ValueError, match="positive"):
        ops.upsample_argmax(x, (0, 8))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        ops.upsample_argmax(x, (1, 2, 3))
    empty = ops.upsample_argmax(x[:0], (8, 9))
    assert empty.shape == (0, 8, 9) and empty.dtype == torch.int64
    w = x.clone().requires_grad_(True)
    labels, scores = ops.upsample_argmax(w * 2, (8, 8), return_scores=True)
    assert not scores.requires_grad and labels.dtype == torch.int64
    assert ops.upsample_argmax(x, 7).shape == (1, 7, 7)


# --- the decoder's banded resize-sum (inference memory) ---------------------------------------------

def test_decoder_banded_upsample_sum_matches_the_full_one(monkeypatch):
    from fastseg.ops import decoder_upsample_fuse as d

    H, W, E, K = 37, 29, 48, 19
    maps = [torch.randn(2, H, W, E), torch.randn(2, 19, 15, E), torch.randn(2, 10, 8, E), torch.randn(2, 5, 4, E)]
    bias, cw, cb = torch.randn(E), torch.randn(K, E) / 7, torch.randn(K)
    monkeypatch.setattr(d, "BAND_ELEMENTS", 3 * 2 * W * E)  # bands of 3 rows, a short last one
    for kw in ({}, {"relu": True, "classifier_weight": cw, "classifier_bias": cb}):
        ref = d.upsample_sum_reference(maps, (H, W), bias, **kw)
        with torch.no_grad():
            got = d.upsample_sum_torch(maps, (H, W), bias, **kw)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    m = maps[1].clone().requires_grad_(True)  # with autograd: the unbanded form
    d.upsample_sum_torch([maps[0], m], (H, W), bias).sum().backward()
    assert m.grad is not None


def test_ops_trace_with_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 19, 8, 9)
        for op in ([torch.ops.fastseg_ext.upsample_argmax_fwd] if HAS_CPP else []) + [torch.ops.fastseg.upsample_argmax_fwd]:
            labels, scores = op(x, 31, 35, True)
            assert labels.shape == (2, 31, 35) and labels.dtype == torch.int64 and scores.shape == (2, 31, 35)
            assert op(x, 31, 35, False)[1].shape == (0, 31, 35)


@pytest.mark.parametrize("K", [32, 75])
def test_cpp_channels_last_lanes_keep_the_first_maximum_and_the_first_nan(K):
    """The C++ channels-last loop reduces classes in interleaved lanes (k mod 16) and then the tail
    (k >= 16 * (K // 16)): a tie or a NaN in a lower lane but at a later class must lose."""
    x = torch.zeros(1, K, 2, 8)
    x[0, :, 0, 0] = 0; x[0, [17, 3], 0, 0] = 5.0           # tie: lane 1 (k=17) vs lane 3 (k=3): 3 wins
    x[0, [33 % K, 20], 0, 1] = 5.0                         # tie: lane 1 vs lane 4
    x[0, [K - 1, K - 2], 0, 2] = 7.0                       # a tie in the tail (or the last lane group)
    x[0, 5, 0, 3] = 7.0; x[0, K - 1, 0, 3] = 7.0           # a lane value ties the last class
    x[0, [18, 2], 0, 4] = float("nan")                     # NaN in lane 2 (k=18) and lane 2 (k=2)
    x[0, [16, 30], 0, 5] = float("nan")                    # NaN in lane 0 (k=16) and lane 14 (k=30)
    x[0, K - 1, 0, 6] = float("nan"); x[0, 0, 0, 6] = 9.0  # a NaN only in the last class
    x[0, :, 1] = torch.randn(K, 8)
    x = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(upsample_argmax_cpp(x, (2, 8)), x.argmax(1))


@needs_cpp
@pytest.mark.parametrize("K", [1, 19, 150])
def test_cpp_two_resizes_against_the_two_step_version(K):
    """upsample2_argmax: logits → mid size → size, then argmax, as the two-step path of a test scale
    (F.interpolate twice, argmax): labels equal except at near-ties of the final values; the first
    resize is made a row at a time, shrinking or growing either axis, in any layout."""
    from fastseg.ops.upsample_argmax import upsample2_argmax, upsample2_in_one_pass

    for trial in range(6):
        x, size = random_case(K, max_in=20, max_out=90, channels_last=bool(trial % 2))
        mid = (random.randint(1, 60), random.randint(1, 60))
        assert upsample2_in_one_pass(x)
        labels = upsample2_argmax(x, mid, size)
        first = F.interpolate(x, size=mid, mode="bilinear", align_corners=False)
        assert_labels_match(labels, None, first, size, rel_tol=1e-5)
    x = torch.randn(2, K, 7, 9, dtype=torch.float64)[:, :, ::2]  # a strided view, fp64
    first = F.interpolate(x, size=(11, 13), mode="bilinear", align_corners=False)
    assert_labels_match(upsample2_argmax(x, (11, 13), (17, 5)), None, first, (17, 5), rel_tol=1e-12)


def test_two_resizes_elsewhere_make_the_intermediate():
    """With another backend forced, upsample2_argmax is F.interpolate + upsample_argmax exactly."""
    from fastseg.ops import use_backend
    from fastseg.ops.upsample_argmax import upsample2_argmax

    x = torch.randn(1, 19, 6, 8)
    with use_backend("reference"):
        got = upsample2_argmax(x, (13, 15), (21, 9))
    want = F.interpolate(F.interpolate(x, size=(13, 15), mode="bilinear", align_corners=False), size=(21, 9),
                         mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(got, want)
