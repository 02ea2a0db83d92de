"""The runners fastseg is compared with in ``fastseg bench --peers``, all on the same weights.

A CPU user does not compare fastseg with eager PyTorch but with the deployment runtimes. So the
peer rows are:
  ``HF eager``             transformers' ``SegformerForSemanticSegmentation`` (the weights' source)
  ``HF compile``           the same under ``torch.compile`` (with ``--compile``)
  ``<runtime> on HF ONNX``       HF's own ONNX export (``torch.onnx.export`` of the HF module, as
                                optimum exports it) in ONNX Runtime / OpenVINO
  ``<runtime> on fastseg ONNX``  ``fastseg.export_onnx`` of the same weights (the fast graph); in
                                OpenVINO this is the strongest CPU anchor: our rewrite, run by
                                OpenVINO's engine
The weights are a random-init HF model of the variant (no hub access), loaded into fastseg with
``SegFormer.from_hf``, so every row computes the same function. OpenVINO runs with the inference
precision of the benchmark's dtype (its ``bf16`` hint for ``--dtype bf16``); where the CPU has no
bf16 (OpenVINO then compiles f32 whatever the hint says: Zen 3, pre-Cooper-Lake Xeons) its rows are
left out with a note rather than timed as f32 under a bf16 label. ONNX Runtime runs only in fp32
(its CPU provider has no bf16 kernels for these graphs). OpenVINO compiles the files
reshaped to the benchmark's static input shape, its fastest setting.

Each runner is a callable ``() -> logits (torch.Tensor)``; a peer whose package is missing is
returned as a note instead (``pip install fastseg[bench]``).
"""
from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path

import torch

RUNTIMES = ("onnxruntime", "openvino")
RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
# OpenVINO's names for the benchmark dtypes.
OPENVINO_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def row_name(runtime: str, graph: str) -> str:
    """The table's name of a runtime running one ONNX file: ``OpenVINO on fastseg ONNX``."""
    return f"{RUNTIME_NAMES[runtime]} on {graph} ONNX"


class PrecisionUnavailable(RuntimeError):
    """The runtime cannot run the requested precision on this CPU (the message says why)."""


def missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def hf_model(config, seed: int = 0):
    """A random-init transformers SegFormer with the sizes of fastseg ``config`` (eval mode)."""
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.SegformerConfig(
        num_channels=config.in_channels, hidden_sizes=list(config.embed_dims), depths=list(config.depths),
        num_attention_heads=list(config.num_heads), sr_ratios=list(config.sr_ratios),
        mlp_ratios=[config.mlp_ratio] * 4, decoder_hidden_size=config.decoder_dim, num_labels=config.num_classes)
    return transformers.SegformerForSemanticSegmentation(hf_config).eval()


class _Logits(torch.nn.Module):
    """HF's model with images in and the logits tensor out (what its ONNX export carries)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, pixel_values):
        return self.hf(pixel_values=pixel_values).logits


def export_hf_onnx(hf, path: Path, example: torch.Tensor) -> Path:
    """HF's model as ONNX with dynamic batch/height/width (TorchScript exporter, opset 18)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The wrapper in eval mode: the exporter restores the wrapper's mode onto every submodule.
        torch.onnx.export(_Logits(hf).eval(), (example,), str(path), dynamo=False, opset_version=18,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"},
                                        "logits": {0: "batch", 2: "h", 3: "w"}})
    return path


def _session(path: Path, runtime: str, dtype: torch.dtype, shape: tuple[int, ...]):
    from fastseg.deploy.runtimes import onnx_session

    if runtime == "onnxruntime":
        return onnx_session(path, "onnxruntime")
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    # OpenVINO's strongest setting: the dynamic file reshaped to the benchmark's input shape, so
    # it compiles static kernels (as a deployment with one input size would).
    model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(list(shape))})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[dtype]})
    # The hint is a request: without bf16/f16 in hardware OpenVINO compiles f32 silently.
    got = compiled.get_property("INFERENCE_PRECISION_HINT")
    if got.get_type_name() != OPENVINO_PRECISION[dtype]:
        capabilities = ", ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        raise PrecisionUnavailable(f"OpenVINO has no {OPENVINO_PRECISION[dtype]} on this CPU (asked for it, "
                                   f"compiled {got.get_type_name()}; its CPU capabilities: {capabilities})")
    request = compiled.create_infer_request()

    def run(images):
        request.infer({0: images})
        return request.get_output_tensor(0).data.copy()

    return run


def runners(fastseg_model, hf, x: torch.Tensor, dtype: torch.dtype, folder: Path, *, compile: bool = False,
            progress=None) -> tuple[dict, list[str]]:
    """({row name: callable () -> logits}, [notes on rows left out]) for CPU input ``x`` (fp32).

    ``fastseg_model`` (eval, fp32) is exported; ``hf`` must hold the same weights."""
    from fastseg import export_onnx

    def say(text):
        if progress:
            progress(text)

    rows, notes = {}, []
    images = x.float().contiguous()
    low = dtype != torch.float32

    # HF eager runs in the benchmark's dtype, as fastseg's eager and fused rows do.
    hf_low = copy.deepcopy(hf).to(dtype) if low else hf
    hf_images = images.to(dtype)

    def hf_eager(model):
        def fn():
            with torch.inference_mode():
                return model(pixel_values=hf_images).logits
        return fn

    rows["HF eager"] = hf_eager(hf_low)
    if compile:
        rows["HF compile"] = hf_eager(torch.compile(hf_low))
    if missing("onnx") or missing("onnxruntime") and missing("openvino"):
        notes.append("ONNX rows skipped: onnx / onnxruntime / openvino are not installed (pip install fastseg[bench])")
        return rows, notes
    say("exporting HF's ONNX")
    hf_path = export_hf_onnx(hf, folder / "hf.onnx", images[:1])
    say("exporting fastseg's ONNX")
    fs_path = folder / "fastseg.onnx"
    export_onnx(fastseg_model, fs_path, example_size=tuple(images.shape[2:]))
    array = images.numpy()
    for runtime in RUNTIMES:
        if missing(runtime):
            notes.append(f"{runtime} rows skipped: {runtime} is not installed (pip install fastseg[bench])")
            continue
        if runtime == "onnxruntime" and low:
            notes.append("onnxruntime rows skipped: its CPU provider runs these graphs in fp32 only")
            continue
        for graph, path in (("HF", hf_path), ("fastseg", fs_path)):
            try:
                run = _session(path, runtime, dtype, tuple(array.shape))
            except PrecisionUnavailable as e:
                notes.append(f"{RUNTIME_NAMES[runtime]} rows skipped: {e}")
                break
            rows[row_name(runtime, graph)] = (lambda run=run: torch.from_numpy(run(array)))
    return rows, notes
