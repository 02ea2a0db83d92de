"""NaN and ±Inf inputs propagate through every fused op and backend exactly as through the reference.

For each op, each backend that runs on this machine (cpp, torch, and triton under its CPU
interpreter, tiny shapes) and each dtype: a few NaN / +Inf / -Inf values are planted in an input;
the output must be NaN where the reference's is NaN, +Inf / -Inf where the reference's is, and
finite (and close to the reference) everywhere else. Then the whole model: a fused SegFormer b0
gives all-NaN logits for the image with one bad pixel and finite ones for the other image, as the
reference does. And a checkpoint with a NaN weight is reported when loaded.
"""
import warnings

import pytest
import torch

from fastseg import ops
from fastseg.ops import dispatch

NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
TOL = {torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float64: 1e-6}


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Deterministic mode fills every torch.empty with NaN: an element a kernel never writes is a
    NaN where the reference has none, and fails."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous)


# With a GPU, the Triton kernels (and the CUDA extension) run for real on CUDA copies of the inputs;
# without one, Triton runs on the CPU tensors under its interpreter.
GPU = torch.cuda.is_available()
GPU_BACKENDS = ("triton", "cuda")


def backend_names(op):
    return [b.name for b in dispatch.backends_of(op) if b.name != "reference" and (GPU or b.name != "cuda")]


def backends(op, dtypes=(torch.float32, torch.bfloat16, torch.float64)):
    """(backend, dtype) params for every non-reference backend of ``op`` that this machine has; those
    that cannot run a dtype are skipped at run time (with the dispatcher's reasons)."""
    return [pytest.param(n, d, id=f"{n}-{str(d)[6:]}") for n in backend_names(op) for d in dtypes]


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


def run_forced(backend, fn, *args, **kwargs):
    """``fn`` with ``backend`` forced (on CUDA copies of the inputs for GPU backends, where a GPU is
    present); the outputs on the CPU. A backend that cannot run the inputs skips the test."""
    device = "cuda" if GPU and backend in GPU_BACKENDS else "cpu"
    try:
        with dispatch.use_backend(backend):
            out = fn(*_to(args, device), **{k: _to(v, device) for k, v in kwargs.items()})
    except dispatch.BackendUnavailable as e:
        pytest.skip(str(e))
    return _to(out, "cpu")


def plant(t, value, positions):
    """A copy of ``t`` with ``value`` at each index tuple in ``positions``."""
    t = t.clone()
    for p in positions:
        t[p] = value
    return t


