"""ONNX export of the fast graph (ONNX Runtime, OpenVINO, TensorRT).

The ONNX file has one input ``images`` (B, 3, H, W) float32 and one output ``logits`` with the
shape ``model(images)`` gives; batch, height and width are symbolic unless ``dynamic=False``.
Files are written atomically (a temporary file in the target folder, then renamed).
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Callable

import torch

from fastseg.deploy.common import (MIN_SIZE, ExportError, ExportReport, _atomic_path, _check_output, _describe,
                                   _example, _odd_size, _parse_size, _progress, _require, relative_error)
from fastseg.deploy.graph import ATTENTIONS, fast_graph, model_kind
from fastseg.deploy.runtimes import onnx_session

MIN_OPSET = 17
DEFAULT_OPSET = 18


def _dynamic_shapes():
    from torch.export import Dim

    # Dim.DYNAMIC lets torch.export refine the ranges from the model's own size guards (a stage's
    # map must not shrink to 1×1 for some views), where named Dims with bounds would fail.
    dyn = getattr(Dim, "DYNAMIC", None) or Dim("size", min=MIN_SIZE)
    return {"images": {0: getattr(Dim, "DYNAMIC", None) or Dim("batch"), 2: dyn, 3: dyn}}


def count_ops(onnx_model) -> dict[str, int]:
    """{op_type: count} over the graph (and any local functions)."""
    counts = Counter(n.op_type for n in onnx_model.graph.node)
    for fn in onnx_model.functions:
        counts.update(n.op_type for n in fn.node)
    return dict(counts)


EXPORTERS = ("auto", "torchscript", "dynamo")


def check_opset(opset) -> None:
    """A one-line error, before any tracing, for an opset outside [17, the installed onnx's newest]."""
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ExportError(f"opset must be an integer, got {opset!r}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: LayerNormalization needs opset >= {MIN_OPSET}")
    onnx = _require("onnx")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ExportError(f"opset {opset} is newer than the installed onnx {onnx.__version__} knows "
                          f"(its newest is {newest}); pass --opset {MIN_OPSET}..{newest} or upgrade onnx")


def _torchscript_max_opset() -> int:
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):
        return 0


def _pick_exporter(exporter: str, opset: int) -> str:
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {list(EXPORTERS)}")
    if exporter != "auto":
        return exporter
    return "torchscript" if opset <= _torchscript_max_opset() else "dynamo"


def _trace_torchscript(graph, x, opset: int, dynamic: bool):
    """torch.onnx's TorchScript exporter: a plain trace (seconds, where torch.export's symbolic
    shapes take tens of seconds), then onnxscript's optimizer folds the trace's constants."""
    import io

    import onnx
    import onnxscript

    buf = io.BytesIO()
    axes = {"images": {0: "batch", 2: "height", 3: "width"},
            "logits": {0: "batch", 2: "logits_height", 3: "logits_width"}} if dynamic else None
    torch.onnx.export(graph, (x,), buf, dynamo=False, opset_version=opset, input_names=["images"],
                      output_names=["logits"], dynamic_axes=axes, do_constant_folding=True)
    return onnxscript.optimizer.optimize(onnx.load_from_string(buf.getvalue()))


def _trace_dynamo(graph, x, opset: int, dynamic: bool):
    """torch.onnx's dynamo exporter (torch.export + onnxscript translation)."""
    program = torch.onnx.export(
        graph, (x,), dynamo=True, opset_version=opset, input_names=["images"], output_names=["logits"],
        dynamic_shapes=_dynamic_shapes() if dynamic else None, optimize=True, verbose=False)
    proto = program.model_proto
    if dynamic:
        _name_dims(proto)
    return proto


