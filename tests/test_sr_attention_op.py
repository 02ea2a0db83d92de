"""The sr_attention op: backends against the reference, through the SegFormer attention module,
dispatch overrides, torch.compile tracing and bad input.

Triton runs here under its CPU interpreter (forced with use_backend("triton")); on a machine with
a GPU the same tests run the real kernels on CUDA.
"""

import pytest
import torch

from conftest import rel_err
from fastseg import BackendUnavailable, SegFormer, use_backend
from fastseg.kernels import interpreter_bf16_ok
from fastseg.models.segformer import SRAttention
from fastseg.ops import choose, sr_attention, sr_attention_reference
from oracles import randomize_

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Triton launches real kernels on CUDA; without a GPU it runs CPU tensors under its interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Under Triton's interpreter bf16 needs fastseg's fix of its tl.dot (fastseg.kernels.interpreter_bf16).
BF16_TRITON = pytest.mark.skipif(
    not torch.cuda.is_available() and not interpreter_bf16_ok(),
    reason="bf16 tl.dot is broken under this triton's interpreter and fastseg's fix could not be installed")


def module_pair(dim, heads, sr, dtype, device):
    ref = randomize_(SRAttention(dim, heads, sr, sr_eps=1e-5)).to(device=device, dtype=dtype)
    fused = SRAttention(dim, heads, sr, sr_eps=1e-5).to(device=device, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    fused.fused = True
    return ref, fused


def run_module(module, x, H, W, grad):
    x = x.detach().clone().requires_grad_(True)
    out = module(x, H, W)
    out.backward(grad)
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters()}
    return out.detach(), x.grad.detach(), grads


def check_module(backend, dim, heads, sr, H, W, dtype, device, batch=2):
    ref, fused = module_pair(dim, heads, sr, dtype, device)
    x = torch.randn(batch, H * W, dim, device=device, dtype=dtype)
    grad = torch.randn(batch, H * W, dim, device=device, dtype=dtype)
    # Gold: the reference in fp64 on the same weights; eager error at the test dtype is the yardstick.
    gold = SRAttention(dim, heads, sr, sr_eps=1e-5).double().to(device)
    gold.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    want = run_module(gold, x.double(), H, W, grad.double())
    eager = run_module(ref, x, H, W, grad)
    with use_backend(backend):
        got = run_module(fused, x, H, W, grad)
    pairs = [("out", got[0], eager[0], want[0]), ("dx", got[1], eager[1], want[1])]
    pairs += [(f"d{n}", got[2][n], eager[2][n], want[2][n]) for n in want[2]]
    # fp32: max error relative to the tensor's magnitude. Low precision: the fused relative L2
    # error must be within 2x the eager one plus one rounding (L2 rather than max, so that a single rounding of a
    # 32-element bias gradient does not decide the test). Magnitudes are floored by dx's: with
    # Nkv = 1 the softmax is constant, dq is exactly zero, and a ratio would divide noise by zero.
    dx_rms = want[1].pow(2).mean().sqrt().item()
    for name, g, e, w in pairs:
        assert torch.isfinite(g).all(), f"{name} has NaN/Inf"
        if dtype == torch.float32:
            scale = max(w.abs().max().item(), want[1].abs().max().item())
            err = (g.double() - w).abs().max().item() / scale
            assert err <= 1e-4, f"{name}: fp32 error {err:.2e}"
        else:
            scale = max(w.norm().item(), dx_rms * w.numel() ** 0.5)
            err, eager_err = [(t.double() - w).norm().item() / scale for t in (g, e)]
            # + one unit roundoff of the dtype: where eager is exact by luck (dq with Nkv = 1),
            # any other summation order still rounds once.
            unit = torch.finfo(dtype).eps / 2
            assert err <= 2 * eager_err + unit, f"{name}: fused error {err:.2e} vs eager {eager_err:.2e}"
    assert {"q.weight", "kv.weight", "proj.weight"} <= set(got[2])
    if sr > 1:
        assert "sr.weight" in got[2]