def assert_same_nonfinite(out, ref, dtype, name="out"):
    """NaN, +Inf and -Inf exactly where the reference has them; close to it elsewhere."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    for what, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        got, want = test(out), test(ref)
        assert torch.equal(got, want), (
            f"{name}: {what} at {int(got.sum())} elements, the reference at {int(want.sum())}; "
            f"first differing index {tuple(int(i) for i in (got != want).nonzero()[0])}")
    fin = torch.isfinite(ref)
    tol = TOL[dtype]
    torch.testing.assert_close(out[fin].double(), ref[fin].double(), rtol=tol, atol=tol, msg=name)


# --- the ops, one at a time -------------------------------------------------------------------------

@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("backend,dtype", backends("overlap_patch_embed"))
@pytest.mark.parametrize("tokens", [False, True], ids=["image", "tokens"])
def test_overlap_patch_embed(backend, dtype, value, tokens):
    if tokens:  # stage 2-4 form: k3 s2 from tokens
        H, W, Cin, k, s = 9, 7, 8, 3, 2
        x = torch.randn(2, H * W, Cin, dtype=dtype)
        x = plant(x, NONFINITE[value], [(0, 20, 3), (1, 0, 0)])
        hw = (H, W)
    else:  # stage 1: k7 s4 from the image
        Cin, k, s, hw = 3, 7, 4, None
        x = plant(torch.randn(2, Cin, 13, 11, dtype=dtype), NONFINITE[value], [(0, 1, 6, 5), (1, 2, 12, 0)])
    C = 16
    w, b = torch.randn(C, Cin, k, k, dtype=dtype) * 0.2, torch.randn(C, dtype=dtype)
    lw, lb = torch.rand(C, dtype=dtype) + 0.5, torch.randn(C, dtype=dtype)
    ref = ops.overlap_patch_embed_reference(x, w, b, s, lw, lb, 1e-6, hw)[0]
    assert not torch.isfinite(ref).all()
    out = run_forced(backend, ops.overlap_patch_embed, x, w, b, s, lw, lb, 1e-6, hw)[0]
    assert_same_nonfinite(out, ref, dtype)


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("backend,dtype", backends("sr_attention"))
def test_sr_attention(backend, dtype, where, value):
    B, N, Nkv, heads, D = 2, 11, 5, 2, 16
    C = heads * D
    q = torch.randn(B, N, C, dtype=dtype)
    kv = torch.randn(B, Nkv, 2 * C, dtype=dtype)
    v = NONFINITE[value]
    if where == "q":
        q = plant(q, v, [(0, 3, 5), (1, 10, 20)])
    else:
        off = 0 if where == "k" else C
        kv = plant(kv, v, [(0, 2, off + 5), (1, 4, off + 17)])
    ref = ops.sr_attention_reference(q, kv, heads, D ** -0.5)
    out = run_forced(backend, ops.sr_attention, q, kv, heads, D ** -0.5)
    assert_same_nonfinite(out, ref, dtype)


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("backend,dtype", backends("dwconv3x3_gelu"))
def test_dwconv3x3_gelu(backend, dtype, approximate, value):
    B, H, W, C = 2, 5, 6, 8
    x = plant(torch.randn(B, H * W, C, dtype=dtype), NONFINITE[value], [(0, 0, 1), (0, 14, 3), (1, 29, 7)])
    w, b = torch.randn(C, 1, 3, 3, dtype=dtype), torch.randn(C, dtype=dtype)
    ref = ops.dwconv3x3_gelu_reference(x, H, W, w, b, approximate)
    assert not torch.isfinite(ref).all()
    out = run_forced(backend, ops.dwconv3x3_gelu, x, H, W, w, b, approximate)
    assert_same_nonfinite(out, ref, dtype)


def test_gelu_of_nonfinite_values_is_torchs():
    """The GELU alone (a 1x1 map, the centre tap 1, no bias): NaN and -Inf give NaN, +Inf gives +Inf,
    as F.gelu; huge finite values give x or 0."""
    vals = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30, -1e30, -20.0, 20.0, 0.0])
    C = vals.numel()
    w = torch.zeros(C, 1, 3, 3)
    w[:, 0, 1, 1] = 1
    for backend in backend_names("dwconv3x3_gelu"):
        for dtype in (torch.float32, torch.bfloat16):
            for approximate in ("none", "tanh"):
                x = vals.to(dtype).view(1, 1, C)
                want = torch.nn.functional.gelu(x, approximate=approximate)
                try:
                    got = run_forced(backend, ops.dwconv3x3_gelu, x, 1, 1, w.to(dtype), None, approximate)
                except pytest.skip.Exception:
                    continue
                assert_same_nonfinite(got, want, dtype, f"{backend} {dtype} {approximate}")


def _decoder_case(dtype, value, into, E=16, K=5):
    B, H, W = 2, 10, 12
    maps = [torch.randn(B, h, w, E, dtype=dtype) for h, w in ((3, 4), (5, 6), (H, W))]
    x, xw = torch.randn(B, H, W, 12, dtype=dtype), torch.randn(E, 12, dtype=dtype) * 0.3
    v = NONFINITE[value]
    if into == "small map":
        maps[0] = plant(maps[0], v, [(0, 1, 2, 3), (1, 2, 3, 10)])
    elif into == "full-size map":
        maps[2] = plant(maps[2], v, [(0, 4, 5, 3), (1, 9, 11, 0)])
    else:
        x = plant(x, v, [(0, 4, 5, 3), (1, 0, 0, 7)])
    bias = torch.randn(E)
    cls_w, cls_b = torch.randn(K, E, dtype=dtype) * 0.3, torch.randn(K, dtype=dtype)
    return maps, (H, W), bias, cls_w, cls_b, (x, xw)


def _decoder_params():
    """Every form and input for cpp/torch; Triton's interpreter is slow, so there the forms with a
    ReLU (where maxnum-style max drops NaN) and the resized / projected inputs."""
    out = []
    for p in backends("decoder_upsample_fuse", (torch.float32, torch.bfloat16)):
        backend, dtype = p.values
        for form in ("sum", "relu", "relu+classifier"):
            for into in ("small map", "full-size map", "projection input"):
                if backend == "triton" and (form == "sum" or into == "full-size map"):
                    continue
                out.append(pytest.param(backend, dtype, form, into, id=f"{p.id}-{form}-{into}"))
    return out


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("backend,dtype,form,into", _decoder_params())
def test_upsample_sum(backend, dtype, form, into, value):
    maps, out_hw, bias, cls_w, cls_b, project = _decoder_case(dtype, value, into)
    relu = form != "sum"
    cls = (cls_w, cls_b) if "classifier" in form else (None, None)
    ref = ops.upsample_sum_reference(maps, out_hw, bias, relu, *cls, project=project)
    assert relu or not torch.isfinite(ref).all()  # ReLU(-inf) is 0
    with torch.no_grad():
        out = run_forced(backend, ops.upsample_sum, maps, out_hw, bias, relu, *cls, project=project)
    assert_same_nonfinite(out, ref, dtype)


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("into", ["x", "h"])
@pytest.mark.parametrize("backend,dtype", backends("add_layer_norm"))
def test_add_layer_norm(backend, dtype, into, value):
    C = 24
    x, h = torch.randn(2, 5, C, dtype=dtype), torch.randn(2, 5, C, dtype=dtype)
    pos = [(0, 1, 3), (1, 4, 23)]
    if into == "x":
        x = plant(x, NONFINITE[value], pos)
    else:
        h = plant(h, NONFINITE[value], pos)
    hb, w, b = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5, torch.randn(C, dtype=dtype)
    s_ref, y_ref = ops.add_layer_norm_reference(x, h, hb, w, b, 1e-6)
    assert not torch.isfinite(y_ref).all()
    s, y = run_forced(backend, ops.add_layer_norm, x, h, hb, w, b, 1e-6)
    assert_same_nonfinite(s, s_ref, dtype, "s")
    assert_same_nonfinite(y, y_ref, dtype, "y")


@pytest.mark.parametrize("value", [*NONFINITE, "mixed"])
@pytest.mark.parametrize("backend,dtype", backends("upsample_argmax"))
def test_upsample_argmax(backend, dtype, value):
    """Labels: torch.argmax's (NaN counts as the maximum: the first NaN class wins), scores: the
    interpolated value at the label, non-finite as the reference's."""
    # Even input and odd output sizes: no source index is an exact integer, where ATen's rounding
    # (contracted or not) would decide whether a zero-weight tap (0 * NaN) is read at all.
    logits = torch.randn(2, 5, 4, 4, dtype=dtype)
    if value == "mixed":  # NaN, +Inf and -Inf in one pixel's classes, and +Inf beside NaN
        logits[0, 1, 2, 1], logits[0, 3, 2, 1], logits[0, 4, 2, 1] = float("inf"), float("nan"), float("-inf")
        logits[1, 0, 0, 0], logits[1, 2, 0, 0] = float("nan"), float("nan")
        logits[1, 4, 3, 3] = float("-inf")
    else:
        logits = plant(logits, NONFINITE[value], [(0, 1, 2, 1), (0, 3, 2, 1), (1, 4, 0, 0), (1, 0, 3, 3)])
    size = (9, 7)
    labels_ref, scores_ref = ops.upsample_argmax_reference(logits, size, return_scores=True)
    up = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    assert torch.equal(labels_ref, up.argmax(1))  # the reference is torch.argmax's choice
    labels, scores = run_forced(backend, ops.upsample_argmax, logits, size, return_scores=True)
    bad = ~torch.isfinite(up).all(1)  # pixels with a non-finite class: labels must agree exactly
    assert bad.any()
    assert torch.equal(labels[bad], labels_ref[bad]), (labels[bad], labels_ref[bad])
    assert_same_nonfinite(scores, scores_ref, dtype, "scores")


