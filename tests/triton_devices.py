"""Devices the Triton kernel tests run on, as pytest params: CPU under Triton's interpreter, a
CUDA device when present, and CPU for bf16 (which needs fastseg's fix of the interpreter's bf16,
fastseg.kernels.interpreter_bf16: its own tl.dot multiplies bf16 bit patterns as integers and its
fp32 -> bf16 casts truncate)."""
import pytest
import torch

from fastseg.kernels import interpreter_bf16_ok, interpreter_enabled

HAS_CUDA = torch.cuda.is_available()
CPU = pytest.param("cpu", marks=pytest.mark.skipif(
    not interpreter_enabled(), reason="CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"))
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))
CPU_BF16 = pytest.param("cpu", marks=pytest.mark.skipif(
    not interpreter_enabled() or not interpreter_bf16_ok(),
    reason="needs Triton's interpreter with fastseg's bf16 fix (it could not be installed on this triton)"))
