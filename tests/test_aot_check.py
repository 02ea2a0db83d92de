"""The ahead-of-time compile check (python -m fastseg.kernels.aot_check): its variant lists cover
every config the launchers can pick, it flags spills and shared memory over the limit, it
compiles for real GPU targets without a GPU, and its table is committed."""
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastseg.kernels import aot_check
from fastseg.kernels import decoder_upsample_fuse as dec
from fastseg.kernels import dwconv3x3_gelu as dw
from fastseg.kernels import sr_attention as attn

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "benchmarks" / "results" / "aot_check.md"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMS = (1, 8, 108, 132)


@pytest.fixture
def gpu_rules(monkeypatch):
    """The launchers' GPU selection code, called on CPU: interpreter off, a chosen SM count."""
    sms = {"n": 132}
    for module in (attn, dw, dec):
        monkeypatch.setattr(module, "interpreter_enabled", lambda: False)
        if hasattr(module, "sm_count"):
            monkeypatch.setattr(module, "sm_count", lambda device: sms["n"])
    return sms


def _key(cfg: dict) -> tuple:
    return tuple(sorted(cfg.items()))


def test_attention_variants_cover_every_launcher_choice(gpu_rules):
    device = torch.device("cuda")
    for dtype, head_dim, sms in itertools.product(DTYPES, (16, 24, 32, 40, 64, 100, 128), SMS):
        gpu_rules["n"] = sms
        bd = attn._block_d(head_dim)
        fwd = {_key(c) for c in attn.fwd_config_space(dtype, bd)}
        dq = {_key(c) for c in attn.dq_config_space(dtype, bd)}
        dkdv = {_key(c) for c in attn.dkdv_config_space(dtype, bd)}
        for n, nkv, ppt in itertools.product((1, 37, 1024, 16384, 131072), (1, 5, 16, 33, 256, 2048), (1, 2, 40)):
            assert _key(attn._fwd_config(n, nkv, head_dim, dtype, ppt, device)) in fwd
            q_cfg, kv_cfg, _ = attn._bwd_configs(n, nkv, head_dim, dtype, ppt, device)
            assert _key(q_cfg) in dq and _key(kv_cfg) in dkdv
    sums = {_key(c) for c in attn.sum_splits_config_space()}
    for width in (32, 48, 64, 128, 256, 1024):
        assert _key(attn._sum_splits_config(width)) in sums


def test_dwconv_and_decoder_variants_cover_every_launcher_choice(gpu_rules):
    device = torch.device("cuda")
    fwd = {_key(c) for c in dw.fwd_config_space()}
    bwd = {_key(c) for c in dw.bwd_config_space()}
    for B, H, W, C, sms in itertools.product((1, 8), (1, 3, 16, 128, 256), (1, 5, 16, 128), (8, 40, 128, 2048), SMS):
        gpu_rules["n"] = sms
        assert _key(dw._fwd_config(B, H, W, C, torch.bfloat16, device)) in fwd
        bwd_cfg = dw._bwd_config(B, H, W, C, torch.bfloat16, device)
        bwd_cfg.pop("ROWS")  # a runtime argument, not a compiled variant
        assert _key(bwd_cfg) in bwd
    for dtype in DTYPES:
        fwd = {_key(c) for c in dec.fwd_config_space(dtype)}
        cls = {_key(c) for c in dec.cls_config_space(dtype)}
        bwd = {_key(c) for c in dec.bwd_config_space(dtype)}
        for E in (1, 8, 24, 64, 256, 768):
            assert _key(dec._fwd_config(E, dtype)) in fwd
            assert _key(dec._bwd_config(E, dtype)) in bwd
            for K in (1, 19, 150, 256, 1000):
                assert _key(dec._cls_config(E, K, dtype)) in cls


def test_every_variant_names_every_kernel_argument():
    rows = aot_check.variants()
    assert {m for m, _, _ in rows} >= {"sr_attention", "dwconv3x3_gelu", "decoder_upsample_fuse"}
    for _, fn, args in rows:
        signature, constexprs, attrs, options = aot_check.specialise(fn, args)
        assert set(signature) == set(aot_check._params(fn)[0])
        assert options.get("num_warps") in (1, 2, 4, 8)
    kinds = {(aot_check._name(fn), aot_check.label(fn, args)[1]) for _, fn, args in rows}
    for kernel in ("_sr_attn_fwd_kernel", "_sr_attn_bwd_dq_kernel", "_sr_attn_bwd_dkdv_kernel",
                   "_dwconv3x3_gelu_fwd_kernel", "_dwconv3x3_gelu_bwd_kernel", "_upsample_sum_fwd_kernel",
                   "_upsample_sum_cls_fwd_kernel", "_resize_adjoint_kernel"):
        assert {(kernel, d) for d in ("fp32", "fp16", "bf16")} <= kinds, kernel


def test_problems_flags_spills_shared_memory_and_failures():
    ok = dict(kernel="k", config="c", dtype="bf16", arch="sm_80", registers=128, local=0, stack=0,
              shared=100 * 1024, error=None)
    assert aot_check.problems(ok) == []
    assert "spills" in aot_check.problems(dict(ok, stack=24))[0]
    assert "shared memory" in aot_check.problems(dict(ok, shared=164 * 1024))[0]
    assert aot_check.problems(dict(ok, arch="sm_90", shared=164 * 1024)) == []
    assert "compile failed" in aot_check.problems(dict(ok, error="boom"))[0]


def test_compiles_for_sm80_and_sm90_without_a_gpu(tmp_path):
    """A real compile through the command line: a few variants, both targets."""
    out = tmp_path / "table.md"
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "fastseg.kernels.aot_check", "--arch", "sm_80", "sm_90",
                           "--kernels", "sr_attention", "--match", "_sum_splits_kernel BLOCK_R=32 BLOCK_C=32 ", "--jobs", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| _sum_splits_kernel | BLOCK_R=")]
    assert len(rows) == 6  # 3 output dtypes x 2 targets
    assert {r.split(" | ")[2] for r in rows} == {"fp32", "fp16", "bf16"}
    assert {r.split(" | ")[3] for r in rows} == {"sm_80", "sm_90"}
    assert all(r.rstrip().endswith("| ok |") for r in rows)
    assert "aot_check: ok" in proc.stdout


def test_the_committed_table_covers_every_kernel():
    assert TABLE.exists(), "run python -m fastseg.kernels.aot_check --arch sm_80 sm_90 --out benchmarks/results/aot_check.md"
    text = TABLE.read_text()
    listed = set(re.findall(r"^\| (_\w+) \| sm_\d+ \|", text, re.M))
    kernels = {aot_check._name(fn) for _, fn, _ in aot_check.variants()}
    assert kernels <= listed, f"not in {TABLE.name}: {sorted(kernels - listed)}"
    assert "sm_80" in text and "sm_90" in text