def test_argmax_of_a_nan_row_is_the_first_nan():
    """The rule every backend follows, as torch.argmax on this torch: the first NaN wins, before any
    +Inf; with no NaN, the first maximum (+Inf included). Bilinear resizing turns +Inf into NaN
    wherever a zero weight meets it (0 * inf), so the rule is checked on a resize to the same size."""
    row = torch.tensor([[1.0, float("inf"), float("nan"), 2.0, float("nan")],
                        [float("-inf"), 2.0, 3.0, 3.0, 0.0]])
    assert row.argmax(1).tolist() == [2, 2]
    logits = row.T.contiguous().reshape(1, 5, 2, 1)
    up = torch.nn.functional.interpolate(logits, size=(2, 1), mode="bilinear", align_corners=False)
    want = up.argmax(1).flatten().tolist()
    assert up[0, 2, 0, 0].isnan() and want[0] == up[0, :, 0, 0].isnan().nonzero()[0].item()
    for backend in ["reference", *backend_names("upsample_argmax")]:
        try:
            got = run_forced(backend, ops.upsample_argmax, logits, (2, 1))
        except pytest.skip.Exception:
            continue
        assert got.flatten().tolist() == want, backend


# --- the whole model --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def b0_pair():
    import copy

    from fastseg import SegFormer, SegFormerConfig
    from oracles import randomize_

    ref = randomize_(SegFormer(config=SegFormerConfig.from_variant("b0", num_classes=7)), seed=0).eval()
    return ref, copy.deepcopy(ref).set_fused(True)


