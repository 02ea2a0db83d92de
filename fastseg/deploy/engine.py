"""``fastseg.deploy``: a model turned into an engine on one runtime at one precision.

    engine = fastseg.deploy(model_or_source, runtime="auto", precision="fp32",
                            calibration=None, input_size=None, cache_dir=None)
    logits = engine(images)                 # what model(images) returns: same shape, fp32
    labels = engine.segment(images)         # (B, H, W) int64 via the fused upsample + argmax
    engine.save("engine_dir"); fastseg.load_engine("engine_dir")
    print(engine.report)

Runtimes: ``torch`` (the fused model, optionally ``torch.compile``d), ``openvino`` and
``onnxruntime`` (the fast graph, :mod:`fastseg.deploy.graph`). Precisions: fp32, bf16, fp16,
int8; :func:`fastseg.deploy.runtimes.precision_reasons` decides which pairs run usefully here.
An engine is a folder: the artifact (fastseg weights, ONNX or OpenVINO IR) and ``engine.json``
(what it is, versions, its report). Built engines are cached (:mod:`fastseg.deploy.cache`).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fastseg.deploy import cache, runtimes
from fastseg.deploy.common import ExportError, _describe, relative_error

SCHEMA = "fastseg-engine/1"
TRACE_SIZE = (128, 128)  # the ONNX trace size: the graph is dynamic, small is quick to trace
AUTO_SIZE = (512, 512)   # what runtime="auto" times at when no input_size is given
AUTO_ROUNDS = 5


class EngineReport(dict):
    """What an engine is and how well it matches fp32; ``str()`` gives the printed summary."""

    def summary(self) -> str:
        lines = [f"engine: {self.get('model')} on {self['runtime']} {self['runtime_version']}, {self['precision']}"]
        if self.get("auto"):
            lines.append("auto: " + ", ".join(f"{r} {ms:.1f} ms" for r, ms in self["auto"]["ms"].items())
                         + f" at {self['auto']['shape']} -> {self['runtime']}")
        for kind, precs in sorted(self.get("op_precisions", {}).items()):
            lines.append(f"  {kind}: " + ", ".join(f"{p} x{n}" for p, n in sorted(precs.items())))
        q = self.get("quantization")
        if q:
            lines.append(f"int8: {q['quantized']} of {q['candidates']} MatMul/Conv quantized; kept in float: "
                         + (", ".join(q["float_groups"]) or "nothing beyond LayerNorm/softmax/GELU/resize-sum"))
            for step in q.get("search", []):
                lines.append(f"  {step}")
            if q.get("skipped"):
                lines.append(f"  calibration skipped {len(q['skipped'])} unreadable image(s): "
                             + ", ".join(p for p, _ in q["skipped"]))
        if self.get("int8_payoff"):
            from fastseg.deploy.payoff import line

            lines.append(line(self["int8_payoff"]))
        for where, p in self.get("parity", {}).items():
            lines.append(f"parity vs fp32 ({where}): max relative error {p['relative_error']:.2e}, "
                         f"pixel agreement {100 * p['agreement']:.3f}%"
                         + (f", mIoU vs fp32 labels {p['miou_vs_fp32']:.2f}" if "miou_vs_fp32" in p else ""))
        files = self.get("files", {})
        if files:
            lines.append("files: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(files.items())))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


class Engine:
    """A deployed model. ``engine(images)``: images (B, C, H, W) float → logits (B, K, h, w) fp32,
    as ``model(images)``; ``engine.segment(images, size=None)``: labels (B, H, W) int64."""

    def __init__(self, folder: Path, meta: dict, run, *, device=torch.device("cpu")):
        self.folder = Path(folder)
        self.meta = meta
        self.runtime = meta["runtime"]
        self.precision = meta["precision"]
        self.num_classes = meta["num_classes"]
        self.in_channels = meta["in_channels"]
        self.report = EngineReport(meta["report"])
        self.device = device
        self._run = run

    def __repr__(self) -> str:
        return f"Engine({self.meta.get('model')}, runtime={self.runtime}, precision={self.precision})"

    def _check(self, images) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (B, {self.in_channels}, H, W), got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"images must be (B, {self.in_channels}, H, W), got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch (B = 0)")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point, got {images.dtype}")
        if min(images.shape[2:]) < 32:
            raise ValueError(f"images must be at least 32x32, got {images.shape[2]}x{images.shape[3]}")
        return images

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = self._check(images)
        if self.runtime == "torch":
            return self._run(images)
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(np.asarray(self._run(x), dtype=np.float32)).to(images.device)

    def segment(self, images: torch.Tensor, size=None) -> torch.Tensor:
        """Labels (B, H, W) int64 at ``size`` (default: the images' H, W) through the fused
        upsample + argmax, so no full-resolution logits are held."""
        from fastseg.ops import upsample_argmax

        logits = self(images)
        return upsample_argmax(logits, tuple(images.shape[2:]) if size is None else size)

    def as_module(self) -> "EngineModule":
        """This engine where code expects a model (``fastseg predict`` / ``eval``)."""
        return EngineModule(self)

    def save(self, path) -> Path:
        """Copy the engine folder to ``path`` atomically; ``fastseg.load_engine(path)`` reads it."""
        dest = Path(path)
        if dest.resolve() == self.folder.resolve():
            return dest
        with cache.atomic_folder(dest) as tmp:
            for item in sorted(self.folder.iterdir(), key=lambda p: p.name == cache.MARKER):
                if item.is_dir():
                    shutil.copytree(item, tmp / item.name)
                else:
                    shutil.copy2(item, tmp / item.name)
        return dest


# --- building ---------------------------------------------------------------------------------------

def _model_from(model_or_source):
    from fastseg.deploy.graph import model_kind
    from fastseg.deploy.source import load_source

    if isinstance(model_or_source, (str, Path)):
        model = load_source(model_or_source)
    else:
        model = model_or_source
        if not isinstance(model, torch.nn.Module):
            raise ExportError(f"deploy takes a fastseg SegFormer/SETR or a path to one, got {type(model).__name__}")
    model_kind(model)
    return model.eval()


def _versions(runtime: str) -> dict:
    import fastseg

    return {"fastseg": fastseg.__version__, "torch": torch.__version__, runtime: runtimes.runtime_version(runtime)}


def _parity_inputs(model, batches, input_size) -> list[tuple[str, np.ndarray]]:
    if batches:
        return [("calibration inputs", b) for b in batches[:8]]
    gen = torch.Generator().manual_seed(0)
    size = tuple(input_size) if input_size else TRACE_SIZE
    return [("random inputs", torch.randn(2, model.config.in_channels, *size, generator=gen).numpy())]


def _parity(model, run, inputs, num_classes: int) -> dict:
    """Max relative error, pixel agreement and the mIoU of the engine's labels against fp32's,
    over ``inputs`` grouped by their label ("calibration inputs", ...)."""
    out: dict[str, dict] = {}
    for where, x in inputs:
        with torch.no_grad():
            want = model(torch.from_numpy(x)).float()
        got = torch.as_tensor(np.asarray(run(x), dtype=np.float32))
        err = relative_error(got, want)
        p = out.setdefault(where, {"relative_error": 0.0, "agree": 0, "pixels": 0, "conf": 0})
        p["relative_error"] = max(p["relative_error"], err)
        counts = _label_counts(got, want, num_classes)
        p["agree"] += counts["agree"]
        p["pixels"] += counts["pixels"]
        p["conf"] = p["conf"] + counts["conf"]
    for p in out.values():
        p["agreement"] = p.pop("agree") / max(1, p.pop("pixels"))
        p["miou_vs_fp32"] = miou(p.pop("conf"))
    return out


def _label_counts(got: torch.Tensor, want: torch.Tensor, num_classes: int) -> dict:
    from fastseg.metrics import confusion_matrix

    a, b = got.argmax(1).cpu(), want.argmax(1).cpu()
    return {"agree": int((a == b).sum()), "pixels": a.numel(), "conf": confusion_matrix(a, b, num_classes)}


def label_agreement(got: torch.Tensor, want: torch.Tensor, num_classes: int) -> dict:
    """``{"agreement", "miou_vs_fp32"}`` of the labels of logits ``got`` against those of the fp32
    logits ``want`` (both (B, K, h, w)): how an engine's report judges int8 (``fastseg bench`` too)."""
    counts = _label_counts(got.float(), want.float(), num_classes)
    return {"agreement": counts["agree"] / max(1, counts["pixels"]), "miou_vs_fp32": miou(counts["conf"])}


def miou(conf) -> float:
    """Mean IoU (in points) over the classes present in either map of a confusion matrix."""
    conf = torch.as_tensor(conf, dtype=torch.float64)
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float(100 * (inter[present] / union[present]).mean()) if present.any() else 100.0


def _file_sizes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != cache.MARKER}


