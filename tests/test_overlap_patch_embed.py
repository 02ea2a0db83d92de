"""The overlap_patch_embed op: the compiled extension (C++ CPU kernel here; the CUDA kernel on a
GPU) and the torch backend against the reference in float64, forward and every gradient; bad
input; torch.compile tracing; the fallback when the extension is missing.

The CPU kernel has two conv engines (oneDNN conv by default, im2col + GEMM as the fallback,
chosen with FASTSEG_CPU_CONV): both are tested. Without FASTSEG_SKIP_EXT=1 a missing extension
is a failure here, not a skip, so a broken build cannot hide behind the fallback.
"""
import importlib
import os
import warnings

import pytest
import torch

from fastseg import BackendUnavailable, use_backend
from fastseg.ops import choose, dispatch
from fastseg.ops.overlap_patch_embed import overlap_patch_embed, overlap_patch_embed_reference

# The module (fastseg.ops re-exports the function under the same name).
ope_module = importlib.import_module("fastseg.ops.overlap_patch_embed")

CUDA = torch.cuda.is_available()
SKIP_EXT = os.environ.get("FASTSEG_SKIP_EXT", "").strip().lower() in ("1", "true", "yes", "on")
needs_ext = pytest.mark.skipif(SKIP_EXT, reason="FASTSEG_SKIP_EXT=1: the extension is deliberately not built")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# (B, Cin, H, W, C, k, stride, tokens): stage 1 is k7 s4 from a 3-channel NCHW image, stages 2-4
# are k3 s2 from tokens (B, H*W, Cin). Odd sizes, 1x1, C not a power of two. The small maps with
# wide C also take the CPU kernel's NCHW conv-backward branch (2*Ho*Wo <= C); 61x47 does not.
STAGE1 = [(2, 3, 61, 47, 32, 7, 4, False), (2, 3, 5, 3, 160, 7, 4, False), (1, 3, 1, 1, 64, 7, 4, False)]
LATER = [(2, 32, 61, 47, 64, 3, 2, True), (2, 64, 5, 3, 160, 3, 2, True), (1, 16, 1, 1, 320, 3, 2, True),
         (2, 40, 9, 7, 320, 3, 2, True)]
CONFIGS = STAGE1 + LATER


def ids(cfg):
    B, Cin, H, W, C, k, s, tokens = cfg
    return f"{'tokens' if tokens else 'image'}{Cin}-{H}x{W}-C{C}-k{k}s{s}"


