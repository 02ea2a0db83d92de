"""Where the time goes, part by part: OpenVINO running fastseg's own ONNX against fastseg fused.

    python benchmarks/openvino_op_compare.py --variant b0 --threads 1 --rounds 9

Both run the same weights (a random-init HF SegFormer loaded with ``SegFormer.from_hf``, as
``fastseg bench --peers`` does) on the same image, interleaved in one process (fastseg, OpenVINO,
fastseg, ...), and each forward is split into the same SegFormer parts:

- OpenVINO: ``PERF_COUNT`` and ``get_profiling_info()`` of the static 1×3×H×W compiled model; each
  executed node is mapped to a part from its name and, for convolutions, from its weight
  initialiser in the ONNX file (fc1 / fc2 are 1×1 convolutions in the exported graph, the
  depthwise conv carries the fused GELU). LayerNorms are MVN nodes whose names no longer say
  where they were, so they form one row; layout reorders (to and from OpenVINO's blocked layout)
  are their own row.
- fastseg: wall time of each fused op called by the SegFormer module (``ops.mix_ffn``,
  ``ops.sr_attention``, ``ops.add_layer_norm``, the sr ``conv2d``, the patch embedding, the q / kv /
  proj linears, the attention's LayerNorm, the decoder), wrapped in place for the run.

Both sides are wall time per forward (the median over ``--rounds``), so with 2 threads a part
that scales badly shows up as slow. A loaded machine inflates both sides, fastseg's OpenMP
regions more than OpenVINO's TBB (a preempted OpenMP thread stalls its whole region; TBB's
other thread steals the work): compare 2-thread figures only from a quiet machine.
Writes JSON + Markdown to ``benchmarks/results``.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import functools
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROWS = ("patch embed (conv + LN)", "q", "kv", "sr conv", "attention core", "proj", "mix-ffn fc1",
        "mix-ffn dwconv+GELU", "mix-ffn fc2", "mix-ffn total", "residual add (+LN)", "layernorm (other)",
        "layout reorders", "decoder", "other")


def _onnx_roles(path: Path) -> dict:
    """ONNX Conv node name -> part, from the node's weight initialiser and input."""
    import onnx

    roles = {}
    for n in onnx.load(str(path)).graph.node:
        if n.op_type != "Conv":
            continue
        src, w = n.input[0], n.input[1]
        if "patch_embed" in w:
            roles[n.name] = "patch embed (conv + LN)"
        elif "sr_weight" in w:
            roles[n.name] = "sr conv"
        elif "dwconv" in w:
            roles[n.name] = "mix-ffn dwconv+GELU"
        elif "decoder." in w:
            roles[n.name] = "decoder"
        elif "/mlp/Reshape" in src:
            roles[n.name] = "mix-ffn fc1"
        elif "/mlp/Mul" in src:
            roles[n.name] = "mix-ffn fc2"
    return roles


def _openvino_part(name: str, kind: str, roles: dict) -> str:
    if name in roles:
        return roles[name]
    if name == "logits" or "/decoder/" in name:
        return "decoder"
    if kind == "Reorder":
        return "layout reorders"
    if kind == "MVN":
        return "layernorm (other)"  # names lost in fusion: every LayerNorm of the graph
    if "/attn/" in name:
        last = name.rsplit("/", 1)[1]
        if kind == "FullyConnected":
            return {"MatMul": "q", "MatMul_1": "kv", "MatMul_2": "kv", "MatMul_5": "proj"}.get(last, "attention core")
        return "attention core"
    if re.search(r"/blocks\.\d+/Add(_1)?$", name):
        return "residual add (+LN)"
    return "other"


def _openvino_runner(path: Path, shape, threads: int):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(list(shape))})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": "YES",
                                                 "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    roles = _onnx_roles(path)

    def run(array) -> dict:
        t = time.perf_counter()
        request.infer({0: array})
        total = (time.perf_counter() - t) * 1e3
        parts = collections.defaultdict(float)
        for info in request.get_profiling_info():
            parts[_openvino_part(info.node_name, info.node_type, roles)] += info.real_time.total_seconds() * 1e3
        parts["mix-ffn total"] = sum(parts.get(k, 0.0) for k in ("mix-ffn fc1", "mix-ffn dwconv+GELU", "mix-ffn fc2"))
        parts["TOTAL"] = total
        return dict(parts)

    return run


