"""The deployed-engine row of ``fastseg bench``: ``--engine DIR`` or ``--runtime R --precision P``.

The engine is timed beside the fused torch model on the same input, in the same interleaved
rounds, and judged against the fp32 gold by its own precision (:func:`fastseg.parity.judge_engine`).
``--engine DIR`` must come with the ``--checkpoint`` it was deployed from (checked by the weights'
hash): the fused rows and the gold run those weights. ``--runtime/--precision`` deploy the bench
model itself with :func:`fastseg.deploy` (default engine cache); int8 calibrates on
``--calibrate DIR`` or, without it, on generated images at the bench size.
"""
from __future__ import annotations

import copy

import torch

CALIBRATION_IMAGES = 8  # generated calibration images when no --calibrate folder is given


def add_arguments(p) -> None:
    from fastseg.deploy.runtimes import PRECISIONS, RUNTIMES

    g = p.add_argument_group("a deployed engine row (fastseg deploy) beside the torch modes")
    g.add_argument("--engine", metavar="DIR", default=None,
                   help="time this engine folder too (needs the --checkpoint it was deployed from)")
    g.add_argument("--runtime", choices=("auto",) + RUNTIMES, default=None,
                   help="deploy the bench model on this runtime and time the engine too (engine cache as fastseg deploy)")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the engine's precision (default fp32); given without --runtime, the runtime is auto")
    g.add_argument("--calibrate", metavar="DIR", default=None,
                   help="calibration images for --precision int8 (default: generated images at the bench size)")


def requested(args) -> bool:
    return any(getattr(args, k, None) is not None for k in ("engine", "runtime", "precision"))


def check(args) -> None:
    """One-line errors for options that cannot go together (before anything is built)."""
    if not requested(args):
        if getattr(args, "calibrate", None):
            raise ValueError("--calibrate is for an int8 engine row (--runtime R --precision int8)")
        return
    if args.backward:
        raise ValueError("an engine row times inference: drop --backward, or drop --engine/--runtime/--precision")
    if args.engine is not None:
        if args.runtime is not None or args.precision is not None:
            raise ValueError("--runtime/--precision deploy the bench model; an --engine folder already has both")
        if args.checkpoint is None:
            raise ValueError(f"--engine {args.engine} needs --checkpoint: the weights it was deployed from "
                             "(the fused rows and the fp32 gold run them)")
        if args.calibrate:
            raise ValueError("--calibrate is for --precision int8 with --runtime; an --engine folder is already built")
        from fastseg.deploy.engine import _read_meta

        _read_meta(args.engine)  # not an engine folder: say so before the models are built
    elif args.calibrate and args.precision != "int8":
        raise ValueError("--calibrate is for --precision int8")


def load(args, model: torch.nn.Module, progress=None):
    """(engine, info) for the row: the ``--engine`` folder, after checking it holds ``model``'s
    weights, or ``model`` deployed at ``--runtime/--precision``."""
    import fastseg
    from fastseg.deploy import cache

    if args.engine is not None:
        engine = fastseg.load_engine(args.engine)
        if engine.meta.get("weights_sha256") != cache.weights_hash(model):
            raise ValueError(f"engine {args.engine} was deployed from other weights than --checkpoint {args.checkpoint} "
                             f"({engine.meta.get('model')}); give the checkpoint it was built from")
        source = f"--engine {args.engine}"
    else:
        precision = args.precision or "fp32"
        calibration, goal = None, None
        if precision == "int8":
            calibration = args.calibrate or generated_calibration(args)
            # Random-init weights give nearly tied logits: a measured search would keep groups in
            # float for agreement that means nothing, so every candidate group goes int8.
            goal = None if args.checkpoint else 0.0
        engine = fastseg.deploy(model, args.runtime or "auto", precision, calibration=calibration,
                                input_size=(args.height, args.width), int8_goal=goal, int8_timing=False,
                                progress=progress)
        source = f"fastseg.deploy(runtime={args.runtime or 'auto'!r}, precision={precision!r})"
    info = {"row": row_name(engine), "runtime": engine.runtime, "runtime_version": engine.report.get("runtime_version"),
            "precision": engine.precision, "source": source, "folder": str(engine.folder),
            "trained_weights": args.checkpoint is not None, "report": dict(engine.report)}
    if engine.precision == "int8" and args.engine is None:
        info["calibration"] = args.calibrate or f"{CALIBRATION_IMAGES} generated images"
    return engine, info


def row_name(engine) -> str:
    return f"engine {engine.runtime} {engine.precision}"


def generated_calibration(args) -> list[torch.Tensor]:
    from fastseg.bench import generated_image

    return [generated_image(args.height, args.width, args.seed + 1 + i) for i in range(CALIBRATION_IMAGES)]


def eager_error(fp32_model, x32: torch.Tensor, gold: torch.Tensor, precision: str) -> dict | None:
    """Eager's own error in ``precision`` (bf16 / fp16) against the fp32 gold: the bound of the
    low-precision rule for an engine of that precision (None for fp32 / int8)."""
    from fastseg import parity
    from fastseg.bench import DTYPES

    if precision not in ("bf16", "fp16"):
        return None
    eager = copy.deepcopy(fp32_model).to(DTYPES[precision])
    with torch.inference_mode():
        out = eager(x32.to(DTYPES[precision])).float()
    return parity.errors(out, gold)


def rule(info: dict) -> str:
    """The parity rule the engine row is judged by, in words."""
    from fastseg import parity

    p = info["precision"]
    if p == "fp32":
        return f"{info['row']}: argmax agreement with eager fp32 >= {100 * parity.ARGMAX_AGREEMENT_MIN:.1f}%"
    if p in ("bf16", "fp16"):
        return (f"{info['row']}: RMS error vs the fp32 gold <= {parity.LOW_PRECISION_FACTOR:g}x eager {p}'s own")
    from fastseg.deploy.quantize import GOAL

    judged = "" if info["trained_weights"] else " (reported, not judged, on random-init weights)"
    return f"{info['row']}: pixel agreement of its labels with the fp32 gold's >= {100 * GOAL:.1f}%{judged}"