def make_case(cfg, dtype=torch.float32, device="cpu"):
    """Fresh random inputs (never zeros), well scaled LayerNorm parameters, an upstream gradient."""
    B, Cin, H, W, C, k, s, tokens = cfg
    x = torch.randn(B, H * W, Cin) if tokens else torch.randn(B, Cin, H, W)
    weight = torch.randn(C, Cin, k, k) / (Cin * k * k) ** 0.5
    bias = 0.1 * torch.randn(C)
    ln_weight = 1 + 0.2 * torch.randn(C)
    ln_bias = 0.1 * torch.randn(C)
    Ho, Wo = (H + 2 * (k // 2) - k) // s + 1, (W + 2 * (k // 2) - k) // s + 1
    grad = torch.randn(B, Ho * Wo, C)
    tensors = [t.to(device=device, dtype=dtype) for t in (x, weight, bias, ln_weight, ln_bias, grad)]
    return tensors, dict(stride=s, hw=(H, W) if tokens else None, eps=1e-6, out_hw=(Ho, Wo))


def run(fn, tensors, meta):
    """Forward and backward with fresh leaves: (out, [dx, dweight, dbias, dln_weight, dln_bias])."""
    *inputs, grad = tensors
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    x, weight, bias, ln_weight, ln_bias = leaves
    out, Ho, Wo = fn(x, weight, bias, meta["stride"], ln_weight, ln_bias, meta["eps"], meta["hw"])
    assert (Ho, Wo) == meta["out_hw"]
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def gold(tensors, meta):
    return run(overlap_patch_embed_reference, [t.double() for t in tensors], meta)


NAMES = ["out", "dx", "dweight", "dbias", "dln_weight", "dln_bias"]


def assert_close_fp32(got, want, tol=1e-4):
    """fp32 vs the float64 reference: max error relative to the tensor's largest value."""
    for name, g, w in zip(NAMES, [got[0]] + got[1], [want[0]] + want[1]):
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} vs {tuple(w.shape)}"
        assert torch.isfinite(g).all(), f"{name} has NaN/Inf"
        err = ((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-12)).item()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.fixture(params=["conv", "im2col"])
def cpu_engine(request, monkeypatch):
    monkeypatch.setenv("FASTSEG_CPU_CONV", request.param)
    return request.param


# --- the extension is there --------------------------------------------------------------------

@needs_ext
def test_extension_is_built(monkeypatch):
    monkeypatch.delenv("FASTSEG_BACKEND", raising=False)
    ext = ope_module.extension()
    assert not isinstance(ext, str), f"the compiled extension did not load: {ext}"
    assert choose("overlap_patch_embed", device=torch.device("cpu"), dtype=torch.float32).backend == "cpp"


# --- CPU kernel and torch backend vs the float64 reference --------------------------------------

@needs_ext
@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_cpp_matches_reference(cfg, cpu_engine):
    tensors, meta = make_case(cfg)
    with use_backend("cpp"):
        got = run(overlap_patch_embed, tensors, meta)
        with torch.no_grad():  # inference calls the op without autograd
            inference = overlap_patch_embed(*tensors[:2], tensors[2], meta["stride"], *tensors[3:5], meta["eps"],
                                            meta["hw"])[0]
    want = gold(tensors, meta)
    assert_close_fp32(got, want)
    # Inference convolves with the oneDNN-packed weight (engine "conv"): not bitwise the training
    # forward's conv, so it is held to the reference instead.
    assert_close_fp32((inference, []), (want[0], []))
    assert got[0].is_contiguous() and inference.is_contiguous()
    if meta["hw"] is not None:  # the token gradient comes back as tokens, not via an NCHW copy
        assert got[1][0].is_contiguous()


@needs_ext
@pytest.mark.parametrize("cfg", [STAGE1[0], LATER[1]], ids=ids)
def test_cpp_float64(cfg, cpu_engine):
    tensors, meta = make_case(cfg, torch.float64)
    with use_backend("cpp"):
        got = run(overlap_patch_embed, tensors, meta)
    assert_close_fp32(got, gold(tensors, meta), tol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_torch_backend_matches_reference(cfg):
    tensors, meta = make_case(cfg)
    with use_backend("torch"):
        got = run(overlap_patch_embed, tensors, meta)
    assert_close_fp32(got, gold(tensors, meta))


@needs_ext
def test_cpp_without_bias_and_partial_grads(cpu_engine):
    """bias=None, and only some inputs requiring grad (the kernel skips dx / dweight then)."""
    (x, weight, _, ln_weight, ln_bias, grad), meta = make_case(LATER[0])
    want_w = weight.double().requires_grad_(True)
    ref, _, _ = overlap_patch_embed_reference(x.double(), want_w, None, 2, ln_weight.double(), ln_bias.double(),
                                              1e-6, meta["hw"])
    ref.backward(grad.double())
    w = weight.clone().requires_grad_(True)
    with use_backend("cpp"):
        out, _, _ = overlap_patch_embed(x, w, None, 2, ln_weight, ln_bias, 1e-6, meta["hw"])
    out.backward(grad)
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-4
    assert (w.grad.double() - want_w.grad).abs().max() / want_w.grad.abs().max() < 1e-4


@needs_ext
def test_backward_recomputes_when_the_conv_rows_were_not_kept(cpu_engine):
    """The backward op without the forward's kept rows (y=None) recomputes them: same gradients."""
    ope_module.extension()
    tensors, meta = make_case(LATER[2])
    x, weight, bias, ln_weight, ln_bias, grad = tensors
    x4 = x.view(1, 1, 1, 16).permute(0, 3, 1, 2)
    fwd, bwd = torch.ops.fastseg_ext.overlap_patch_embed_fwd, torch.ops.fastseg_ext.overlap_patch_embed_bwd
    out, mean, rstd, y = fwd(x4, weight, bias, ln_weight, ln_bias, 2, 1, 1e-6, True)
    out2, _, _, empty = fwd(x4, weight, bias, ln_weight, ln_bias, 2, 1, 1e-6, False)
    assert torch.equal(out, out2) and empty.numel() == 0
    kept = bwd(grad, x4, weight, bias, ln_weight, mean, rstd, y, 2, 1, True, True)
    recomputed = bwd(grad, x4, weight, bias, ln_weight, mean, rstd, None, 2, 1, True, True)
    for name, a, b in zip(NAMES[1:], kept, recomputed):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name
    dx, *rest = recomputed
    assert_close_fp32((out, [dx.permute(0, 2, 3, 1).reshape(x.shape)] + rest), gold(tensors, meta))


@needs_ext
def test_model_module_uses_the_kernel():
    from fastseg.models.segformer import OverlapPatchEmbed
    from oracles import randomize_

    module = randomize_(OverlapPatchEmbed(3, 32, 7, 4, eps=1e-6))
    x = torch.randn(2, 3, 37, 29)
    want, H, W = module(x)
    module.fused = True
    got, H2, W2 = module(x)
    assert (H, W) == (H2, W2)
    assert (got - want).abs().max() / want.abs().max() < 1e-4


needs_packing = pytest.mark.skipif(not ope_module._can_pack(), reason="this torch has no oneDNN conv")


def _reference_out(x, weight, bias, ln_weight, ln_bias, meta):
    return overlap_patch_embed_reference(x.double(), weight.double(), bias.double(), meta["stride"],
                                         ln_weight.double(), ln_bias.double(), meta["eps"], meta["hw"])[0]


@needs_ext
@needs_packing
def test_inference_packs_the_weight_once_and_never_serves_stale_values(monkeypatch):
    """CPU inference convolves with a oneDNN-packed copy of the weight, cached per weight: reused
    while the weight is unchanged, rebuilt after an in-place change or load_state_dict, and
    dropped when the weight is freed."""
    from fastseg.models.segformer import OverlapPatchEmbed
    from oracles import randomize_

    monkeypatch.delenv("FASTSEG_CPU_CONV", raising=False)
    module = randomize_(OverlapPatchEmbed(24, 40, 3, 2, eps=1e-6)).eval()
    module.fused = True
    x, hw = torch.randn(2, 9 * 7, 24), (9, 7)
    weight = module.proj.weight
    meta = dict(stride=2, eps=1e-6, hw=hw)
    args = lambda: (module.proj.weight, module.proj.bias, module.norm.weight, module.norm.bias)  # noqa: E731

    def packed_entry():
        entry = ope_module._packed_weights.get(id(weight))
        return entry[2] if entry is not None and entry[0]() is weight else None

    def infer():
        with torch.no_grad(), use_backend("cpp"):
            return overlap_patch_embed(x, *args()[:2], 2, *args()[2:], 1e-6, hw)[0]

    out = infer()
    first = packed_entry()
    assert first is not None and first.is_mkldnn
    assert_close_fp32((out, []), (_reference_out(x, *args(), meta), []))
    infer()
    assert packed_entry() is first  # reused

    with torch.no_grad():
        weight.mul_(-0.5)  # an in-place change (as an optimiser step makes)
    out = infer()
    assert packed_entry() is not first
    assert_close_fp32((out, []), (_reference_out(x, *args(), meta), []))

    other = randomize_(OverlapPatchEmbed(24, 40, 3, 2, eps=1e-6))
    module.load_state_dict(other.state_dict())
    out = infer()
    assert_close_fp32((out, []), (_reference_out(x, *args(), meta), []))

    # a training forward (autograd) never uses the packed copy, and still matches
    with use_backend("cpp"):
        train_out = overlap_patch_embed(x, *args()[:2], 2, *args()[2:], 1e-6, hw)[0]
    assert train_out.requires_grad
    assert_close_fp32((train_out.detach(), []), (_reference_out(x, *args(), meta), []))

    wid = id(weight)
    del module, weight, args, other, train_out
    import gc
    gc.collect()
    assert wid not in ope_module._packed_weights  # freed with its weight


@needs_ext
@needs_packing
def test_inference_tensors_and_float64_are_not_packed(monkeypatch):
    monkeypatch.delenv("FASTSEG_CPU_CONV", raising=False)
    (x, weight, bias, ln_weight, ln_bias, _), meta = make_case(LATER[0])
    with torch.inference_mode():
        w_inf = weight.clone()  # an inference tensor: no version counter to key a cache on
        with use_backend("cpp"):
            out = overlap_patch_embed(x, w_inf, bias, 2, ln_weight, ln_bias, 1e-6, meta["hw"])[0]
    assert id(w_inf) not in ope_module._packed_weights
    assert_close_fp32((out, []), (_reference_out(x, weight, bias, ln_weight, ln_bias, meta), []))
    w64 = weight.double()
    with torch.no_grad(), use_backend("cpp"):
        out = overlap_patch_embed(x.double(), w64, bias.double(), 2, ln_weight.double(), ln_bias.double(), 1e-6,
                                  meta["hw"])[0]
    assert id(w64) not in ope_module._packed_weights
    assert_close_fp32((out, []), (_reference_out(x, weight, bias, ln_weight, ln_bias, meta), []), tol=1e-10)


@needs_ext
def test_strided_inputs_are_read_in_place_or_copied(cpu_engine):
    """Non-contiguous inputs the kernels take: a column-subsampled image, a channel slice of a
    wider token tensor, a transposed-storage weight, a strided upstream gradient (copied)."""
    B, H, W = 2, 11, 9
    cases = [
        (torch.randn(B, 3, H, 2 * W)[..., ::2], None, 3),
        (torch.randn(B, H * W, 48)[..., 8:40], (H, W), 32),
        (torch.randn(B, 16, H, W).to(memory_format=torch.channels_last), None, 16),
    ]
    for x, hw, cin in cases:
        assert not x.is_contiguous()
        k, s = (7, 4) if cin == 3 else (3, 2)
        C = 40
        weight = torch.randn(k, k, cin, C).permute(3, 2, 0, 1)  # (C, Cin, k, k), not contiguous
        params = [0.1 * torch.randn(C), 1 + 0.2 * torch.randn(C), 0.1 * torch.randn(C)]
        Ho, Wo = (H + 2 * (k // 2) - k) // s + 1, (W + 2 * (k // 2) - k) // s + 1
        grad = torch.randn(B, C, Ho * Wo).transpose(1, 2)  # a transposed upstream gradient
        tensors = [x, weight] + params + [grad]
        meta = dict(stride=s, hw=hw, eps=1e-5, out_hw=(Ho, Wo))
        with use_backend("cpp"):
            got = run(overlap_patch_embed, tensors, meta)
        assert_close_fp32(got, gold(tensors, meta))


@needs_ext
def test_outputs_never_read_uninitialised_memory(cpu_engine):
    """Under deterministic mode every torch.empty (the kernel's outputs and scratch buffers
    included) is filled with NaN first: nothing may leak through."""
    tensors, meta = make_case(LATER[0])
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(4).isnan().all(), "deterministic mode does not poison torch.empty here"
        with use_backend("cpp"):
            got = run(overlap_patch_embed, tensors, meta)
            with torch.no_grad():  # inference: the packed-weight conv (engine "conv")
                inference = overlap_patch_embed(*tensors[:3], meta["stride"], *tensors[3:5], meta["eps"],
                                                meta["hw"])[0]
    finally:
        torch.use_deterministic_algorithms(previous)
    want = gold(tensors, meta)
    assert_close_fp32(got, want)
    assert_close_fp32((inference, []), (want[0], []))


# --- CUDA kernel (skipped without a GPU) --------------------------------------------------------

def check_cuda(cfg, dtype):
    tensors, meta = make_case(cfg, torch.float32, "cuda")
    want = gold([t.cpu() for t in tensors], meta)
    want = (want[0].cuda(), [g.cuda() for g in want[1]])
    low = [t.to(dtype) for t in tensors]
    with use_backend("cuda"):
        got = run(overlap_patch_embed, low, meta)
    if dtype == torch.float32:
        assert_close_fp32(got, want)
        return
    eager = run(overlap_patch_embed_reference, low, meta)
    unit = torch.finfo(dtype).eps / 2
    for name, g, e, w in zip(NAMES, [got[0]] + got[1], [eager[0]] + eager[1], [want[0]] + want[1]):
        assert torch.isfinite(g).all(), f"{name} has NaN/Inf"
        scale = w.norm().item()
        err, eager_err = [(t.double() - w).norm().item() / scale for t in (g, e)]
        assert err <= 2 * eager_err + unit, f"{name}: fused {err:.2e} vs eager {eager_err:.2e} ({dtype})"


@needs_ext
@needs_cuda
@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_reference(cfg, dtype, monkeypatch):
    # fp32 is held to 1e-4: cuDNN's conv gradients (used by the backward) must not run in TF32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    check_cuda(cfg, dtype)


@needs_ext
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_segformer_stage_shapes(dtype, monkeypatch):
    """Real stage shapes at a small image: C = 64, 128, 320, 512, 1000 (all three row tiles)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for cfg in [(2, 3, 67, 45, 64, 7, 4, False), (2, 64, 17, 12, 128, 3, 2, True),
                (2, 128, 9, 6, 320, 3, 2, True), (2, 320, 5, 3, 512, 3, 2, True), (1, 8, 4, 4, 1000, 3, 2, True)]:
        check_cuda(cfg, dtype)


@needs_ext
@needs_cuda
def test_cuda_torch_backend():
    tensors, meta = make_case(LATER[0], torch.float64, "cuda")
    with use_backend("torch"):
        got = run(overlap_patch_embed, tensors, meta)
    assert_close_fp32(got, gold(tensors, meta), tol=1e-10)


# --- bad input ----------------------------------------------------------------------------------

def params(C=32, cin=3, k=7):
    return torch.randn(C, cin, k, k), torch.randn(C), torch.ones(C), torch.zeros(C)


@pytest.mark.parametrize("backend", ["cpp", "torch", None])
def test_bad_input_raises_clear_errors(backend):
    if backend == "cpp" and (SKIP_EXT or isinstance(ope_module.extension(), str)):
        pytest.skip("extension not built")
    w, b, g, beta = params()
    x = torch.randn(2, 3, 16, 16)
    cases = [
        (ValueError, "channels", lambda: overlap_patch_embed(torch.randn(2, 4, 16, 16), w, b, 4, g, beta, 1e-5)),
        (ValueError, "square", lambda: overlap_patch_embed(x, torch.randn(32, 3, 7, 5), b, 4, g, beta, 1e-5)),
        (ValueError, "stride", lambda: overlap_patch_embed(x, w, b, 0, g, beta, 1e-5)),
        (ValueError, "hw", lambda: overlap_patch_embed(torch.randn(2, 30, 3), w, b, 4, g, beta, 1e-5, (5, 5))),
        (ValueError, "hw=(H, W)", lambda: overlap_patch_embed(torch.randn(3, 16, 16), w, b, 4, g, beta, 1e-5)),
        (ValueError, "ln_weight", lambda: overlap_patch_embed(x, w, b, 4, torch.ones(31), beta, 1e-5)),
        (ValueError, "empty", lambda: overlap_patch_embed(torch.randn(0, 3, 16, 16), w, b, 4, g, beta, 1e-5)),
        (TypeError, "dtype|float64", lambda: overlap_patch_embed(x.double(), w, b, 4, g, beta, 1e-5)),
        (TypeError, "floating", lambda: overlap_patch_embed(x.long(), w, b, 4, g, beta, 1e-5)),
    ]
    context = use_backend(backend) if backend else warnings.catch_warnings()
    with context:
        for exc, words, call in cases:
            with pytest.raises(exc) as info:
                call()
            assert any(word in str(info.value) for word in words.split("|")), str(info.value)


@needs_ext
def test_kernel_op_checks_its_arguments():
    """The C++ op validates on its own (errors a user can act on, never a crash)."""
    ops = torch.ops.fastseg_ext
    ope_module.extension()
    w, b, g, beta = params()
    x = torch.randn(2, 3, 16, 16)
    bad = [
        (ValueError, "padding", lambda: ops.overlap_patch_embed_fwd(x, w, b, g, beta, 4, 7, 1e-5, False)),
        (ValueError, "padding", lambda: ops.overlap_patch_embed_fwd(x, w, b, g, beta, 4, -1, 1e-5, False)),
        (ValueError, "stride", lambda: ops.overlap_patch_embed_fwd(x, w, b, g, beta, 0, 3, 1e-5, False)),
        (ValueError, "channels", lambda: ops.overlap_patch_embed_fwd(torch.randn(2, 5, 16, 16), w, b, g, beta, 4, 3,
                                                                   1e-5, False)),
        (ValueError, "square", lambda: ops.overlap_patch_embed_fwd(x, torch.randn(32, 3, 7, 3), b, g, beta, 4, 3,
                                                                 1e-5, False)),
        (ValueError, "4-D", lambda: ops.overlap_patch_embed_fwd(torch.randn(2, 256, 3), w, b, g, beta, 4, 3, 1e-5,
                                                              False)),
        (ValueError, "smaller than", lambda: ops.overlap_patch_embed_fwd(torch.randn(1, 3, 1, 1), w, b, g, beta, 4, 0,
                                                                       1e-5, False)),
        (ValueError, "bias", lambda: ops.overlap_patch_embed_fwd(x, w, torch.randn(7), g, beta, 4, 3, 1e-5, False)),
        (TypeError, "float32 or float64", lambda: ops.overlap_patch_embed_fwd(x.half(), w.half(), b.half(), g.half(),
                                                                            beta.half(), 4, 3, 1e-5, False)),
        (ValueError, "forward-only", lambda: ops.overlap_patch_embed_fwd(x.bfloat16(), w.bfloat16(), b.bfloat16(),
                                                                       g.bfloat16(), beta.bfloat16(), 4, 3, 1e-5,
                                                                       True)),
        (TypeError, "cast", lambda: ops.overlap_patch_embed_fwd(x, w.double(), b, g, beta, 4, 3, 1e-5, False)),
        (ValueError, "grad_out", lambda: ops.overlap_patch_embed_bwd(torch.randn(2, 5, 32), x, w, b, g,
                                                                    torch.zeros(32), torch.ones(32), None, 4, 3,
                                                                    True, True)),
        (ValueError, "oneDNN's layout", lambda: ops.overlap_patch_embed_fwd(x, w, b, g, beta, 4, 3, 1e-5, False,
                                                                          w.clone())),
        (ValueError, "does not match", lambda: ops.overlap_patch_embed_fwd(
            x, w, b, g, beta, 4, 3, 1e-5, False, torch.randn(32, 3, 5, 5).to_mkldnn())),
        (ValueError, "kept conv output", lambda: ops.overlap_patch_embed_bwd(
            torch.randn(2, 16, 32), x, w, b, g, torch.zeros(32), torch.ones(32), torch.randn(2, 16, 31), 4, 3,
            True, True)),
    ]
    for exc, word, call in bad:
        with pytest.raises(exc, match=word):
            call()


@needs_ext
def test_cpp_refuses_fp16_and_bf16_gradients_on_cpu():
    w, b, g, beta = [t.half() for t in params()]
    x = torch.randn(1, 3, 16, 16, dtype=torch.half)
    with use_backend("cpp"), pytest.raises(BackendUnavailable, match="float32/float64"):
        overlap_patch_embed(x, w, b, 4, g, beta, 1e-5)
    # automatic choice: the torch backend
    assert choose("overlap_patch_embed", device=x.device, dtype=x.dtype).backend == "torch"
    out, _, _ = overlap_patch_embed(x, w, b, 4, g, beta, 1e-5)
    assert out.dtype == torch.half and torch.isfinite(out).all()
    # bf16: the cpp kernel is forward-only, so training in bf16 takes the torch backend
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert choose("overlap_patch_embed", device=cpu, dtype=bf16).backend == "cpp"
    choice = choose("overlap_patch_embed", device=cpu, dtype=bf16, needs_grad=True)
    assert choice.backend == "torch" and "gradient" in " ".join(choice.skipped["cpp"])
    w, b, g, beta = [t.bfloat16().requires_grad_(True) for t in params()]
    out, _, _ = overlap_patch_embed(x.bfloat16(), w, b, 4, g, beta, 1e-5)
    out.float().sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


@needs_ext
@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_cpp_bf16_forward_within_twice_eager_bf16(cfg):
    """bf16 inference on the C++ kernel (both kernel configs, odd sizes) against the fp32 gold,
    within twice the error of eager bf16, with outputs poisoned (NaN-filled allocations)."""
    (x, weight, bias, ln_weight, ln_bias, _), meta = make_case(cfg)
    args = (meta["stride"],)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # every torch.empty / at::empty is NaN
    try:
        with torch.no_grad():
            want = overlap_patch_embed_reference(x.double(), weight.double(), bias.double(), *args,
                                                 ln_weight.double(), ln_bias.double(), meta["eps"], meta["hw"])[0]
            low = [t.bfloat16() for t in (x, weight, bias, ln_weight, ln_bias)]
            eager = overlap_patch_embed_reference(low[0], low[1], low[2], *args, low[3], low[4], meta["eps"],
                                                  meta["hw"])[0]
            with use_backend("cpp"):
                got, Ho, Wo = overlap_patch_embed(low[0], low[1], low[2], *args, low[3], low[4], meta["eps"],
                                                  meta["hw"])
    finally:
        torch.use_deterministic_algorithms(previous)
    assert (Ho, Wo) == meta["out_hw"] and got.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.isfinite(got).all()
    err, eager_err = [((t.double() - want).abs().max() / want.abs().max()).item() for t in (got, eager)]
    assert err <= 2 * eager_err, f"cpp bf16 {err:.2e} vs eager bf16 {eager_err:.2e}"


def test_autocast_goes_to_the_torch_backend():
    """Under autocast the tensors may mix dtypes; the torch backend applies autocast's rules,
    exactly as the reference does."""
    (x, weight, bias, ln_weight, ln_bias, _), meta = make_case(LATER[0])
    x = x.bfloat16()  # tokens from an autocast stage, fp32 parameters
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert choose("overlap_patch_embed", device=x.device, dtype=x.dtype, autocast=True).backend == "torch"
        got = overlap_patch_embed(x, weight, bias, 2, ln_weight, ln_bias, 1e-6, meta["hw"])[0]
        want = overlap_patch_embed_reference(x, weight, bias, 2, ln_weight, ln_bias, 1e-6, meta["hw"])[0]
    assert got.dtype == want.dtype
    assert (got.double() - want.double()).abs().max() <= 1e-2 * want.double().abs().max()


# --- torch.compile ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_dynamo_traces_without_graph_breaks(backend):
    if backend == "cpp" and (SKIP_EXT or isinstance(ope_module.extension(), str)):
        pytest.skip("extension not built")
    tensors, meta = make_case(LATER[0])
    x, weight, bias, ln_weight, ln_bias, grad = tensors

    def f(x, weight, bias, ln_weight, ln_bias):
        with use_backend(backend):
            return overlap_patch_embed(x, weight, bias, 2, ln_weight, ln_bias, 1e-6, meta["hw"])[0]

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(f)(x, weight, bias, ln_weight, ln_bias)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@needs_ext
def test_compiled_forward_and_backward_match_eager():
    """aot_eager runs the fake implementations of both ops (shapes and strides) and the autograd."""
    tensors, meta = make_case(LATER[1])

    def f(x, weight, bias, ln_weight, ln_bias):
        return overlap_patch_embed(x, weight, bias, 2, ln_weight, ln_bias, 1e-6, meta["hw"])[0]

    torch._dynamo.reset()
    with use_backend("cpp"):
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        got = run(lambda x, w, b, s, g, beta, eps, hw: (compiled(x, w, b, g, beta), *meta["out_hw"]), tensors, meta)
        want = run(lambda x, w, b, s, g, beta, eps, hw: (f(x, w, b, g, beta), *meta["out_hw"]), tensors, meta)
    torch._dynamo.reset()
    for name, g, w in zip(NAMES, [got[0]] + got[1], [want[0]] + want[1]):
        assert torch.equal(g, w), name


@needs_ext
def test_opcheck_custom_ops():
    """torch.library.opcheck: schema, fake implementations vs the real kernels, autograd registration."""
    ope_module.extension()
    (x, weight, bias, ln_weight, ln_bias, grad), meta = make_case(LATER[1])
    x4 = x.view(2, 5, 3, 64).permute(0, 3, 1, 2)
    fwd, bwd = torch.ops.fastseg_ext.overlap_patch_embed_fwd.default, torch.ops.fastseg_ext.overlap_patch_embed_bwd.default
    out, mean, rstd, y = fwd(x4, weight, bias, ln_weight, ln_bias, 2, 1, 1e-6, True)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for keep_y in (False, True):
        torch.library.opcheck(fwd, (x4, weight, bias, ln_weight, ln_bias, 2, 1, 1e-6, keep_y), test_utils=tests)
    for kept, needs in [(y, (True, True)), (None, (False, True)), (y, (True, False))]:
        torch.library.opcheck(bwd, (grad, x4, weight, bias, ln_weight, mean, rstd, kept, 2, 1, *needs),
                              test_utils=tests)


# --- fallback when the extension is missing -----------------------------------------------------

def test_fallback_when_extension_missing(monkeypatch, capsys):
    monkeypatch.setattr(ope_module, "_extension_state", "simulated: fastseg._C is not installed")
    monkeypatch.setattr(ope_module, "_fallback_warned", False)
    monkeypatch.delenv("FASTSEG_BACKEND", raising=False)
    tensors, meta = make_case(STAGE1[0])
    x, weight, bias, ln_weight, ln_bias, _ = tensors
    choice = choose("overlap_patch_embed", device=x.device, dtype=x.dtype)
    assert choice.backend == "torch"
    assert "extension not built (simulated" in choice.skipped["cpp"][0]
    with pytest.warns(RuntimeWarning, match="unavailable") as record:
        for _ in range(3):
            out, _, _ = overlap_patch_embed(x, weight, bias, 4, ln_weight, ln_bias, 1e-6)
    assert len([w for w in record if "patch-embedding" in str(w.message)]) == 1
    want = overlap_patch_embed_reference(x.double(), weight.double(), bias.double(), 4, ln_weight.double(),
                                         ln_bias.double(), 1e-6)[0]
    assert (out.double() - want).abs().max() / want.abs().max() < 1e-4
    with use_backend("cpp"), pytest.raises(BackendUnavailable, match="extension not built"):
        overlap_patch_embed(x, weight, bias, 4, ln_weight, ln_bias, 1e-6)
    with use_backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("error")  # a forced choice never warns
        overlap_patch_embed(x, weight, bias, 4, ln_weight, ln_bias, 1e-6)

    from fastseg.cli import main
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if "overlap_patch_embed" in ln)
    assert "torch" in line and "extension not built" in line, line


def test_skip_env_disables_loading(monkeypatch):
    monkeypatch.setenv("FASTSEG_SKIP_EXT", "1")
    assert ope_module._load_extension() == "FASTSEG_SKIP_EXT is set"
    backends = dispatch.backends_of("overlap_patch_embed")
    assert [b.name for b in backends] == ["cuda", "cpp", "torch", "reference"]