@pytest.mark.parametrize("value", ["nan", "+inf"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_segformer_b0_one_bad_pixel_gives_nan_logits_for_that_image_only(b0_pair, backend, value):
    """One NaN / +Inf pixel in image 0: the reference's logits for image 0 are all NaN (attention
    spreads it over the whole image), image 1's are finite; the fused model (the automatic CPU
    backends: the C++ kernels; or all-torch) gives the same, and upsample_argmax labels agree."""
    ref, fused = b0_pair
    x = torch.randn(2, 3, 61, 47)
    x[0, 1, 30, 20] = NONFINITE[value]
    with torch.inference_mode():
        want = ref(x)
        if backend == "auto":
            got = fused(x)
        else:
            with dispatch.use_backend(backend):
                got = fused(x)
    assert want[0].isnan().all() and torch.isfinite(want[1]).all()
    assert got[0].isnan().all(), f"fused: {int(torch.isfinite(got[0]).sum())} finite logits in the bad image"
    assert torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[1], want[1], rtol=1e-3, atol=1e-3)
    with torch.inference_mode():
        labels_ref = ops.upsample_argmax_reference(want, x.shape[2:])
        labels = ops.upsample_argmax(got, x.shape[2:])
    assert (labels[0] == 0).all() and torch.equal(labels[0], labels_ref[0])  # the first NaN class
    assert (labels[1] == labels_ref[1]).float().mean() > 0.999


# --- loading ----------------------------------------------------------------------------------------

def test_checkpoint_with_a_nan_weight_is_noted_and_warned(tmp_path):
    from fastseg import SegFormer, SegFormerConfig

    model = SegFormer(config=SegFormerConfig.from_variant("b0", num_classes=5))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean checkpoint loads without any warning
        clean = SegFormer.from_pretrained(sd)
    assert not any("NaN" in n for n in clean.load_report.notes)
    sd["decoder.classifier.weight"][2, 3] = float("nan")
    sd["encoder.stages.0.blocks.0.mlp.fc1.bias"][0] = float("inf")
    with pytest.warns(RuntimeWarning, match="2 tensor.*NaN or Inf.*decoder.classifier.weight") as caught:
        loaded = SegFormer.from_pretrained(sd)
    assert len([w for w in caught if "NaN or Inf" in str(w.message)]) == 1
    note = [n for n in loaded.load_report.notes if "NaN or Inf" in n]
    assert len(note) == 1 and "decoder.classifier.weight" in note[0] and "fc1.bias" in note[0]
    assert "NaN or Inf" in str(loaded.load_report)
    assert loaded.decoder.classifier.weight[2, 3].isnan()  # loaded as is, as the reference would compute


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_segment_labels_of_nan_regions_match_the_two_step_path(b0_pair, mode):
    """The label paths of fastseg.inference (fused upsample + argmax; the banded multi-window
    average) give the two-step labels where the averaged probabilities are NaN: the first NaN
    class, 0. Slide mode: only the windows that hold the bad pixel are NaN."""
    from fastseg.inference import segment, segment_labels

    _, fused = b0_pair
    x = torch.randn(1, 3, 61, 47)
    x[0, 2, 5, 40] = float("nan")
    kw = dict(mode=mode, crop=32, stride=24) if mode == "slide" else dict(mode=mode, flip=True)
    with torch.inference_mode():
        probs = segment(fused, x, **kw)
        two_step = probs.argmax(1)
        labels = segment_labels(fused, x, **kw)
    bad = probs.isnan().any(1)
    assert bad.any() and (mode == "whole" or not bad.all())
    assert (two_step[bad] == 0).all() and torch.equal(labels[bad], two_step[bad])
    if not bad.all():
        assert (labels[~bad] == two_step[~bad]).float().mean() > 0.999


@pytest.mark.parametrize("into", ["small map", "projection input"])
def test_upsample_sum_torch_banded_keeps_nan(monkeypatch, into):
    """The torch backend's banded inference form (large outputs; forced here with tiny bands): NaN
    exactly where the reference has it. (±Inf in a resized map is not matched there: it mixes rows
    by a lerp and then columns, and 0 · Inf = NaN reaches other pixels than in F.interpolate's
    columns-then-rows order; the cpp backend, the CPU choice, matches Inf too.)"""
    value = "nan"
    import fastseg.ops.decoder_upsample_fuse as duf

    monkeypatch.setattr(duf, "BAND_ELEMENTS", 64)
    maps, out_hw, bias, cls_w, cls_b, project = _decoder_case(torch.float32, value, into)
    ref = ops.upsample_sum_reference(maps, out_hw, bias, False, project=project)
    with torch.no_grad():
        out = run_forced("torch", ops.upsample_sum, maps, out_hw, bias, False, project=project)
    assert_same_nonfinite(out, ref, torch.float32)
