"""Triton kernels of fastseg (installed as ``fastseg.kernels``).

Each module holds ``@triton.jit`` kernels and their host-side launchers only: no autograd, no
dispatch policy (that lives in ``fastseg.ops``).

Without a CUDA device the kernels can still run on CPU tensors under Triton's interpreter. The
interpreter is chosen when a kernel is decorated, so it must be switched on before the kernel
modules are imported; we do that here when torch sees no GPU (and the user has not decided).
"""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def interpreter_enabled() -> bool:
    """True when Triton kernels run under the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_ready() -> bool:
    """False when Triton was imported before the interpreter was switched on: its own helpers
    (tl.zeros, tl.sum, …) were then built for compiled mode and interpreted kernels cannot run."""
    import triton.language as tl

    return type(tl.zeros).__name__ == "InterpretedFunction"
