"""Build and load the CPU emulation of the CUDA patch-embedding kernels (csrc/emulation/).

The kernels of csrc/overlap_patch_embed_kernel.cu compile unchanged as host C++ on top of
csrc/emulation/cuda_emulation.h, together with the same host driver the CUDA op uses
(csrc/overlap_patch_embed_kernel_host.cpp), into a test-only library registering
``torch.ops.fastseg_cuda_emulator.overlap_patch_embed_fwd`` / ``_bwd`` on CPU tensors.
It needs the CUDA headers (cuda_fp16.h, cuda_bf16.h, driver_types.h), not a GPU.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = ["overlap_patch_embed_checks.cpp", "overlap_patch_embed_kernel_host.cpp",
           "emulation/bindings.cpp", "emulation/kernel_emulated.cpp"]


def _nvcc_include_dir(nvcc: str) -> str | None:
    """The include directory nvcc itself passes (it may be a wrapper script outside the toolkit)."""
    try:
        dry = subprocess.run([nvcc, "-v", "--dryrun", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r'INCLUDES="-I([^"]+)"', dry.stdout + dry.stderr)
    return found.group(1) if found else None


def cuda_include_dir() -> str | None:
    """The CUDA toolkit's include directory: $CUDA_HOME / $CUDA_PATH, nvcc's, /usr/local/cuda*."""
    includes = [Path(root) / "include" for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if root]
    nvcc = shutil.which("nvcc")
    if nvcc:
        includes.append(Path(os.path.realpath(nvcc)).parents[1] / "include")
        from_nvcc = _nvcc_include_dir(nvcc)
        if from_nvcc:
            includes.append(Path(from_nvcc))
    includes += [Path(root) / "include" for root in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"))[::-1]]
    for include in includes:
        if (include / "cuda_fp16.h").exists() and (include / "driver_types.h").exists():
            return str(include)
    return None


def load():
    """Build (cached by torch's extension builder) and load; returns ``torch.ops.fastseg_cuda_emulator``."""
    from torch.utils.cpp_extension import load as build

    include = cuda_include_dir()
    if include is None:
        raise FileNotFoundError("the CUDA headers (cuda_fp16.h) were not found: set CUDA_HOME")
    build(name="fastseg_cuda_emulator", sources=[str(CSRC / s) for s in SOURCES],
          extra_include_paths=[str(CSRC), include], extra_cflags=["-O2", "-g0"], is_python_module=False,
          verbose=False)
    return torch.ops.fastseg_cuda_emulator
