"""Which CPU a result was measured on: the one place that names it.

A CPU timing means little without the CPU: the same fused forward is 1.7x OpenVINO on an AMX
Xeon and at parity on a Zen 4. So every benchmark record carries :func:`record` — vendor, model
name, family/model and the microarchitecture they map to (``AMD EPYC (family 25 model 1,
Zen 3)``; a VM's generic "Intel(R) Xeon(R) Processor" becomes Sapphire Rapids from its model
number), the ISA flags that decide which kernels run, the ISA ATen's vectorised kernels and
oneDNN dispatch to, and the thread count. ``fastseg info`` prints :func:`summary_lines`.

oneDNN's ISA is what it reports under ``ONEDNN_VERBOSE=1`` for one tiny inner product, run in a
child process (the verbose header is printed once per process, so it cannot be read back in
this one); the answer is cached in memory and on disk per (CPU, flags, torch, oneDNN env).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import subprocess
import sys

import torch

# The x86 flags that decide which GEMM / attention kernels can run (Linux /proc/cpuinfo names).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")

# Intel family 6 model numbers -> microarchitecture (server parts first; client parts where a
# developer's laptop would show them). A VM often hides the brand string but not the model.
_INTEL_FAMILY6 = {
    0x3F: "Haswell", 0x3C: "Haswell", 0x45: "Haswell", 0x46: "Haswell",
    0x4F: "Broadwell", 0x56: "Broadwell", 0x3D: "Broadwell", 0x47: "Broadwell",
    0x4E: "Skylake", 0x5E: "Skylake", 0x8E: "Kaby/Coffee Lake", 0x9E: "Kaby/Coffee Lake",
    0xA5: "Comet Lake", 0xA6: "Comet Lake", 0xA7: "Rocket Lake",
    0x6A: "Ice Lake-SP", 0x6C: "Ice Lake-SP", 0x7D: "Ice Lake", 0x7E: "Ice Lake",
    0x8C: "Tiger Lake", 0x8D: "Tiger Lake",
    0x8F: "Sapphire Rapids", 0xCF: "Emerald Rapids", 0xAD: "Granite Rapids", 0xAE: "Granite Rapids-D",
    0xAF: "Sierra Forest", 0xDD: "Clearwater Forest",
    0x97: "Alder Lake", 0x9A: "Alder Lake", 0xB7: "Raptor Lake", 0xBA: "Raptor Lake", 0xBF: "Raptor Lake",
    0xAA: "Meteor Lake", 0xAC: "Meteor Lake", 0xC5: "Arrow Lake", 0xC6: "Arrow Lake", 0xBD: "Lunar Lake",
    0x57: "Knights Landing", 0x85: "Knights Mill",
}
# AMD family 25 (0x19) model ranges (upper nibble) -> Zen 3 or Zen 4.
_AMD_FAMILY25 = {0x0: "Zen 3", 0x2: "Zen 3", 0x3: "Zen 3", 0x4: "Zen 3+", 0x5: "Zen 3",
                 0x1: "Zen 4", 0x6: "Zen 4", 0x7: "Zen 4", 0xA: "Zen 4"}


def microarchitecture(vendor_id: str, family: int | None, model: int | None, stepping: int | None = None) -> str | None:
    """The microarchitecture of an x86 CPU from its CPUID vendor/family/model, or None if unknown."""
    if family is None or model is None:
        return None
    if vendor_id == "AuthenticAMD":
        if family == 23:  # 0x17: Zen and Zen+ below model 0x30, Zen 2 from there
            return "Zen 2" if model >= 0x30 else "Zen/Zen+"
        if family == 25:
            return _AMD_FAMILY25.get(model >> 4)
        if family == 26:  # 0x1A
            return "Zen 5"
        return None
    if vendor_id == "HygonGenuine" and family == 24:
        return "Dhyana (Zen)"
    if vendor_id == "GenuineIntel" and family == 6:
        if model == 0x55:  # one model number, three generations told apart by stepping
            if stepping is None:
                return "Skylake-SP/Cascade Lake"
            return "Cooper Lake" if stepping >= 10 else "Cascade Lake" if stepping >= 5 else "Skylake-SP"
        return _INTEL_FAMILY6.get(model)
    return None


_VENDORS = {"AuthenticAMD": "AMD", "GenuineIntel": "Intel", "HygonGenuine": "Hygon"}


def parse_cpuinfo(text: str) -> dict:
    """The identity fields of the first processor in a ``/proc/cpuinfo`` text.

    Returns vendor_id, vendor, model_name, family, model, stepping, microarch, flags (the
    :data:`ISA_FLAGS` present, in that order) and logical_cpus (the processor entries). Fields a
    text lacks (another architecture, a container hiding them) are None."""
    first: dict[str, str] = {}
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "processor":
            processors += 1
            if processors > 1:
                continue
        if processors <= 1 and key not in first:
            first[key] = value.strip()

    def number(key):
        try:
            return int(first[key])  # decimal in /proc/cpuinfo
        except (KeyError, ValueError):
            return None

    vendor_id = first.get("vendor_id", "")
    family, model, stepping = number("cpu family"), number("model"), number("stepping")
    present = set((first.get("flags") or first.get("Features") or "").split())
    return {
        "vendor_id": vendor_id or None,
        "vendor": _VENDORS.get(vendor_id, vendor_id or None),
        "model_name": first.get("model name") or None,
        "family": family,
        "model": model,
        "stepping": stepping,
        "microarch": microarchitecture(vendor_id, family, model, stepping),
        "flags": [f for f in ISA_FLAGS if f in present],
        "logical_cpus": processors or None,
    }


def label(ident: dict) -> str:
    """``AMD EPYC (family 25 model 1, Zen 3)``: model name, then family/model and microarchitecture."""
    name = ident.get("model_name") or ident.get("vendor") or platform.processor() or platform.machine() or "CPU"
    detail = []
    if ident.get("family") is not None and ident.get("model") is not None:
        detail.append(f"family {ident['family']} model {ident['model']}")
    if ident.get("microarch"):
        detail.append(ident["microarch"])
    return f"{name} ({', '.join(detail)})" if detail else name


def isa_summary(flags) -> str:
    """The widest matrix ISA among ``flags``: what a reader needs to compare two CPU results."""
    flags = set(flags)
    parts = []
    if {"amx_bf16", "amx_tile"} <= flags:
        parts.append("AMX")
    if "avx512_bf16" in flags:
        parts.append("AVX512-BF16")
    elif "avx512f" in flags:
        parts.append("AVX-512")
    if not parts:
        parts.append("AVX2" if "avx2" in flags else "no AVX2")
    return " + ".join(parts)


@functools.lru_cache(maxsize=1)
def identity() -> dict:
    """:func:`parse_cpuinfo` of this machine (``/proc/cpuinfo``; ``platform`` where it is absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            ident = parse_cpuinfo(f.read())
    except OSError:
        ident = parse_cpuinfo("")
    if not ident["model_name"]:
        ident["model_name"] = platform.processor() or platform.machine() or None
    ident["logical_cpus"] = ident["logical_cpus"] or os.cpu_count()
    return ident


def aten_isa() -> str:
    """The ISA ATen's vectorised CPU kernels dispatch to (``DEFAULT``, ``AVX2``, ``AVX512``, ...)."""
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    try:
        return get() if get else torch._C._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "unknown"


def onednn_bf16() -> bool:
    """Whether torch's oneDNN build runs bf16 GEMMs on this CPU (it needs AVX512BW/VL/DQ, AVX-NE-CONVERT
    or AMX; on AVX2-only CPUs such as Zen 3 its bf16 inner product does not exist)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


# The child: one tiny oneDNN inner product with verbose on; oneDNN prints its version, ISA and the
# implementation it picked (e.g. ``brg_matmul:avx2``) to stdout.
_PROBE = ("import torch\n"
          "x = torch.randn(8, 16); w = torch.randn(4, 16)\n"
          "torch.ops.mkldnn._linear_pointwise(x, w, None, 'none', [], '')\n")


def parse_onednn_verbose(text: str) -> dict:
    """oneDNN's version, dispatched ISA and the inner product's implementation from verbose output."""
    version = re.search(r"oneDNN v([0-9][^\s,]*)", text)
    isa = re.search(r",cpu,isa:([^\n\r]+)", text)
    impl = re.search(r"exec,cpu,inner_product,([^,]+),", text)
    return {"onednn_version": version.group(1) if version else None,
            "onednn_isa": isa.group(1).strip() if isa else None,
            "onednn_inner_product": impl.group(1) if impl else None}


def _cache_key() -> str:
    ident = identity()
    env = {k: v for k, v in os.environ.items() if k.startswith(("ONEDNN_", "DNNL_")) and "VERBOSE" not in k}
    blob = json.dumps([ident["model_name"], ident["family"], ident["model"], ident["flags"], torch.__version__, env],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_path():
    from fastseg.tune import cache_dir

    return cache_dir() / "onednn_isa.json"


@functools.lru_cache(maxsize=1)
def onednn() -> dict:
    """What oneDNN dispatches to on this machine (see :func:`parse_onednn_verbose`), cached on disk.

    Values are None (with ``onednn_error``) when torch has no oneDNN or the probe fails."""
    if not torch.backends.mkldnn.is_available():
        return {**parse_onednn_verbose(""), "onednn_error": "torch is built without oneDNN (mkldnn)"}
    key, path = _cache_key(), _cache_path()
    try:
        cached = json.loads(path.read_text()).get(key)
        if cached:
            return cached
    except (OSError, ValueError, AttributeError):
        pass
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=120)
        out = parse_onednn_verbose(proc.stdout + proc.stderr)
        if out["onednn_isa"] is None:
            tail = (proc.stderr.strip().splitlines() or ["no verbose output"])[-1]
            return {**out, "onednn_error": f"oneDNN probe printed no ISA line ({tail})"}
    except (OSError, subprocess.SubprocessError) as e:
        return {**parse_onednn_verbose(""), "onednn_error": f"oneDNN probe failed: {e}"}
    try:
        from fastseg.io import save_json_atomic

        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        table[key] = out
        path.parent.mkdir(parents=True, exist_ok=True)
        save_json_atomic(table, path)
    except OSError:
        pass  # a read-only home only costs the probe again next process
    return out


def record(probe_onednn: bool = True) -> dict:
    """Everything a benchmark record says about the CPU (JSON-ready)."""
    ident = identity()
    out = {
        "label": label(ident),
        "vendor": ident["vendor"],
        "model_name": ident["model_name"],
        "family": ident["family"],
        "model": ident["model"],
        "stepping": ident["stepping"],
        "microarch": ident["microarch"],
        "isa_flags": {f: f in ident["flags"] for f in ISA_FLAGS},
        "isa": isa_summary(ident["flags"]),
        "aten_isa": aten_isa(),
        "onednn_bf16": onednn_bf16(),
        "threads": torch.get_num_threads(),
        "logical_cpus": ident["logical_cpus"],
    }
    if probe_onednn:
        out.update(onednn())
    return out


def short(rec: dict) -> str:
    """One table cell: ``AMD EPYC (family 25 model 1, Zen 3); AVX2; oneDNN avx2; 2 threads``."""
    parts = [rec["label"], rec["isa"]]
    if rec.get("onednn_isa"):
        parts.append(f"oneDNN {rec['onednn_isa']}")
    parts.append(f"{rec['threads']} threads")
    return "; ".join(parts)


def summary_lines(rec: dict | None = None) -> list[str]:
    """``fastseg info``'s CPU block."""
    rec = rec or record()
    flags = " ".join(f if on else f"-{f}" for f, on in rec["isa_flags"].items())
    onednn_line = (f"oneDNN {rec.get('onednn_version')}: ISA {rec['onednn_isa']} (inner product: "
                   f"{rec.get('onednn_inner_product')}; bf16 GEMMs: {'yes' if rec.get('onednn_bf16') else 'no'})"
                   if rec.get("onednn_isa")
                   else f"oneDNN: {rec.get('onednn_error', 'not probed')}")
    return [f"CPU: {rec['label']}, {rec['logical_cpus']} logical CPUs, torch threads {rec['threads']}",
            f"  ISA flags: {flags}",
            f"  ATen CPU capability: {rec['aten_isa']}; {onednn_line}"]
