"""``fastseg.deploy(..., "openvino", "int8")`` against what a CPU deployer assembles today: NNCF's
default INT8 (``nncf.quantize``, ``model_type=TRANSFORMER``) of HuggingFace's own ONNX, in OpenVINO.

    python benchmarks/deploy_int8_vs_nncf.py --variant b0 --size 512

Same weights (a random-init HF model loaded into fastseg with ``SegFormer.from_hf``), same
calibration inputs (generated shapes images at the benchmark size), same input; both compiled
for the input's static shape. Timed alternately, the order flipping every round; medians and
their ratio printed. Random weights give nearly tied logits, so no accuracy is judged here
(tests/test_deploy.py judges INT8 accuracy on a trained model).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fastseg
from fastseg import SegFormer, SegFormerConfig, peers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="b0")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--calibration", type=int, default=16, help="calibration images")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--goal", type=float, default=0.0, help="fastseg's int8 agreement goal (default 0: all int8)")
    args = ap.parse_args()

    import nncf
    import openvino as ov

    from fastseg.data import SyntheticShapes, TestTransform

    hf = peers.hf_model(SegFormerConfig.from_variant(args.variant, num_classes=150))
    model = SegFormer.from_hf(hf).eval()
    shapes, transform = SyntheticShapes("val", args.calibration, args.size, 4, 0), TestTransform(None)
    calib = [transform(shapes.load(i)[0])[0][None].numpy() for i in range(args.calibration)]
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = peers.export_hf_onnx(hf, Path(tmp) / "hf.onnx", x)
        core = ov.Core()
        hf_ov = core.read_model(str(path))
        q = nncf.quantize(hf_ov, nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
        q.reshape({q.inputs[0].get_any_name(): ov.PartialShape(list(x.shape))})
        compiled = core.compile_model(q, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                 "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        request = compiled.create_infer_request()
        # int8_goal=0: every candidate group int8. Random weights give nearly tied logits, so a
        # measured search would keep groups in float for agreement that means nothing here.
        engine = fastseg.deploy(model, "openvino", "int8", calibration=calib, cache_dir=Path(tmp) / "engines",
                                input_size=(args.size, args.size), int8_goal=args.goal)
    array = x.numpy()

    def hf_int8():
        request.infer({0: array})
        return request.get_output_tensor(0).data

    rows = {"fastseg.deploy openvino int8": lambda: engine(x), "NNCF default int8 of HF ONNX (openvino)": hf_int8}
    times = {name: [] for name in rows}
    for fn in rows.values():
        fn()
        fn()
    names = list(rows)
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            rows[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"SegFormer-{args.variant} {args.size}x{args.size} b1, {torch.get_num_threads()} threads, "
          f"nncf {nncf.__version__}, openvino {ov.__version__}")
    for name, ms in med.items():
        print(f"  {name:44s} {ms:8.1f} ms")
    print(f"  speed-up: {med[names[1]] / med[names[0]]:.2f}x")
    print("  float groups kept by the measured search: "
          + (", ".join(engine.report["quantization"]["float_groups"]) or "none"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
