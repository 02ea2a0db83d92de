"""Running exported files: ONNX Runtime and OpenVINO sessions on CPU."""
from __future__ import annotations

from fastseg.deploy.common import ExportError, _require


def onnx_session(path, runtime: str = "onnxruntime", threads: int | None = None):
    """A callable ``images (numpy, float32) → logits (numpy)`` for the file in ``runtime``
    ("onnxruntime" or "openvino"), on CPU."""
    if runtime == "onnxruntime":
        ort = _require("onnxruntime")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda images: sess.run(None, {name: images})[0]
    if runtime == "openvino":
        ov = _require("openvino")
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(str(path), "CPU", config)
        request = compiled.create_infer_request()

        def run(images):
            request.infer({0: images})
            return request.get_output_tensor(0).data.copy()

        return run
    raise ExportError(f"unknown runtime {runtime!r}; choose onnxruntime or openvino")


# --- the runtimes fastseg.deploy picks from ----------------------------------------------------------

RUNTIMES = ("torch", "openvino", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
_PACKAGES = {"torch": "torch", "openvino": "openvino", "onnxruntime": "onnxruntime"}
OV_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


class RuntimeUnavailable(ExportError):
    """A runtime that is not installed (or does not import)."""


class PrecisionUnsupported(ExportError):
    """A (runtime, precision) pair this runtime or this machine cannot run usefully."""


def import_runtime(name: str):
    import importlib

    if name not in RUNTIMES:
        raise ExportError(f"unknown runtime {name!r}; choose one of {list(RUNTIMES)} or 'auto'")
    try:
        return importlib.import_module(_PACKAGES[name])
    except ImportError as e:
        raise RuntimeUnavailable(f"runtime {name} is not installed or does not import ({e}); installed: "
                                 f"{', '.join(installed()) or 'none'} (pip install {_PACKAGES[name]})") from None


def installed() -> list[str]:
    import importlib

    found = []
    for name in RUNTIMES:
        try:
            importlib.import_module(_PACKAGES[name])
        except ImportError:
            continue
        found.append(name)
    return found


def runtime_version(name: str) -> str:
    return str(getattr(import_runtime(name), "__version__", "unknown"))


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower than fp32."""
    from fastseg.deploy.cache import cpu_flags

    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def openvino_capabilities() -> set[str]:
    ov = import_runtime("openvino")
    return set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def precision_reasons(runtime: str, precision: str, device) -> list[str]:
    """Why ``runtime`` cannot run ``precision`` usefully on ``device`` (empty: it can). Decided by
    what runs and pays off: a precision the hardware would only emulate is refused, not faked."""
    if precision not in PRECISIONS:
        return [f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}"]
    cuda = getattr(device, "type", str(device)) == "cuda"
    if runtime == "torch":
        if precision == "int8":
            return ["the torch runtime has no int8 engine (quantized engines run in openvino or onnxruntime)"]
        if precision == "fp16" and not cuda:
            return ["torch has no fast fp16 CPU kernels (fp16 runs on CUDA, or in onnxruntime on CPU)"]
        if precision == "bf16" and not cuda and not cpu_has_bf16():
            return ["this CPU has no AVX512-BF16 or AMX, so torch would emulate bf16, slower than fp32"]
        if precision == "bf16" and cuda and not torch_cuda_bf16():
            return ["this GPU has no bf16"]
        return []
    if cuda:
        return [f"fastseg runs {runtime} on the CPU only; use the torch runtime on CUDA"]
    if runtime == "onnxruntime":
        if precision == "bf16":
            return ["ONNX Runtime's CPU provider has no bf16 kernels"]
        return []
    if runtime == "openvino":
        caps = openvino_capabilities()
        if precision == "bf16" and "BF16" not in caps:
            return [f"OpenVINO's CPU plugin has no bf16 on this CPU (its capabilities: {', '.join(sorted(caps))}); "
                    "it would run f32 and call it bf16"]
        if precision == "fp16" and "FP16" not in caps:
            return [f"OpenVINO's CPU plugin has no fp16 on this CPU (its capabilities: {', '.join(sorted(caps))})"]
        return []
    return [f"unknown runtime {runtime!r}"]


def torch_cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def check_pair(runtime: str, precision: str, device) -> None:
    """Raise a one-line :class:`PrecisionUnsupported` naming what can run ``precision`` here."""
    import_runtime(runtime)
    reasons = precision_reasons(runtime, precision, device)
    if not reasons:
        return
    able = [r for r in installed() if not precision_reasons(r, precision, device)]
    own = [p for p in PRECISIONS if not precision_reasons(runtime, p, device)]
    raise PrecisionUnsupported(
        f"{runtime} cannot run {precision} here: {'; '.join(reasons)}. {precision} runs here in: "
        f"{', '.join(able) or 'none of the installed runtimes'}; {runtime} runs: {', '.join(own)}")


def ort_session(path, threads: int | None = None):
    """An ONNX Runtime CPU session of ``path`` as ``images (numpy) -> logits (numpy)``."""
    ort = import_runtime("onnxruntime")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda images: sess.run(None, {name: images})[0]


class OpenVINOSession:
    """An OpenVINO CPU model compiled per input shape: each new (B, C, H, W) is reshaped to static
    dims and compiled once (the peers' strongest setting; static kernels skip shape inference),
    with the precision hint and torch's thread count. ``images (numpy) -> logits (numpy)``."""

    MAX_SHAPES = 4

    def __init__(self, path, precision: str = "fp32", threads: int | None = None):
        ov = import_runtime("openvino")
        self._ov, self._core = ov, ov.Core()
        self._model = self._core.read_model(str(path))
        self.config = {"INFERENCE_PRECISION_HINT": OV_HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self._compiled: dict[tuple, tuple] = {}

    def compiled(self, shape: tuple):
        if shape not in self._compiled:
            if len(self._compiled) >= self.MAX_SHAPES:
                self._compiled.pop(next(iter(self._compiled)))
            model = self._model.clone()
            model.reshape({model.inputs[0].get_any_name(): self._ov.PartialShape(list(shape))})
            compiled = self._core.compile_model(model, "CPU", self.config)
            self._compiled[shape] = (compiled, compiled.create_infer_request())
        return self._compiled[shape]

    def __call__(self, images):
        _, request = self.compiled(tuple(images.shape))
        request.infer({0: images})
        return request.get_output_tensor(0).data.copy()

    def op_precisions(self, shape: tuple) -> dict[str, dict[str, int]]:
        """{runtime layer type: {execution precision: count}} of the graph compiled for ``shape``."""
        compiled, _ = self.compiled(shape)
        out: dict[str, dict[str, int]] = {}
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
            prec = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
            if kind in ("Input", "Output", "Parameter", "Result", "Const", "Constant"):
                continue
            out.setdefault(kind, {}).setdefault(prec, 0)
            out[kind][prec] += 1
        return out
