"""INT8 that keeps accuracy: post-training static quantization of the fast graph.

OpenVINO: ``nncf.quantize`` (model_type TRANSFORMER) on the fast graph's IR. ONNX Runtime:
``quantize_static`` in QDQ format. Either way only MatMul / Conv run in int8; LayerNorm,
softmax and GELU are never quantized, nor is the decoder's folded projection + resize-sum
(its Mᵢ convs, resizes and adds: a rounding error there lands on every output pixel).

Which MatMul / Conv groups are quantized is decided by measurement on the calibration inputs:
quantize every candidate group, measure pixel agreement of the labels with fp32 on held-out
calibration inputs; while it is below the goal, measure each group's sensitivity (agreement
with that group alone kept in float), then keep the most sensitive groups in float one at a
time until the goal is met. Groups are a block's attention, a block's Mix-FFN, a stage's patch
embedding, and the classifier, named from the ONNX tensor names (``/stages.0/blocks.1/attn/…``).
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import numpy as np
import torch

from fastseg.deploy import calibration as calib
from fastseg.deploy import runtimes

GOAL = 0.995          # pixel agreement of the int8 labels with fp32's on held-out inputs
MAX_FLOAT_GROUPS = 8  # the greedy search stops here: beyond it int8 would no longer pay off
QUANTIZED_TYPES = {"MatMul", "Conv", "Convolution", "GroupConvolution", "Gemm"}
_TRANSPARENT = {"Reshape", "Transpose", "Convert", "Squeeze", "Unsqueeze"}


def group_of(tensor_name: str, is_classifier: bool = False) -> str | None:
    """The layer group of a MatMul / Conv from its output tensor's name; "decoder" for the
    folded resize-sum (always float); None where the name says nothing."""
    if is_classifier:
        return "classifier"
    m = re.match(r"/stages\.(\d+)/blocks\.(\d+)/(attn|mlp)/", tensor_name)
    if m:
        return f"stage{int(m[1]) + 1}.block{m[2]}.{m[3]}"
    m = re.match(r"/stages\.(\d+)/patch_embed/", tensor_name)
    if m:
        return f"stage{int(m[1]) + 1}.patch_embed"
    if tensor_name.startswith("/decoder/"):
        return "decoder"
    return None


def _labels_agreement(run, judge, gold_labels) -> float:
    agree = total = 0
    for x, want in zip(judge, gold_labels):
        got = np.asarray(run(x)).argmax(1)
        agree += int((got == want).sum())
        total += want.size
    return agree / max(1, total)


def search(candidates: list[str], build, judge, gold_labels, goal: float = GOAL, progress=None):
    """(float groups, agreement, log lines): the greedy measured choice described above.
    ``build(float_groups) -> run`` makes a runnable int8 model keeping those groups in float."""
    log = []
    floats: list[str] = []
    agreement = _labels_agreement(build(floats), judge, gold_labels)
    log.append(f"all {len(candidates)} groups int8: agreement {100 * agreement:.3f}%")
    if agreement >= goal:
        return floats, agreement, log
    sensitivity = {}
    for g in candidates:
        sensitivity[g] = _labels_agreement(build([g]), judge, gold_labels)
    order = sorted(candidates, key=lambda g: -sensitivity[g])
    log.append("sensitivity (agreement with the group in float): "
               + ", ".join(f"{g} {100 * sensitivity[g]:.2f}%" for g in order[:6]))
    for g in order[:MAX_FLOAT_GROUPS]:
        floats.append(g)
        agreement = _labels_agreement(build(floats), judge, gold_labels)
        log.append(f"+ {g} in float: agreement {100 * agreement:.3f}%")
        if progress:
            progress(log[-1])
        if agreement >= goal:
            break
    return floats, agreement, log


def quantize(model, onnx_path: Path, folder: Path, runtime: str, batches, *, goal: float = GOAL,
             progress=None) -> dict:
    """Write the int8 artifact of ``onnx_path`` (the fp32 fast graph) into ``folder`` for
    ``runtime``; returns the quantization report."""
    calib_set, judge = calib.split(batches)
    with torch.no_grad():
        gold_labels = [model(torch.from_numpy(x)).float().argmax(1).numpy() for x in judge]
    if runtime == "openvino":
        result = _openvino(onnx_path, folder, calib_set, judge, gold_labels, goal, progress)
    elif runtime == "onnxruntime":
        result = _onnxruntime(onnx_path, folder, calib_set, judge, gold_labels, goal, progress)
    else:
        raise runtimes.PrecisionUnsupported(f"{runtime} has no int8 engine; int8 runs in openvino or onnxruntime")
    result.update(calibration_images=sum(b.shape[0] for b in calib_set),
                  held_out_images=sum(b.shape[0] for b in judge), goal=goal)
    return result


# --- OpenVINO + NNCF ----------------------------------------------------------------------------------

def _ov_groups(model) -> tuple[dict, list]:
    """({op friendly name: group}, [result-feeding classifier op]) over MatMul / Conv ops."""
    result_inputs = {r.input_value(0).get_node().get_friendly_name() for r in model.get_results()}
    groups = {}
    for op in model.get_ops():
        if op.get_type_name() not in QUANTIZED_TYPES:
            continue
        names = [n for o in op.outputs() for n in o.get_names()]
        # the classifier: its conv feeds the output (through its bias Add)
        feeds_out = any(t.get_node().get_friendly_name() in result_inputs or
                        t.get_node().get_friendly_name() == op.get_friendly_name()
                        for t in op.output(0).get_target_inputs()) or op.get_friendly_name() in result_inputs
        g = None
        for n in names or [op.get_friendly_name()]:
            g = group_of(n, is_classifier=feeds_out and n.startswith("/decoder/")) or g
        if g is None:
            g = group_of(op.get_friendly_name()) or "other"
        groups[op.get_friendly_name()] = g
    return groups, sorted(result_inputs)


def _consumers(output) -> list:
    """The ops that read ``output``, looking through reshapes, transposes and converts."""
    found = []
    for t in output.get_target_inputs():
        node = t.get_node()
        if node.get_type_name() in _TRANSPARENT:
            found += _consumers(node.output(0))
        else:
            found.append(node)
    return found


def _bypass(qmodel, groups: dict, float_groups: set):
    """A copy of the quantized model with every FakeQuantize that feeds an op of ``float_groups``
    removed (its input wired straight through): those ops then run in float."""
    model = qmodel.clone()
    if not float_groups:
        return model
    for op in list(model.get_ordered_ops()):
        if op.get_type_name() != "FakeQuantize":
            continue
        if any(groups.get(c.get_friendly_name()) in float_groups for c in _consumers(op.output(0))):
            op.output(0).replace(op.input_value(0))
    model.validate_nodes_and_infer_types()
    return model


def _openvino(onnx_path, folder, calib_set, judge, gold_labels, goal, progress) -> dict:
    import nncf

    ov = runtimes.import_runtime("openvino")
    core = ov.Core()
    fp32 = core.read_model(str(onnx_path))
    groups, _ = _ov_groups(fp32)
    # the decoder's folded projections, resizes and adds stay float (a fixed rule, see the docstring)
    ignored = [op.get_friendly_name() for op in fp32.get_ops()
               if any(n.startswith("/decoder/") for o in op.outputs() for n in o.get_names())
               and groups.get(op.get_friendly_name()) != "classifier"]
    samples = [x for b in calib_set for x in np.split(b, b.shape[0])]
    qmodel = nncf.quantize(fp32, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                           subset_size=len(samples), ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
    groups, _ = _ov_groups(qmodel)
    candidates = sorted({g for g in groups.values() if g not in ("decoder", "other")}, key=_group_order)
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}

    def build(float_groups):
        compiled = core.compile_model(_bypass(qmodel, groups, set(float_groups)), "CPU", config)
        request = compiled.create_infer_request()

        def run(x):
            request.infer({0: x})
            return request.get_output_tensor(0).data.copy()

        return run

    floats, agreement, log = search(candidates, build, judge, gold_labels, goal, progress)
    ov.save_model(_bypass(qmodel, groups, set(floats)), str(folder / "model.xml"), compress_to_fp16=False)
    Path(onnx_path).unlink()
    n = sum(1 for g in groups.values() if g in candidates and g not in floats)
    return {"tool": f"nncf {nncf.__version__} (TRANSFORMER)", "float_groups": floats,
            "agreement_held_out": agreement, "search": log, "quantized": n,
            "candidates": sum(1 for g in groups.values() if g in candidates)}


def _group_order(g: str):
    nums = [int(v) for v in re.findall(r"\d+", g)]
    return (g == "classifier", nums, g)


# --- ONNX Runtime QDQ ---------------------------------------------------------------------------------

def _onnx_groups(proto) -> dict:
    """{node name: group} over MatMul / Conv nodes of the fp32 fast graph."""
    outputs = {o.name for o in proto.graph.output}
    groups = {}
    for n in proto.graph.node:
        if n.op_type not in QUANTIZED_TYPES:
            continue
        feeds = [m for m in proto.graph.node if set(n.output) & set(m.input)]
        # the classifier: the conv whose output (or its bias Add's) is the graph's output
        classifier = n.output[0] in outputs or any(set(m.output) & outputs for m in feeds)
        groups[n.name] = group_of(n.output[0], classifier) or "other"
    return groups


@contextlib.contextmanager
def _quiet_root_logger():
    """quantize_static logs advice ("consider pre-processing") on the root logger at every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _onnxruntime(onnx_path, folder, calib_set, judge, gold_labels, goal, progress) -> dict:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    proto = onnx.load(str(onnx_path))
    groups = _onnx_groups(proto)
    candidates = sorted({g for g in groups.values() if g not in ("decoder", "other")}, key=_group_order)
    fixed = [name for name, g in groups.items() if g in ("decoder", "other")]
    name = proto.graph.input[0].name
    samples = [x for b in calib_set for x in np.split(b, b.shape[0])]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(samples)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {name: x}

    out = Path(folder) / "model.int8.onnx"
    threads = torch.get_num_threads()

    def build(float_groups):
        exclude = fixed + [n for n, g in groups.items() if g in float_groups]
        with _quiet_root_logger():
                quantize_static(str(onnx_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "MatMul"], nodes_to_exclude=exclude,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        return runtimes.ort_session(out, threads)

    # the search's last build is its answer: model.int8.onnx holds the chosen float groups
    floats, agreement, log = search(candidates, build, judge, gold_labels, goal, progress)
    Path(onnx_path).unlink()
    n = sum(1 for g in groups.values() if g in candidates and g not in floats)
    import onnxruntime

    return {"tool": f"onnxruntime {onnxruntime.__version__} quantize_static (QDQ, per-channel)",
            "float_groups": floats, "agreement_held_out": agreement, "search": log, "quantized": n,
            "candidates": sum(1 for g in groups.values() if g in candidates)}
