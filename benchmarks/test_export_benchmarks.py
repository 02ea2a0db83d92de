"""The "export" group: HuggingFace's own ONNX export of ``SegformerForSemanticSegmentation`` vs
fastseg's ONNX export of the same weights (``SegFormer.from_hf``), in ONNX Runtime and OpenVINO
(CPU), on the same input, with interleaved runs.

HF's file is ``torch.onnx.export`` of the HF module as is (the TorchScript exporter with dynamic
batch/height/width, as ``optimum`` exports it); fastseg's is ``fastseg.export_onnx`` (the fast
graph: decoder rewrite, BN folded), also dynamic. Both files run in the same runtime with its
default CPU settings. The HF models are random-init from a config (no hub access needed).

Sizes: FASTSEG_BENCH_QUICK=1 b0 at 64²; default b0 at 512²; FASTSEG_BENCH_FULL=1 b0 and b2 at
512². In the summary table "eager ms" is HF's ONNX and "fused ms" fastseg's, "speedup" the ratio.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from conftest import FULL, QUICK, _records

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from fastseg import SegFormer, export_onnx, peers  # noqa: E402
from fastseg.deploy.common import relative_error  # noqa: E402
from fastseg.deploy.runtimes import onnx_session  # noqa: E402
from fastseg.models.config import SegFormerConfig  # noqa: E402

try:
    import openvino  # noqa: F401
    RUNTIMES = ["onnxruntime", "openvino"]
except ImportError:
    RUNTIMES = ["onnxruntime"]

if QUICK:
    CASES = [("b0", 64)]
elif FULL:
    CASES = [("b0", 512), ("b2", 512)]
else:
    CASES = [("b0", 512)]
ROUNDS = 1 if QUICK else 12  # interleaved pairs per (variant, runtime)

_files: dict = {}


def files(variant: str, size: int, folder) -> dict:
    """{"hf": path, "fastseg": path} for one set of random weights (fastseg.peers builds both)."""
    if variant not in _files:
        hf = peers.hf_model(SegFormerConfig.from_variant(variant, num_classes=150), seed=0)
        hf_path = peers.export_hf_onnx(hf, folder / f"hf_{variant}.onnx", torch.randn(1, 3, size, size))
        fs_path = folder / f"fastseg_{variant}.onnx"
        export_onnx(SegFormer.from_hf(hf).eval(), fs_path, example_size=(size, size))
        _files[variant] = {"hf": hf_path, "fastseg": fs_path}
    return _files[variant]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[1]}")
def test_onnx_hf_vs_fastseg(benchmark, tmp_path_factory, case, runtime):
    variant, size = case
    paths = files(variant, size, tmp_path_factory.getbasetemp())
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3)).numpy()
    runs = {name: onnx_session(path, runtime) for name, path in paths.items()}
    outs = {name: run(x) for name, run in runs.items()}  # also the warm-up
    err = relative_error(outs["fastseg"], outs["hf"])
    assert err < 1e-4, f"fastseg's ONNX and HF's disagree in {runtime}: max relative error {err:.2e}"
    times = {name: [] for name in runs}
    for r in range(ROUNDS):  # interleaved, alternating which goes first
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            start = time.perf_counter()
            runs[name](x)
            times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    group = f"export {runtime} {variant} 1x3x{size}x{size} (eager col = HF ONNX, fused col = fastseg ONNX)"
    benchmark.group = group
    benchmark.extra_info.update({"hf_onnx_ms": ms["hf"], "fastseg_onnx_ms": ms["fastseg"],
                                 "speedup": ms["hf"] / ms["fastseg"], "max_rel_err": err,
                                 "runtime": runtime, "rounds": ROUNDS})
    for impl, key in (("eager", "hf"), ("fused", "fastseg")):
        _records.append({"group": group, "impl": impl, "median_ms": ms[key], "peak_mem_mb": float("nan")})
    benchmark.pedantic(lambda: runs["fastseg"](x), rounds=1 if QUICK else 3, iterations=1)
