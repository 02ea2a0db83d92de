import os
import sys

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter. It must be on before anything imports
# triton (torch.compile's inductor may), or Triton's own helpers are built for compiled mode.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracles.py


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (never 0/0)."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "NaN/Inf in the tested output"
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture
def images():
    """Fresh random images at an odd size (61x47) every test."""
    return torch.randn(2, 3, 61, 47)