def _build(model, runtime: str, precision: str, folder: Path, *, batches, skipped, input_size, progress,
           int8_goal=None) -> dict:
    """Write the artifact of (runtime, precision) into ``folder``; returns the report's body."""
    from fastseg.deploy.onnx import export_onnx

    report: dict = {}
    threads = torch.get_num_threads()
    if runtime == "torch":
        model.save_pretrained(folder / "model")
        run = _torch_runner(_load_torch(folder, model_class(model), precision, compile=False), precision)
        report["op_precisions"] = _torch_precisions(precision)
    else:
        onnx_path = folder / _onnx_file("fp16" if precision == "fp16" else "fp32")
        _say(progress, f"exporting the fast graph to ONNX{' (fp16 compute)' if precision == 'fp16' else ''}")
        export_onnx(model, onnx_path, example_size=TRACE_SIZE, fp16=precision == "fp16")
        if precision == "int8":
            from fastseg.deploy import quantize

            _say(progress, f"quantizing to int8 for {runtime} ({sum(b.shape[0] for b in batches)} calibration images)")
            goal = quantize.GOAL if int8_goal is None else float(int8_goal)
            report["quantization"] = quantize.quantize(model, onnx_path, folder, runtime, batches, goal=goal,
                                                       progress=progress)
            report["quantization"]["skipped"] = skipped
        elif runtime == "openvino":
            ov = runtimes.import_runtime("openvino")
            ov.save_model(ov.Core().read_model(str(onnx_path)), str(folder / "model.xml"), compress_to_fp16=False)
            onnx_path.unlink()
        run = _runner(folder, runtime, precision, threads)
        report["op_precisions"] = _op_precisions(folder, run, runtime, precision, model, input_size)
    _say(progress, "checking parity against the fp32 model")
    report["parity"] = _parity(model, run if runtime != "torch" else _numpy(run), _parity_inputs(model, batches,
                                                                                                  input_size),
                               model.num_classes)
    return report