def export_onnx(model, path, *, dynamic: bool = True, example_size=(512, 512), opset: int = DEFAULT_OPSET,
                fp16: bool = False, batch: int = 1, check: bool = False, exporter: str = "auto",
                attention: str = "matmul", progress: Callable[[str], None] | None = None) -> ExportReport:
    """Write ``model``'s fast graph (see :func:`fast_graph`) as an ONNX file at ``path``.

    model: a fastseg SegFormer or SETR (fused or not). dynamic: symbolic batch, height and width
    (``False``: fixed ``batch`` × 3 × ``example_size``, which TensorRT builds fastest from).
    example_size: (H, W) to trace at (and the static size), each >= 32. opset: 17 up to the
    installed onnx's newest.
    fp16: half-precision compute (LayerNorm, softmax, folded decoder sums in fp32; fp32 I/O).
    check: run the file in ONNX Runtime against the PyTorch model and record the error.
    exporter: "torchscript" (torch.onnx's tracing exporter; opset <= 20), "dynamo" (torch.export
    based; any opset, slower to export) or "auto" (torchscript where it covers the opset).
    attention: "matmul" (MatMul / Softmax / MatMul on head views) or "op" (one ``Attention`` node
    per layer; needs opset >= 23 and the dynamo exporter).
    Returns an :class:`ExportReport`; raises :class:`ExportError` on bad options.
    """
    model_kind(model)  # refuses anything but a SegFormer or SETR before any work
    check_opset(opset)
    size = _parse_size(example_size)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ExportError(f"batch must be a positive integer, got {batch!r}")
    if attention not in ATTENTIONS:
        raise ExportError(f"attention must be one of {list(ATTENTIONS)}, got {attention!r}")
    if attention == "op" and opset < 23:
        raise ExportError(f"attention='op' writes ONNX's Attention operator, which needs opset >= 23 (got {opset})")
    exporter = _pick_exporter(exporter, opset)
    if attention == "op" and exporter != "dynamo":
        raise ExportError("attention='op' needs the dynamo exporter (the TorchScript exporter has no Attention)")
    path = _check_output(path)
    onnx = _require("onnx")
    _require("onnxscript")
    start = time.perf_counter()
    _progress(progress, f"[1/4] building the fast graph of {_describe(model)}{' (fp16 compute)' if fp16 else ''}")
    graph = fast_graph(model, fp16=fp16, attention=attention)
    x = _example(model, batch, size, dynamic and exporter == "dynamo")
    _progress(progress, f"[2/4] tracing with torch.onnx's {exporter} exporter, opset {opset}, "
                        f"{'dynamic batch/height/width' if dynamic else 'static ' + 'x'.join(map(str, x.shape))}")
    with torch.no_grad(), _quiet():
        proto = (_trace_dynamo if exporter == "dynamo" else _trace_torchscript)(graph, x, opset, dynamic)
    _progress(progress, "[3/4] checking the graph (onnx.checker) and writing it atomically")
    onnx.checker.check_model(proto)
    with _atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    with torch.no_grad():
        out_shape = tuple(graph(x).shape)
    in_shape = ("batch", 3, "height", "width") if dynamic else tuple(x.shape)
    if dynamic:
        out_shape = ("batch", out_shape[1], "logits_height", "logits_width")
    report = ExportReport(str(path), "onnx", _describe(model), opset, dynamic, in_shape, out_shape, fp16,
                          ops=count_ops(proto), size_bytes=path.stat().st_size, exporter=exporter)
    if check:
        _progress(progress, "[4/4] checking parity in ONNX Runtime against PyTorch")
        sizes = [size] if not dynamic else [size, _odd_size(size)]
        b = batch if not dynamic else 2
        report.parity.update(check_parity(model, path, sizes=sizes, batch=b, runtimes=("onnxruntime",)))
    else:
        _progress(progress, "[4/4] done (no parity check: pass check=True / --check)")
    report.seconds = time.perf_counter() - start
    return report


def _name_dims(proto) -> None:
    """Readable symbolic dims: images (batch, 3, height, width); logits (batch, K, h, w)."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for d, name in zip(dims, ("batch", None, "height", "width")):
        if name and not d.HasField("dim_value"):
            d.dim_param = name
    out = proto.graph.output[0].type.tensor_type.shape.dim
    for d, name in zip(out, ("batch", None, "logits_height", "logits_width")):
        if name and not d.HasField("dim_value"):
            d.dim_param = name


@contextlib.contextmanager
def _quiet():
    """torch.onnx's dynamo exporter prints progress lines of its own; ours replace them."""
    import io
    import warnings
    from contextlib import redirect_stdout

    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def check_parity(model, path, *, sizes, batch: int = 1, runtimes=("onnxruntime",), seed: int = 0) -> dict:
    """Max relative error of the ONNX file against ``model``'s fp32 PyTorch output, per runtime
    and size: {"onnxruntime 2x3x97x131": err, …}."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    results = {}
    try:
        for rt in runtimes:
            run = onnx_session(path, rt)
            for s in sizes:
                x = torch.randn(batch, model.config.in_channels, *s, generator=gen)
                with torch.no_grad():
                    want = model(x.to(device)).float().cpu()
                got = run(x.numpy())
                results[f"{rt} {'x'.join(map(str, x.shape))}"] = relative_error(got, want)
    finally:
        model.train(was_training)
    return results


OP_CLASSES = ("Conv", "MatMul", "Gemm", "LayerNormalization", "Softmax", "Erf", "Resize")
_ONNX_TYPES = {1: "f32", 10: "f16", 16: "bf16", 11: "f64"}


def onnx_precisions(path) -> dict[str, dict[str, int]]:
    """{op type: {precision: count}} for the op classes that matter: a Conv / MatMul whose two
    operands come from DequantizeLinear runs int8 (QDQ), else an op computes in its first
    input's element type."""
    import onnx

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output)}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    dq = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    out: dict[str, dict[str, int]] = {}
    for n in proto.graph.node:
        if n.op_type not in OP_CLASSES:
            continue
        # int8 compute needs both operands quantized; an excluded node fed by a shared DQ runs f32
        if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[0] in dq and n.input[1] in dq:
            prec = "int8"
        else:
            prec = "f32" if n.input[0] in dq else _ONNX_TYPES.get(types.get(n.input[0]), "?")
        out.setdefault(n.op_type, {}).setdefault(prec, 0)
        out[n.op_type][prec] += 1
    return out