@pytest.mark.parametrize("device", [TRITON_DEVICE])
@pytest.mark.parametrize("heads,head_dim,sr,H,W", [
    (1, 32, 8, 9, 15),    # B0 stage 1 family: N = 135, Nkv = 1
    (2, 32, 4, 11, 9),    # odd N = 99, Nkv = 4
    (5, 32, 2, 7, 5),     # B0 stage 3 heads
    (8, 32, 1, 3, 3),     # no reduction, Nkv = N = 9
    (2, 64, 2, 13, 9),    # head dim 64, N = 117, Nkv = 35
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_through_the_module(device, heads, head_dim, sr, H, W, dtype):
    check_module("triton", heads * head_dim, heads, sr, H, W, dtype, device)


@BF16_TRITON
@pytest.mark.parametrize("heads,head_dim,sr,H,W", [(1, 32, 8, 33, 17), (5, 64, 2, 19, 23)])
def test_triton_bf16(heads, head_dim, sr, H, W):
    check_module("triton", heads * head_dim, heads, sr, H, W, torch.bfloat16, TRITON_DEVICE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,head_dim,sr,H,W", [(1, 32, 8, 17, 9), (5, 32, 2, 7, 5), (8, 64, 1, 5, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_through_the_module(device, heads, head_dim, sr, H, W, dtype):
    check_module("torch", heads * head_dim, heads, sr, H, W, dtype, device)


def test_torch_backend_makes_no_copies():
    q = torch.randn(2, 40, 64)
    kv = torch.randn(2, 6, 128)
    with use_backend("torch"):
        out = sr_attention(q, kv, 2, 0.1)
    assert out.is_contiguous() and out.shape == q.shape
    assert rel_err(out, sr_attention_reference(q.double(), kv.double(), 2, 0.1)) < 1e-5


def test_strided_inputs_are_read_in_place():
    wide = torch.randn(2, 21, 96, device=TRITON_DEVICE)
    q = wide[..., 16:80]  # a column slice: rows are strided
    kv = torch.randn(2, 4, 160, device=TRITON_DEVICE)[..., 16:144]
    want = sr_attention_reference(q.double(), kv.double(), 4, 0.25)
    for backend in ("triton", "torch"):
        with use_backend(backend):
            assert rel_err(sr_attention(q, kv, 4, 0.25), want) < 1e-5


# --- dispatch -------------------------------------------------------------------------------------

def test_automatic_choice_and_reasons():
    cpu = choose("sr_attention", device=torch.device("cpu"), dtype=torch.float32, head_dim=32)
    # the C++ kernel where the extension has it (tests/test_sr_attention_cpp.py), else SDPA
    assert cpu.backend in ("cpp", "torch") and "interpreter" in " ".join(cpu.skipped["triton"])
    assert choose("sr_attention", device=torch.device("cpu"), dtype=torch.float32, head_dim=32,
                  needs_grad=True).backend == "torch"
    with use_backend("reference"):
        assert choose("sr_attention", device=torch.device("cpu"), dtype=torch.float32, head_dim=32).backend == "reference"


def test_forced_backend_that_cannot_run_raises_with_reasons(monkeypatch):
    q, kv = torch.randn(1, 9, 64, dtype=torch.float64), torch.randn(1, 2, 128, dtype=torch.float64)
    with use_backend("triton"), pytest.raises(BackendUnavailable, match="float64"):
        sr_attention(q, kv, 2, 0.1)
    if not torch.cuda.is_available():
        # Under the interpreter bf16 is refused only where fastseg's fix of its tl.dot is missing.
        import fastseg.kernels

        monkeypatch.setattr(fastseg.kernels, "interpreter_bf16_ok", lambda: False)
        q, kv = q.bfloat16(), kv.bfloat16()
        with use_backend("triton"), pytest.raises(BackendUnavailable, match="bfloat16 tl.dot"):
            sr_attention(q, kv, 2, 0.1)
    q, kv = torch.randn(1, 9, 16), torch.randn(1, 2, 32)  # head dim 8 is below the kernel's minimum
    with use_backend("triton"), pytest.raises(BackendUnavailable, match="head dim 8"):
        sr_attention(q, kv, 2, 0.1)


def test_environment_variable_forces_and_is_validated(monkeypatch):
    monkeypatch.setenv("FASTSEG_BACKEND", "reference")
    assert choose("sr_attention", device=torch.device("cpu"), dtype=torch.float32, head_dim=32).backend == "reference"
    monkeypatch.setenv("FASTSEG_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="cudnn"):
        choose("sr_attention", device=torch.device("cpu"), dtype=torch.float32, head_dim=32)
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend("fast"):
            pass


@pytest.mark.parametrize("q_shape,kv_shape,heads,error,match", [
    ((2, 9), (2, 3, 64), 2, ValueError, "rank-3"),
    ((2, 9, 32), (2, 3, 48), 2, ValueError, "2C=64"),
    ((2, 9, 30), (2, 3, 60), 4, ValueError, "divisible"),
    ((0, 9, 32), (0, 3, 64), 2, ValueError, "empty"),
])
def test_bad_input(q_shape, kv_shape, heads, error, match):
    with pytest.raises(error, match=match):
        sr_attention(torch.randn(q_shape), torch.randn(kv_shape), heads, 0.1)
    with pytest.raises(TypeError, match="float32"):
        sr_attention(torch.randn(1, 4, 32), torch.randn(1, 2, 64, dtype=torch.float64), 2, 0.1)


# --- the whole model ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_segformer_uses_the_op_and_matches(backend, images):
    model = randomize_(SegFormer("b0", num_classes=5)).eval().to(TRITON_DEVICE)
    images = images.to(TRITON_DEVICE)
    with torch.no_grad():
        ref = model(images)
        with use_backend(backend):
            model.set_fused(True)
            assert model.backends()["sr_attention"].backend == backend
            out = model(images)
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.999


def test_torch_compile_traces_the_fused_model_without_graph_breaks():
    model = SegFormer("b0", num_classes=3).set_fused(True).eval().to(TRITON_DEVICE)
    x = torch.randn(1, 3, 35, 33, device=TRITON_DEVICE)
    for backend in ("triton", "torch"):
        for grad in (True, False):  # no_grad: the all-in-one inference kernels
            with use_backend(backend), torch.set_grad_enabled(grad):
                torch._dynamo.reset()
                explanation = torch._dynamo.explain(model)(x)
            assert explanation.graph_break_count == 0, explanation.break_reasons
            assert explanation.graph_count == 1


def test_compiled_op_forward_and_backward_through_fake_tensors():
    """aot_eager traces forward and backward through the custom ops' fake implementations."""
    q = torch.randn(2, 23, 64, device=TRITON_DEVICE, requires_grad=True)
    kv = torch.randn(2, 4, 128, device=TRITON_DEVICE, requires_grad=True)
    with use_backend("triton"):
        torch._dynamo.reset()
        compiled = torch.compile(lambda a, b: sr_attention(a, b, 2, 0.125), backend="aot_eager", fullgraph=True)
        out = compiled(q, kv)
        out.square().sum().backward()
    ref_q, ref_kv = q.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
    want = sr_attention_reference(ref_q, ref_kv, 2, 0.125)
    want.square().sum().backward()
    assert rel_err(out, want) < 1e-5
    assert rel_err(q.grad, ref_q.grad) < 1e-4 and rel_err(kv.grad, ref_kv.grad) < 1e-4
