"""How a fast path's output is judged against the reference — one rule for `fastseg bench`,
the benchmark suites and the GPU check.

fp32: the candidate is compared with eager fp32 directly (relative error, argmax agreement ≥
99.9 %). Low precision (fp16 / bf16): comparing one low-precision run with another by argmax
raises false alarms on random weights, whose logits are nearly tied. Instead both the eager
low-precision run and the candidate are compared with an fp32 gold (the eager model in fp32 on
the same input), and the candidate passes when its error is at most ``LOW_PRECISION_FACTOR`` ×
eager's own error (DESIGN.md, "Numerics"). The error used for that rule is the relative RMS
error ‖out − gold‖ / ‖gold‖: a single maximum over millions of logits is dominated by one
rounding and swings from run to run. NaN or inf never passes.
"""
from __future__ import annotations

import torch

ARGMAX_AGREEMENT_MIN = 0.999
LOW_PRECISION_FACTOR = 2.0
# Below this relative RMS error eager's own error is rounding noise of fp32 itself: the 2x rule
# would then demand bit-equality, so the bound never drops under it.
RMS_FLOOR = 1e-6


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Error of logits ``out`` against ``ref`` (both (B, K, ...)): max and RMS relative error,
    argmax agreement over K, and whether ``out`` is finite."""
    out, ref = out.detach().float(), ref.detach().float()
    if out.shape != ref.shape:
        raise ValueError(f"cannot compare outputs of shapes {tuple(out.shape)} and {tuple(ref.shape)}")
    finite = bool(torch.isfinite(out).all())
    if not finite:
        return {"max_rel_err": float("inf"), "rms_rel_err": float("inf"), "argmax_agreement": 0.0, "finite": False}
    diff = out - ref
    max_rel = (diff.abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    rms_rel = (diff.norm() / ref.norm().clamp_min(1e-12)).item()
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item() if out.ndim >= 2 else 1.0
    return {"max_rel_err": max_rel, "rms_rel_err": rms_rel, "argmax_agreement": agree, "finite": True}


def judge(candidate: dict, eager: dict | None, low_precision: bool) -> tuple[bool, str]:
    """Verdict for ``candidate`` (:func:`errors` against the gold). In fp32 the gold is eager
    itself and ``eager`` is unused; in low precision ``eager`` is eager's own error against the
    fp32 gold. Returns (passed, reason)."""
    if not candidate["finite"]:
        return False, "non-finite output"
    if not low_precision:
        if candidate["argmax_agreement"] < ARGMAX_AGREEMENT_MIN:
            return False, (f"argmax agrees with eager fp32 on {100 * candidate['argmax_agreement']:.3f}% of pixels "
                           f"(< {100 * ARGMAX_AGREEMENT_MIN:.1f}%)")
        return True, "agrees with eager fp32"
    if eager is None:
        raise ValueError("low-precision parity needs eager's own error against the fp32 gold")
    if not eager["finite"]:
        return True, "eager itself is non-finite in this precision; the candidate is finite"
    bound = LOW_PRECISION_FACTOR * max(eager["rms_rel_err"], RMS_FLOOR)
    if candidate["rms_rel_err"] > bound:
        return False, (f"RMS error vs fp32 gold {candidate['rms_rel_err']:.2e} > {LOW_PRECISION_FACTOR:g}x "
                       f"eager's own {eager['rms_rel_err']:.2e}")
    return True, (f"RMS error vs fp32 gold {candidate['rms_rel_err']:.2e} <= {LOW_PRECISION_FACTOR:g}x "
                  f"eager's {eager['rms_rel_err']:.2e}")


def judge_engine(candidate: dict, precision: str, eager: dict | None = None,
                 trained: bool = True) -> tuple[bool | None, str]:
    """Verdict for a deployed engine's row (``fastseg bench --engine`` / ``--runtime``), judged
    against the fp32 gold by the engine's own precision: fp32 as :func:`judge` in fp32; bf16 / fp16
    as :func:`judge` in low precision, ``eager`` being eager's own error in that precision; int8 by
    the pixel agreement of its labels (``candidate["agreement"]``, as the engine report computes it)
    with the int8 goal of :mod:`fastseg.deploy.quantize`, since int8 logits are not meant to match
    to a rounding. Random-init weights (``trained=False``) give nearly tied logits, so their int8
    agreement is reported but not judged: the verdict is then None."""
    if not candidate["finite"]:
        return False, "non-finite output"
    if precision == "fp32":
        return judge(candidate, None, False)
    if precision in ("bf16", "fp16"):
        return judge(candidate, eager, True)
    if precision != "int8":
        raise ValueError(f"unknown engine precision {precision!r}")
    from fastseg.deploy.quantize import GOAL

    agree = candidate["agreement"]
    text = f"labels agree with fp32's on {100 * agree:.3f}% of pixels"
    if not trained:
        return None, f"{text}; not judged: random-init weights give nearly tied logits (give a trained --checkpoint)"
    if agree < GOAL:
        return False, f"{text} (< {100 * GOAL:.1f}%)"
    return True, f"{text} (>= {100 * GOAL:.1f}%)"
