"""Keep freed CPU memory for reuse instead of handing it back to the kernel after every op.

PyTorch's CPU tensors come from glibc malloc. glibc serves large blocks (above a threshold that
grows to at most 32 MB) with fresh ``mmap`` pages and returns the free top of the heap to the
kernel, so every big activation of every forward pays a page fault per 4 KB page on first touch:
measured 325 → 268 ms (b2 fused forward, 512², 2 threads) from this alone. OpenVINO and ONNX
Runtime avoid it with their own arenas. ``keep_freed_memory()`` sets two malloc options
(``mallopt``): blocks up to 1 GiB come from the heap, and freed heap memory stays in the process
(up to 1 GiB above what is in use) for the next forward. Measured: b0 fused at batch 8, 512²:
463 ms per forward with a 32 MiB threshold, 365 ms with 1 GiB. The price is fragmentation at
very large inputs: b2 ``fastseg predict`` on one 2048×1024 image peaked at 1324 MB against 1064
MB with system malloc (at 512² the peak did not change). ``FASTSEG_CPU_MALLOC=system`` keeps
system malloc where memory matters more than speed.

It is applied once, process-wide, by the first fused forward on a CPU tensor (models call
:func:`ensure`). ``FASTSEG_CPU_MALLOC=system`` leaves malloc as it is; non-glibc systems are left
alone. :func:`state` says what was done, for ``fastseg info`` and benchmark reports.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

ENV = "FASTSEG_CPU_MALLOC"
MMAP_LIMIT = 1 << 30  # blocks up to this size come from the heap (bytes)
TRIM_LIMIT = 1 << 30  # free heap memory kept above what is in use (bytes)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers

_lock = threading.Lock()
_state: str | None = None  # None: not tried yet


def _apply() -> str:
    if os.environ.get(ENV, "").strip().lower() in ("system", "0", "off", "no"):
        return f"left as the system's ({ENV}={os.environ[ENV]})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu = ctypes.CDLL(None).gnu_get_libc_version
    except (OSError, AttributeError):
        return "left as the system's (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    gnu.restype = ctypes.c_char_p
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_LIMIT) and mallopt(_M_TRIM_THRESHOLD, TRIM_LIMIT)):
        return f"left as the system's (glibc {gnu().decode()} refused the options)"
    return (f"glibc {gnu().decode()}: freed memory kept for reuse (mmap threshold {MMAP_LIMIT >> 20} MiB, "
            f"trim threshold {TRIM_LIMIT >> 20} MiB)")


def ensure() -> None:
    """Apply :func:`keep_freed_memory` once per process (cheap after the first call)."""
    if _state is None:
        keep_freed_memory()


def keep_freed_memory() -> str:
    """Set the malloc options (once); returns :func:`state`."""
    global _state
    with _lock:
        if _state is None:
            _state = _apply()
    return _state


def state() -> str:
    return _state if _state is not None else "not applied yet (no fused CPU forward has run)"
