"""torch.export programs (``.pt2``) and AOTInductor packages of the fast graph."""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import torch

from fastseg.deploy.common import (ExportError, ExportReport, _atomic_path, _check_output, _describe, _example,
                                   _odd_size, _parse_size, _progress, _size_oblivious, relative_error)
from fastseg.deploy.graph import fast_graph, model_kind


def _ranges(ep) -> str:
    """The input dims' ranges torch.export settled on, e.g. "batch >= 1, height >= 33, width >= 33"."""
    sizes = ep.graph_signature.user_inputs
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == sizes[0])
    parts = []
    for name, d in zip(("batch", "channels", "height", "width"), node.meta["val"].shape):
        if isinstance(d, torch.SymInt):
            vr = ep.range_constraints.get(d.node.expr)
            if vr is not None:
                hi = "" if str(vr.upper) in ("int_oo", "oo") else f" <= {vr.upper}"
                parts.append(f"{name} >= {vr.lower}{hi}")
    return ", ".join(parts)


def export_program(model, path, *, dynamic: bool = True, example_size=(512, 512), batch: int = 1,
                   fp16: bool = False, aoti: bool = False, check: bool = False,
                   progress: Callable[[str], None] | None = None) -> ExportReport:
    """Write the fast graph as a ``torch.export`` ExportedProgram (``.pt2``; read it back with
    ``torch.export.load(path).module()``), or with ``aoti=True`` as an AOTInductor package
    compiled for this machine (``torch._inductor.aoti_load_package``).

    The batch is fixed at ``batch``; with ``dynamic`` the height and width are symbolic. torch.export
    cannot keep the batch symbolic down to 1: its conv shape rule guards ``batch > 1``. It also
    guards that no map shrinks to one token (H, W >= 33, and stage 1's spatial-reduction grid
    more than 1×1, e.g. not both H, W < 61 for SegFormer); the report lists the ranges it kept.
    """
    model_kind(model)  # refuses anything but a SegFormer or SETR before any work
    size = _parse_size(example_size)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ExportError(f"batch must be a positive integer, got {batch!r}")
    path = _check_output(path)
    start = time.perf_counter()
    _progress(progress, f"[1/3] building the fast graph of {_describe(model)}{' (fp16 compute)' if fp16 else ''}")
    graph = fast_graph(model, fp16=fp16)
    x = _example(model, batch, size, False)
    _progress(progress, f"[2/3] torch.export ({'dynamic height/width, batch ' + str(batch) if dynamic else 'static'}"
                        f", traced at {'x'.join(map(str, x.shape))})")
    from torch.export import Dim

    dims = {"images": {2: Dim.DYNAMIC, 3: Dim.DYNAMIC}} if dynamic and hasattr(Dim, "DYNAMIC") else (
        {"images": {2: Dim("height", min=64), 3: Dim("width", min=64)}} if dynamic else None)
    with torch.no_grad(), _size_oblivious():
        ep = torch.export.export(graph, (x,), dynamic_shapes=dims)
    notes = []
    if dynamic:
        notes.append(f"dynamic ranges: {_ranges(ep) or 'none'} (batch fixed at {batch})")
        _progress(progress, "      " + notes[-1])
    with _atomic_path(path) as tmp:
        if aoti:
            _progress(progress, "[3/3] compiling an AOTInductor package (a C++ build; minutes)")
            from torch._inductor import aoti_compile_and_package

            aoti_compile_and_package(ep, package_path=str(tmp))
            notes.append("load with torch._inductor.aoti_load_package(path); compiled for this machine's "
                         f"{'CUDA' if x.is_cuda else 'CPU'} and torch {torch.__version__}")
        else:
            _progress(progress, "[3/3] writing the ExportedProgram atomically")
            torch.export.save(ep, str(tmp))
            notes.append("load with torch.export.load(path).module()")
    with torch.no_grad():
        out = tuple(graph(x).shape)
    report = ExportReport(str(path), "aoti" if aoti else "pt2", _describe(model), None, dynamic,
                          (batch, 3, "height", "width") if dynamic else tuple(x.shape),
                          (batch, out[1], "logits_height", "logits_width") if dynamic else out,
                          fp16, size_bytes=path.stat().st_size, notes=notes)
    ops = Counter(str(n.target).split(".")[1] if str(n.target).startswith("aten.") else str(n.target)
                  for n in ep.graph.nodes if n.op == "call_function")
    report.ops = dict(ops)
    if check:
        if aoti:
            from torch._inductor import aoti_load_package

            loaded = aoti_load_package(str(path))
        else:
            loaded = torch.export.load(str(path)).module()
        sizes = [size] if not dynamic else [size, _odd_size(size)]
        gen = torch.Generator().manual_seed(0)
        was_training = model.training
        model.eval()
        for s in sizes:
            xi = torch.randn(batch, model.config.in_channels, *s, generator=gen).to(x.device)
            with torch.no_grad():
                report.parity[f"{report.format} {'x'.join(map(str, xi.shape))}"] = relative_error(
                    loaded(xi).cpu(), model(xi).float().cpu())
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    return report
