"""Does INT8 pay off on this machine? An int8 engine timed against the same runtime at fp32.

INT8 is only worth its accuracy cost where the CPU runs int8 GEMMs faster than fp32 ones
(VNNI, AMX-INT8). Without them (e.g. a Zen 3: AVX2 only) OpenVINO's int8 graph runs about as
fast as fp32, so ``fastseg.deploy(..., precision="int8")`` times both, interleaved, a few
rounds at the engine's input size (``fastseg.deploy.engine.time_engines``, as ``runtime="auto"``
does), records them in ``engine.report["int8_payoff"]`` and warns in one line when int8 is not
faster. It never switches the precision itself: the caller asked for int8.
"""
from __future__ import annotations

import warnings

# int8 must beat fp32 by this factor to count as faster: smaller gaps are within the noise of a
# handful of interleaved rounds.
MIN_SPEEDUP = 1.05
ROUNDS = 3
INT8_FLAGS = ("avx512_vnni", "amx_int8")  # the x86 int8 dot-product ISAs /proc/cpuinfo names


class Int8SlowerWarning(UserWarning):
    """INT8 was measured no faster than fp32 on this CPU."""


def cpu_description() -> str:
    """``AMD EPYC (family 25 model 1, Zen 3), no VNNI / AMX-INT8``: the CPU and its int8 ISA."""
    from fastseg import cpu_info

    ident = cpu_info.identity()
    have = [f for f in INT8_FLAGS if f in ident["flags"]]
    isa = ("int8 ISA " + " + ".join(f.upper().replace("_", "-") for f in have)) if have else "no VNNI / AMX-INT8"
    return f"{cpu_info.label(ident)}, {isa}"


def verdict(int8_ms: float, fp32_ms: float, *, runtime: str, shape: str, cpu: str, rounds: int = ROUNDS) -> dict:
    """The report entry for measured medians: both latencies, the speed-up of int8 over fp32,
    whether it pays off (speed-up >= :data:`MIN_SPEEDUP`) and, when not, the one-line warning."""
    if not (int8_ms > 0 and fp32_ms > 0):
        raise ValueError(f"latencies must be positive, got int8 {int8_ms} ms and fp32 {fp32_ms} ms")
    speedup = fp32_ms / int8_ms
    entry = {"runtime": runtime, "shape": shape, "cpu": cpu, "rounds": rounds, "int8_ms": round(int8_ms, 3),
             "fp32_ms": round(fp32_ms, 3), "speedup": speedup, "pays_off": speedup >= MIN_SPEEDUP}
    if not entry["pays_off"]:
        entry["warning"] = (f"int8 is not faster than fp32 on this CPU ({cpu}): {runtime} int8 {int8_ms:.1f} ms vs "
                            f"fp32 {fp32_ms:.1f} ms at {shape} ({speedup:.2f}x); fp32 costs no accuracy here")
    return entry


def line(entry: dict) -> str:
    """The report's summary line for an ``int8_payoff`` entry."""
    if entry.get("skipped"):
        return f"int8 vs fp32: not measured ({entry['skipped']})"
    if not entry["pays_off"]:
        return f"int8 vs fp32: WARNING: {entry['warning']}"  # the warning names both latencies and the CPU
    return (f"int8 vs fp32 on {entry['runtime']} at {entry['shape']}: {entry['int8_ms']:.1f} ms vs "
            f"{entry['fp32_ms']:.1f} ms ({entry['speedup']:.2f}x faster) on {entry['cpu']}")


def warn(entry: dict | None) -> None:
    if entry and entry.get("warning"):
        warnings.warn(entry["warning"], Int8SlowerWarning, stacklevel=4)  # at the caller of deploy()
