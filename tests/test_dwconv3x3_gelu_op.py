"""The dwconv3x3_gelu op through the Mix-FFN module: triton and torch backends against the
reference (forward, input and parameter gradients), the tanh option, and bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fastseg import use_backend
from fastseg.models.segformer import MixFFN
from fastseg.ops import dwconv3x3_gelu, dwconv3x3_gelu_reference
from oracles import randomize_

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(module, x, H, W, grad):
    x = x.detach().clone().requires_grad_(True)
    out = module(x, H, W)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("backend,device", [("triton", TRITON_DEVICE), ("torch", "cpu")])
@pytest.mark.parametrize("dim,H,W", [(8, 7, 9), (40, 5, 3), (10, 1, 1), (16, 13, 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mix_ffn_fused_matches_reference(backend, device, dim, H, W, dtype):
    ref = randomize_(MixFFN(dim, 4 * dim)).to(device)
    fused = copy.deepcopy(ref)
    fused.fused = True
    gold = copy.deepcopy(ref).double()
    ref, fused = ref.to(dtype), fused.to(dtype)
    x = torch.randn(2, H * W, dim, device=device)
    grad = torch.randn(2, H * W, dim, device=device)
    want = run(gold, x.double(), H, W, grad.double())
    eager = run(ref, x.to(dtype), H, W, grad.to(dtype))
    with use_backend(backend):
        got = run(fused, x.to(dtype), H, W, grad.to(dtype))
    names = ["out", "dx"] + [n for n, _ in ref.named_parameters()]
    for name, g, e, w in zip(names, got, eager, want):
        assert torch.isfinite(g).all(), name
        if dtype == torch.float32:
            err = (g.double() - w).abs().max().item() / w.abs().max().item()
            assert err < 1e-4, f"{name}: {err:.2e}"
        else:  # within 2x the eager fp16 error (relative L2) plus one rounding
            err, eager_err = [(t.double() - w).norm().item() / w.norm().item() for t in (g, e)]
            assert err <= 2 * eager_err + torch.finfo(dtype).eps / 2, f"{name}: {err:.2e} vs {eager_err:.2e}"


# The kernel's tanh form z / (1 + exp(-2u)) lets exp overflow to inf on purpose (the result is 0,
# never NaN); numpy, which runs the interpreter, warns about that overflow.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("backend,device", [("triton", TRITON_DEVICE), ("torch", "cpu")])
def test_tanh_gelu_option(backend, device):
    x = torch.randn(1, 6 * 5, 24, device=device)
    w, b = torch.randn(24, 1, 3, 3, device=device), torch.randn(24, device=device)
    want = dwconv3x3_gelu_reference(x.double(), 6, 5, w.double(), b.double(), "tanh")
    with use_backend(backend):
        got = dwconv3x3_gelu(x, 6, 5, w, b, "tanh")
    assert (got.double() - want).abs().max() < 1e-5
    exact = dwconv3x3_gelu_reference(x.double(), 6, 5, w.double(), b.double())
    assert (exact - want).abs().max() > 1e-5  # the option really changes the function


def test_reference_is_the_official_math():
    x = torch.randn(2, 4 * 3, 8, dtype=torch.float64)
    w, b = torch.randn(8, 1, 3, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    img = x.transpose(1, 2).reshape(2, 8, 4, 3)
    want = F.gelu(F.conv2d(img, w, b, padding=1, groups=8)).flatten(2).transpose(1, 2)
    assert torch.allclose(dwconv3x3_gelu_reference(x, 4, 3, w, b), want)


@pytest.mark.parametrize("args,error,match", [
    (((2, 12), 4, 3, (8, 1, 3, 3)), ValueError, "tokens"),
    (((2, 12, 8), 5, 3, (8, 1, 3, 3)), ValueError, "5x3"),
    (((2, 12, 8), 4, 3, (8, 1, 5, 5)), ValueError, "weight"),
])
def test_bad_input(args, error, match):
    shape, H, W, wshape = args
    with pytest.raises(error, match=match):
        dwconv3x3_gelu(torch.randn(shape), H, W, torch.randn(wshape), None)
    with pytest.raises(TypeError, match="floating"):
        dwconv3x3_gelu(torch.ones(1, 4, 8, dtype=torch.int32), 2, 2, torch.randn(8, 1, 3, 3), None)
