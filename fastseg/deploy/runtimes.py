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
