"""fastseg's fix of bfloat16 under Triton's CPU interpreter (fastseg.kernels.interpreter_bf16):
tl.dot on bf16 operands and fp32 -> bf16 casts must match what torch (and a GPU) compute."""
import pytest
import torch

from fastseg.kernels import interpreter_bf16_ok, interpreter_enabled

if not interpreter_enabled():
    pytest.skip("runs Triton's CPU interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
if not interpreter_bf16_ok():
    pytest.skip("the fix could not be installed on this triton", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(out_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))


@triton.jit
def _cast_kernel(x_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x.to(tl.bfloat16), mask=mask)


def test_bf16_dot_matches_fp32_matmul_of_the_same_values():
    torch.manual_seed(0)
    a = torch.randn(16, 32).bfloat16()
    b = torch.randn(32, 16).bfloat16()
    out = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, out, 16, 32, 16)
    want = a.double() @ b.double()  # bf16 products are exact in fp32; only the sum order differs
    assert (out.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_fp32_to_bf16_rounds_to_nearest_even_like_torch():
    torch.manual_seed(0)
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 2 ** -130])  # halfway cases, a subnormal
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3.4e38, 1e-45])
    x = torch.cat([torch.randn(200) * 1e3, ties, special])
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, out, x.numel(), BLOCK=256)
    assert torch.equal(out.view(torch.int16), x.bfloat16().view(torch.int16))
    nan = torch.tensor([float("nan")])
    out = torch.empty(1, dtype=torch.bfloat16)
    _cast_kernel[(1,)](nan, out, 1, BLOCK=2)
    assert out.isnan().all()