def _fastseg_runner(model):
    """Run ``model`` (fused) with its ops wrapped by timers; returns (run, restore)."""
    import fastseg.models.segformer as sf
    from fastseg import ops

    acc: dict[str, float] = collections.defaultdict(float)
    depth = [0]

    def timed(label_of, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            if depth[0]:  # only the outermost timed call counts
                return fn(*a, **k)
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[label_of(*a, **k)] += time.perf_counter() - t
                depth[0] -= 1
        return wrapper

    kind = {}
    for name, mod in model.named_modules():
        for lin in ("q", "kv", "proj"):
            if name.endswith("attn." + lin):
                kind[id(mod.weight)] = lin
    wrapped_ops = type(sys)("ops_timed")
    for name in dir(ops):
        if not name.startswith("_"):
            setattr(wrapped_ops, name, getattr(ops, name))
    wrapped_ops.sr_attention = timed(lambda *a, **k: "attention core", ops.sr_attention)
    wrapped_ops.mix_ffn = timed(lambda *a, **k: "mix-ffn total", ops.mix_ffn)
    wrapped_ops.add_layer_norm = timed(lambda *a, **k: "residual add (+LN)", ops.add_layer_norm)
    wrapped_ops.conv2d = timed(lambda *a, **k: "sr conv", ops.conv2d)
    wrapped_ops.overlap_patch_embed = timed(lambda *a, **k: "patch embed (conv + LN)", ops.overlap_patch_embed)
    saved = (sf.ops, sf.packed_linear)
    sf.ops = wrapped_ops
    sf.packed_linear = timed(lambda x, w, *a, **k: kind.get(id(w), "decoder"), saved[1])
    handles = []

    def time_module(mod, label):
        state = {}

        def pre(_m, _a):
            state["on"] = depth[0] == 0
            if state["on"]:
                depth[0] += 1
                state["t"] = time.perf_counter()

        def post(_m, _a, _o):
            if state.get("on"):
                acc[label] += time.perf_counter() - state["t"]
                depth[0] -= 1

        handles.extend((mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)))

    time_module(model.decoder, "decoder")
    for mod in model.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            time_module(mod, "layernorm (other)")

    def run(images) -> dict:
        acc.clear()
        t = time.perf_counter()
        with torch.inference_mode():
            model(images)
        total = (time.perf_counter() - t) * 1e3
        parts = {k: v * 1e3 for k, v in acc.items()}
        parts["other"] = total - sum(parts.values())
        parts["TOTAL"] = total
        return parts

    def restore():
        sf.ops, sf.packed_linear = saved
        for h in handles:
            h.remove()

    return run, restore


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="b0")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--note", default="", help="e.g. how loaded the machine was")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fastseg import SegFormer, cpu_info, export_onnx, peers
    from fastseg.bench import generated_image
    from fastseg.io import file_slug, save_result
    from fastseg.models.config import SegFormerConfig

    hf = peers.hf_model(SegFormerConfig.from_variant(args.variant, num_classes=150), 0)
    model = SegFormer.from_hf(hf).eval().set_fused(True)
    images = generated_image(args.size, args.size, 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fastseg.onnx"
        export_onnx(SegFormer.from_hf(hf).eval(), path, example_size=(args.size, args.size))
        ov_run = _openvino_runner(path, tuple(images.shape), args.threads)
    fs_run, restore = _fastseg_runner(model)
    array = images.numpy().copy()
    try:
        for _ in range(2):
            fs_run(images), ov_run(array)
        fs_runs, ov_runs = [], []
        for _ in range(args.rounds):
            fs_runs.append(fs_run(images))
            ov_runs.append(ov_run(array))
    finally:
        restore()

    def median(runs):
        keys = set().union(*runs)
        return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}

    fs, ov = median(fs_runs), median(ov_runs)
    cpu = cpu_info.record()
    when = datetime.datetime.now(datetime.timezone.utc)
    import openvino

    record = {"variant": args.variant, "size": args.size, "threads": args.threads, "rounds": args.rounds,
              "cpu": cpu, "torch": torch.__version__, "openvino": openvino.__version__,
              "date": when.strftime("%Y-%m-%dT%H:%M:%SZ"), "command": "python " + " ".join(sys.argv),
              "note": args.note, "fastseg_ms": fs, "openvino_ms": ov, "fastseg_runs": fs_runs, "openvino_runs": ov_runs}

    def cell(d, k):
        return f"{d[k]:.2f}" if d.get(k) else "–"

    lines = [f"# fastseg fused vs OpenVINO on fastseg's ONNX, by part: SegFormer-{args.variant} "
             f"{args.size}² b1 fp32, {args.threads} thread(s)", "",
             f"- CPU: {cpu_info.short(cpu)}",
             f"- torch {torch.__version__}, OpenVINO {openvino.__version__}, date {record['date']}",
             f"- command: `{record['command']}`",
             f"- median of {args.rounds} interleaved forwards, wall ms per part (OpenVINO: PERF_COUNT real time)",
             *([f"- note: {args.note}"] if args.note else []), "",
             "| part | fastseg ms | OpenVINO ms | fastseg / OpenVINO |", "|---|---:|---:|---:|"]
    for k in ROWS + ("TOTAL",):
        if not fs.get(k) and not ov.get(k):
            continue
        ratio = f"{fs[k] / ov[k]:.2f}" if fs.get(k) and ov.get(k) else "–"
        lines.append(f"| {k} | {cell(fs, k)} | {cell(ov, k)} | {ratio} |")
    lines += ["", "fastseg's Mix-FFN is one op (fc1, dwconv + GELU and fc2 in row tiles): compare its total row. "
              "fastseg's patch embedding includes its LayerNorm; OpenVINO's is in the LayerNorm row."]
    slug = file_slug(f"{cpu['model_name']} {cpu['microarch'] or ''}")
    stem = Path(args.out) / f"{when.strftime('%Y%m%dT%H%M%S')}_openvino_op_compare_{slug}_{args.variant}_{args.threads}t"
    save_result(stem, record, lines)
    print("\n".join(lines))
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
