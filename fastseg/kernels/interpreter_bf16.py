"""bfloat16 as a GPU computes it, for Triton's CPU interpreter.

The interpreter keeps bfloat16 values as their uint16 bit patterns (numpy has no bfloat16), and
two of its operations get them wrong (seen with triton 3.6 to 3.9):

- ``tl.dot`` multiplies the bit patterns as integers (garbage);
- ``fp32 -> bf16`` casts truncate, where compiled kernels round to nearest even.

``apply()`` wraps those two builder methods so that bf16 dot operands are widened exactly to
fp32 first (products of bf16 values are exact in fp32, and the GPU accumulates in fp32 too) and
fp32 -> bf16 casts round to nearest even (NaN stays NaN). Every other path is the interpreter's
own. It changes nothing outside interpreter mode, and only if the builder has the methods it
expects (``apply()`` returns whether it is in effect). ``tests/test_interpreter_bf16.py`` checks
both operations against torch.
"""
from __future__ import annotations

import numpy as np

_applied = False


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16_bits(values: np.ndarray, round_to_nearest: bool = True) -> np.ndarray:
    """float32 values -> uint16 bfloat16 bit patterns, rounded to nearest even (or truncated)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    u = values.view(np.uint32)
    if round_to_nearest:
        rounded = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
    else:
        rounded = u >> 16
    nan = np.isnan(values)
    rounded = np.where(nan, (u >> 16) | np.uint32(0x0040), rounded)  # a quiet NaN, sign kept
    return rounded.astype(np.uint16)


def apply() -> bool:
    """Install the two fixes on the interpreter's builder (idempotent). True when in effect."""
    global _applied
    if _applied:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None or not all(hasattr(builder, m) for m in ("create_dot", "cast_impl")):
        return False
    create_dot, cast_impl = builder.create_dot, builder.cast_impl

    def widened(t):
        if t.dtype.scalar != tl.bfloat16:
            return t
        return handle(bf16_bits_to_fp32(t.data), tl.float32)

    def fixed_create_dot(self, a, b, d, *args, **kwargs):
        return create_dot(self, widened(a), widened(b), d, *args, **kwargs)

    def fixed_cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == tl.float32 and dst_ty == tl.bfloat16:
            return handle(fp32_to_bf16_bits(src.data), tl.bfloat16)
        if src_ty == tl.bfloat16 and dst_ty == tl.float32:
            return handle(bf16_bits_to_fp32(src.data), tl.float32)
        return cast_impl(self, src, dst_type)

    builder.create_dot = fixed_create_dot
    builder.cast_impl = fixed_cast_impl  # the interpreter's cast helpers call self.cast_impl
    create_fp_to_fp = getattr(builder, "create_fp_to_fp", None)
    if create_fp_to_fp is not None:  # casts with an explicit rounding mode
        def fixed_create_fp_to_fp(self, src, dst_type, rounding_mode):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                to_nearest = "RTZ" not in str(rounding_mode).upper()
                return handle(fp32_to_bf16_bits(src.data, to_nearest), tl.bfloat16)
            return create_fp_to_fp(self, src, dst_type, rounding_mode)

        builder.create_fp_to_fp = fixed_create_fp_to_fp
    _applied = True
    return True
