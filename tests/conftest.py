import os
import random
import sys
import zlib

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter. It must be on before anything imports
# triton (torch.compile's inductor may), or Triton's own helpers are built for compiled mode.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracles.py

# Under pytest-xdist (-n 2 on 2 cores) each worker computes on one thread, and so do the CLI and
# torchrun subprocesses the tests start: two workers of two OpenMP threads each would oversubscribe
# the cores, and an OpenMP team that waits on a preempted thread stalls. The C++ kernels' parallel
# paths are tested with two threads on purpose in test_cpp_threads.py.
# The worker's id is dropped from the environment (xdist itself reads config.workerinput): a
# `pytest benchmarks/` the tests start would inherit it and pytest-benchmark would then switch off.
if os.environ.pop("PYTEST_XDIST_WORKER", None):
    os.environ.pop("PYTEST_XDIST_WORKER_COUNT", None)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Every test draws its random data from its own fixed seed (from its id), so a run is
    reproducible and a failure replays exactly. FASTSEG_TEST_SEED=<n> shifts every seed, to
    draw fresh data on purpose."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("FASTSEG_TEST_SEED", "0"))) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (never 0/0)."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "NaN/Inf in the tested output"
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture
def images():
    """Fresh random images at an odd size (61x47) every test."""
    return torch.randn(2, 3, 61, 47)
