"""Triton kernels of fastseg (installed as ``fastseg.kernels``).

Each module holds ``@triton.jit`` kernels and their host-side launchers only: no autograd, no
dispatch policy (that lives in ``fastseg.ops``).

Without a CUDA device the kernels can still run on CPU tensors under Triton's interpreter. The
interpreter is chosen when a kernel is decorated, so it must be switched on before the kernel
modules are imported; we do that here when torch sees no GPU (and the user has not decided).
The interpreter's own bfloat16 dot and fp32 -> bf16 casts are wrong; ``interpreter_bf16`` makes
them compute as a GPU does (installed here, in interpreter mode).
"""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def interpreter_enabled() -> bool:
    """True when Triton kernels run under the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_bf16_ok() -> bool:
    """Under the interpreter: whether bfloat16 dot and fp32 -> bf16 casts compute as on a GPU
    (the interpreter's own do not; ``interpreter_bf16`` fixes them)."""
    from fastseg.kernels import interpreter_bf16

    return interpreter_bf16.apply()


if interpreter_enabled():  # before any kernel can run, also when a launcher is called directly
    interpreter_bf16_ok()


def interpreter_ready() -> bool:
    """False when Triton was imported before the interpreter was switched on: its own helpers
    (tl.zeros, tl.sum, …) were then built for compiled mode and interpreted kernels cannot run."""
    import triton.language as tl

    return type(tl.zeros).__name__ == "InterpretedFunction"


# --- small host-side helpers shared by the kernel launchers ------------------------------------

_sm_counts: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere), for grid-size heuristics."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 follows torch's matmul setting ("highest", the default, means
    no TF32)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def launch_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's device."""
    import contextlib

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def check_interpreter_ready(op: str, kernel) -> None:
    """If Triton was imported before TRITON_INTERPRET=1 was set, its helpers (tl.zeros, tl.sum, …)
    are compiled-mode functions and an interpreted kernel fails deep inside Triton; say so."""
    if not (interpreter_ready() and type(kernel).__name__ == "InterpretedFunction"):
        raise RuntimeError(
            f"{op}: Triton was imported before its interpreter was switched on; set "
            "TRITON_INTERPRET=1 in the environment, or import fastseg.kernels before triton")
