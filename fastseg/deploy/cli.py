"""``fastseg export``: the command line of the ONNX / pt2 / AOTInductor writers."""
from __future__ import annotations

from fastseg.deploy.common import ExportError, _check_output, _parse_size
from fastseg.deploy.onnx import ATTENTIONS, DEFAULT_OPSET, EXPORTERS, MIN_OPSET, check_opset, export_onnx
from fastseg.deploy.pt2 import export_program
from fastseg.deploy.source import load_source

FORMATS = ("onnx", "pt2", "aoti")


def add_arguments(p) -> None:
    p.add_argument("source", metavar="SOURCE", help="a checkpoint file, an HF model folder or a fastseg folder")
    p.add_argument("--out", required=True, help="the file to write (.onnx, or .pt2 for --format pt2/aoti)")
    p.add_argument("--model", default=None, help="segformer[-bX] or setr[-naive|pup|mla]: skip detection")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx (default), pt2 (torch.export ExportedProgram) or aoti (AOTInductor package)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (>= {MIN_OPSET}; default {DEFAULT_OPSET})")
    p.add_argument("--static", metavar="HxW", default=None,
                   help="a fixed-shape graph for this size (TensorRT builds engines faster from one)")
    p.add_argument("--batch", type=int, default=1, help="the batch size of a --static graph, and of any pt2/aoti "
                                                        "program (default 1)")
    p.add_argument("--size", metavar="HxW", default="512x512", help="trace size of a dynamic export (default 512x512)")
    p.add_argument("--fp16", action="store_true", help="fp16 compute (LayerNorm, softmax, decoder sums in fp32)")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto", help="torch.onnx exporter (default auto)")
    p.add_argument("--attention", choices=ATTENTIONS, default="matmul",
                   help="matmul: MatMul/Softmax/MatMul (default); op: opset 23's Attention node (--opset 23)")
    p.add_argument("--check", action="store_true", help="run the file (ONNX Runtime for onnx) against PyTorch and "
                                                        "print the error")


def main(args) -> int:
    import sys

    def say(text):
        print(text, flush=True)

    try:
        size = _parse_size(args.static if args.static else args.size)
        if args.batch < 1:
            raise ExportError(f"--batch must be >= 1, got {args.batch}")
        if args.static is None and args.batch != 1 and args.format == "onnx":
            raise ExportError("--batch fixes the batch of a --static graph; a dynamic ONNX graph takes any batch")
        _check_output(args.out)
        if args.format == "onnx":
            check_opset(args.opset)  # before loading and tracing, which take a while
        say(f"loading {args.source}")
        model = load_source(args.source, args.model).eval()
        dynamic = args.static is None
        if args.format == "onnx":
            report = export_onnx(model, args.out, dynamic=dynamic, example_size=size, opset=args.opset,
                                 fp16=args.fp16, batch=args.batch, check=args.check, exporter=args.exporter,
                                 attention=args.attention, progress=say)
        else:
            report = export_program(model, args.out, dynamic=dynamic, example_size=size, batch=args.batch,
                                    fp16=args.fp16, aoti=args.format == "aoti", check=args.check, progress=say)
    except (ExportError, FileNotFoundError) as e:
        print(f"fastseg export: error: {e}", file=sys.stderr)
        return 2
    say(report.summary())
    return 0


# --- fastseg deploy --------------------------------------------------------------------------------

def add_deploy_arguments(p) -> None:
    from fastseg.deploy.runtimes import PRECISIONS, RUNTIMES

    p.add_argument("source", metavar="SOURCE", help="a checkpoint file, an HF model folder or a fastseg folder")
    p.add_argument("--out", required=True, help="the engine folder to write (fastseg.load_engine / --engine reads it)")
    p.add_argument("--runtime", choices=("auto",) + RUNTIMES, default="auto",
                   help="auto (default: the fastest installed runtime here, measured once), torch, openvino, onnxruntime")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 (default), bf16, fp16, int8")
    p.add_argument("--calibrate", metavar="DIR", default=None,
                   help="a folder of images for int8 calibration (at most --calibration-images of them)")
    p.add_argument("--calibration-images", type=int, default=None, help="calibration images to use (default 300)")
    p.add_argument("--input-size", metavar="HxW", default=None,
                   help="the input size the engine will mostly see (auto timing; calibration images are resized to it)")
    p.add_argument("--model", default=None, help="segformer[-bX] or setr[-naive|pup|mla]: skip detection")
    p.add_argument("--cache-dir", default=None, help="engine cache (default ~/.cache/fastseg/engines)")
    p.add_argument("--no-int8-timing", action="store_true",
                   help="with --precision int8: skip timing the int8 engine against the same runtime at fp32 "
                        "(a few forwards at --input-size; the report says whether int8 pays off on this CPU)")


def deploy_main(args) -> int:
    import sys
    import warnings

    from fastseg.deploy.engine import deploy
    from fastseg.deploy.payoff import Int8SlowerWarning

    try:
        if args.precision == "int8" and not args.calibrate:
            raise ExportError("--precision int8 needs --calibrate DIR (a folder of images like the ones to segment)")
        print(f"loading {args.source}", flush=True)
        model = load_source(args.source, args.model)
        with warnings.catch_warnings():  # the report printed below carries the int8-vs-fp32 warning line
            warnings.simplefilter("ignore", Int8SlowerWarning)
            engine = deploy(model, args.runtime, args.precision, calibration=args.calibrate,
                            input_size=args.input_size, cache_dir=args.cache_dir,
                            max_calibration_images=args.calibration_images, int8_timing=not args.no_int8_timing,
                            progress=lambda t: print(t, flush=True))
        engine.save(args.out)
    except (ExportError, FileNotFoundError) as e:
        print(f"fastseg deploy: error: {e}", file=sys.stderr)
        return 2
    print(engine.report.summary())
    print(f"wrote engine folder {args.out}")
    return 0