def _numpy(run):
    return lambda x: run(torch.from_numpy(x)).numpy()


def model_class(model) -> str:
    from fastseg.deploy.graph import model_kind

    return model_kind(model)


def _load_torch(folder: Path, kind: str, precision: str, compile: bool):
    from fastseg import SETR, SegFormer

    cls = SegFormer if kind == "segformer" else SETR
    model = cls.from_pretrained(folder / "model", fused=True).eval()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = model.to(dtype)
    return torch.compile(model) if compile else model


def _torch_runner(model, precision: str):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    device = next(model.parameters()).device

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(images.to(device, dtype)).float().to(images.device)

    return run


def _torch_precisions(precision: str) -> dict:
    p = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[precision]
    return {"matmul/conv": {p: 1}, "layernorm": {"f32" if precision != "fp32" else p: 1},
            "softmax": {"f32": 1}}


def _onnx_file(precision: str) -> str:
    return {"fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}.get(precision, "model.onnx")


def _runner(folder: Path, runtime: str, precision: str, threads: int):
    if runtime == "onnxruntime":
        return runtimes.ort_session(folder / _onnx_file(precision), threads)
    return runtimes.OpenVINOSession(folder / "model.xml", precision, threads)


def _op_precisions(folder: Path, run, runtime: str, precision: str, model, input_size) -> dict:
    """OpenVINO: the execution precision of each runtime layer type as compiled; ONNX Runtime:
    each op type's input precision in the file (int8 where fed by DequantizeLinear)."""
    if runtime == "openvino":
        size = tuple(input_size) if input_size else TRACE_SIZE
        return run.op_precisions((1, model.config.in_channels, *size))
    from fastseg.deploy.onnx import onnx_precisions

    return onnx_precisions(folder / _onnx_file(precision))


def _say(progress, text: str) -> None:
    if progress is not None:
        progress(text)


# --- deploy / load_engine -----------------------------------------------------------------------------

def deploy(model_or_source, runtime: str = "auto", precision: str = "fp32", *, calibration=None,
           input_size=None, cache_dir=None, compile: bool = False, max_calibration_images: int | None = None,
           int8_goal: float | None = None, int8_timing: bool = True, progress=None) -> Engine:
    """An :class:`Engine` of ``model_or_source`` (a fastseg SegFormer/SETR, or a path
    :func:`fastseg.deploy.source.load_source` reads) on ``runtime`` at ``precision``.

    runtime: "torch", "openvino", "onnxruntime" or "auto" (the fastest installed runtime that can
    run ``precision`` here, measured once per machine, versions, precision and shape class).
    precision: "fp32", "bf16", "fp16" or "int8" (int8 needs ``calibration``: a folder of images
    or an iterable of input batches (B, C, H, W)). input_size: (H, W) the engine will mostly see
    (auto timing, OpenVINO's report, calibration resize). cache_dir: where built engines are kept
    (default ``~/.cache/fastseg/engines``); a second deploy of the same weights loads from it.
    compile: ``torch.compile`` the torch runtime's model. int8_goal: the pixel agreement with fp32
    the INT8 search keeps groups in float for (default 0.995; 0 quantizes every candidate group).
    int8_timing: time a new int8 engine against the same runtime at fp32 (a few interleaved
    forwards at ``input_size``, default 512²; :mod:`fastseg.deploy.payoff`), record both in
    ``engine.report["int8_payoff"]`` and warn (:class:`~fastseg.deploy.payoff.Int8SlowerWarning`)
    when int8 is not faster here; False skips the measurement (the fp32 engine is then not built).
    """
    from fastseg.deploy import calibration as calib
    from fastseg.deploy.common import _parse_size

    if precision not in runtimes.PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {list(runtimes.PRECISIONS)}")
    if runtime != "auto" and runtime not in runtimes.RUNTIMES:
        raise ExportError(f"unknown runtime {runtime!r}; choose one of {list(runtimes.RUNTIMES)} or 'auto'")
    if precision == "int8" and calibration is None:
        raise ExportError("int8 needs calibration: a folder of images or an iterable of input batches")
    if input_size is not None:
        input_size = _parse_size(input_size)
    model = _model_from(model_or_source)
    device = next(model.parameters()).device
    if runtime != "auto":
        runtimes.check_pair(runtime, precision, device)
    root = cache.cache_dir(cache_dir)
    limit = max_calibration_images or calib.MAX_IMAGES
    if calibration is not None and not calib.is_folder_source(calibration):
        calibration = list(calibration)  # an iterator is read twice: for the key and the build
    calib_key = calib.fingerprint(calibration, limit) if calibration is not None and precision == "int8" else None
    whash = cache.weights_hash(model)

    def get(rt: str) -> Engine:
        versions = _versions(rt)
        key = cache.digest(SCHEMA, whash, rt, precision, versions, calib_key,
                           list(input_size) if (input_size and precision == "int8") else None,
                           int8_goal if precision == "int8" else None)
        folder = cache.entry_path(root, rt, precision, key)
        if cache.is_complete(folder, key):
            _say(progress, f"cache hit: {folder}")
            return _open(folder, compile=compile)
        _say(progress, f"building {rt} {precision} engine into {folder}")
        batches, skipped = ([], [])
        if calibration is not None:
            batches, skipped = calib.load(calibration, model.config.in_channels, input_size=input_size,
                                          max_images=limit)
        start = time.perf_counter()
        with cache.atomic_folder(folder) as tmp:
            body = _build(model, rt, precision, tmp, batches=batches, skipped=skipped, input_size=input_size,
                          int8_goal=int8_goal, progress=progress)
            meta = {"schema": SCHEMA, "cache_key": key, "runtime": rt, "precision": precision,
                    "kind": model_class(model), "model": _describe(model), "num_classes": model.num_classes,
                    "in_channels": model.config.in_channels, "weights_sha256": whash, "versions": versions}
            body.update(runtime=rt, runtime_version=versions[rt], precision=precision, model=meta["model"],
                        build_seconds=round(time.perf_counter() - start, 2), files=_file_sizes(tmp))
            meta["report"] = body
            (tmp / cache.MARKER).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        return _open(folder, compile=compile)

    engine = get(runtime) if runtime != "auto" else _auto(model, precision, device, input_size, root, get, progress)
    if precision == "int8":
        _int8_payoff(engine, model, root, input_size, compile=compile, measure=int8_timing, progress=progress)
    return engine


def _int8_payoff(engine: Engine, model, root: Path, input_size, *, compile: bool, measure: bool, progress) -> None:
    """Time int8 against fp32 on the engine's runtime once per engine (kept in its engine.json)
    and warn when int8 is not faster; a measurement skipped now is taken by a later deploy."""
    from fastseg.deploy import payoff

    if measure and "int8_payoff" not in engine.report:
        fp32 = deploy(model, engine.runtime, "fp32", input_size=input_size, cache_dir=root, compile=compile,
                      progress=progress)
        _say(progress, f"timing int8 against fp32 on {engine.runtime}")
        size = tuple(input_size) if input_size else AUTO_SIZE
        ms = time_engines({"int8": engine, "fp32": fp32}, size, rounds=payoff.ROUNDS)
        engine.report["int8_payoff"] = payoff.verdict(
            ms["int8"], ms["fp32"], runtime=engine.runtime, shape="x".join(map(str, (1, engine.in_channels, *size))),
            cpu=payoff.cpu_description(), rounds=payoff.ROUNDS)
        _save_report(engine)
    payoff.warn(engine.report.get("int8_payoff"))


def _save_report(engine: Engine) -> None:
    """Rewrite the engine folder's engine.json with the current report (atomically; a read-only
    folder keeps the old one)."""
    from fastseg.io import atomic_write

    meta = dict(engine.meta, report={k: v for k, v in engine.report.items() if k != "auto"})
    try:
        with atomic_write(engine.folder / cache.MARKER, "w") as f:
            f.write(json.dumps(meta, indent=1, sort_keys=True, default=str))
    except OSError:
        return
    engine.meta = meta


def _auto(model, precision: str, device, input_size, root: Path, get, progress) -> Engine:
    """The fastest installed runtime for ``precision`` here: each candidate's engine is built (or
    read from the cache) and timed interleaved, median of a few rounds; the choice is kept."""
    from fastseg.tune import _bucket

    able = [r for r in runtimes.installed() if not runtimes.precision_reasons(r, precision, device)]
    if not able:
        reasons = {r: runtimes.precision_reasons(r, precision, device) for r in runtimes.installed()}
        raise runtimes.PrecisionUnsupported(f"no installed runtime can run {precision} here: "
                                            + "; ".join(f"{r}: {', '.join(v)}" for r, v in reasons.items()))
    if len(able) == 1:
        return get(able[0])
    size = tuple(input_size) if input_size else AUTO_SIZE
    key = cache.digest(cache.machine_key(device), {r: runtimes.runtime_version(r) for r in able},
                       _versions("torch"), precision, [_bucket(s) for s in size], repr(model.config),
                       torch.get_num_threads())
    chosen = cache.load_auto(root).get(key)
    if chosen and chosen.get("runtime") in able:
        engine = get(chosen["runtime"])
        engine.report["auto"] = chosen
        return engine
    engines = {r: get(r) for r in able}
    ms = time_engines(engines, size)
    best = min(ms, key=ms.get)
    entry = {"runtime": best, "ms": ms, "shape": "x".join(map(str, (1, model.config.in_channels, *size)))}
    _say(progress, "auto: " + ", ".join(f"{r} {t:.1f} ms" for r, t in ms.items()) + f" -> {best}")
    cache.save_auto(root, key, entry)
    engine = engines[best]
    engine.report["auto"] = entry
    return engine


def time_engines(engines: dict, size: tuple[int, int], rounds: int = AUTO_ROUNDS) -> dict:
    """{name: median ms} of ``engines`` ({name: Engine}) on one random (1, C, H, W) input, timed
    interleaved (:func:`fastseg.timing.interleaved`) after one warm-up call each (OpenVINO
    compiles for the shape there): what ``runtime="auto"`` picks by."""
    from fastseg.timing import interleaved, median

    first = next(iter(engines.values()))
    x = torch.randn(1, first.in_channels, *size, generator=torch.Generator().manual_seed(0))
    times = interleaved({name: (lambda e=e: e(x)) for name, e in engines.items()}, rounds)
    return {name: float(median(t)) for name, t in times.items()}


def _open(folder: Path, *, compile: bool = False) -> Engine:
    meta = _read_meta(folder)
    rt, precision = meta["runtime"], meta["precision"]
    runtimes.import_runtime(rt)
    threads = torch.get_num_threads()
    if rt == "torch":
        run = _torch_runner(_load_torch(folder, meta["kind"], precision, compile), precision)
    else:
        run = _runner(folder, rt, precision, threads)
    return Engine(folder, meta, run)


def _read_meta(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / cache.MARKER
    if not folder.is_dir():
        raise FileNotFoundError(f"engine folder {folder} does not exist")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{folder} is not a complete engine folder (no {cache.MARKER}; write one with "
                          "fastseg deploy or engine.save)") from None
    except ValueError as e:
        raise ExportError(f"{path} is corrupt: {e}") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise ExportError(f"{path} is not a fastseg engine ({SCHEMA}) description")
    return meta


def load_engine(path, *, compile: bool = False) -> Engine:
    """The engine saved in folder ``path`` (by ``engine.save`` or ``fastseg deploy --out``)."""
    return _open(Path(path), compile=compile)


class EngineModule(torch.nn.Module):
    """An engine where code expects a model: ``module(images)`` → logits; no parameters."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine
        self.num_classes = engine.num_classes
        self.engine_report = dict(engine.report)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.engine(images.float())
