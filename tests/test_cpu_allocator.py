"""fastseg.cpu_allocator: the first fused CPU forward tunes glibc malloc once; the env opts out.
Each case runs in a fresh interpreter (the setting is process-wide)."""
import os
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import torch
from fastseg import SegFormer, cpu_allocator
print(cpu_allocator.state())
m = SegFormer("b0", num_classes=3).eval()
with torch.inference_mode():
    m(torch.randn(1, 3, 64, 64))          # reference path: leaves malloc alone
    print(cpu_allocator.state())
    m.set_fused(True)(torch.randn(1, 3, 64, 64))
print(cpu_allocator.state())
"""


def run(env_value):
    env = dict(os.environ)
    env.pop("FASTSEG_CPU_MALLOC", None)
    if env_value is not None:
        env["FASTSEG_CPU_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_first_fused_cpu_forward_keeps_freed_memory():
    before, after_reference, after_fused = run(None)
    assert before.startswith("not applied") and after_reference.startswith("not applied")
    assert "kept for reuse" in after_fused and "mmap threshold 1024 MiB" in after_fused


def test_env_opts_out():
    lines = run("system")
    assert lines[-1] == "left as the system's (FASTSEG_CPU_MALLOC=system)"
