"""Command line: ``fastseg bench | info | convert | train | eval | predict | export | deploy``.

Every subcommand reports an expected failure (bad input, missing or unreadable file, full disk…)
as one line on stderr and exits 1 (see :mod:`fastseg.errors`); ``FASTSEG_DEBUG=1`` adds the traceback.
"""
from __future__ import annotations

import argparse
import sys

import torch


def info(args) -> int:
    import fastseg
    from fastseg.ops import dispatch, packed_linear

    print(f"fastseg {fastseg.__version__}, torch {torch.__version__}")
    from importlib.metadata import PackageNotFoundError, version

    try:  # the version only: importing triton here would fix its mode before fastseg.kernels does
        print(f"triton {version('triton')}")
    except PackageNotFoundError:
        print("triton: not installed")
    cuda = torch.cuda.is_available()
    print(f"CUDA: {torch.cuda.get_device_name(0) if cuda else 'not available'}")
    print(f"forced backend (FASTSEG_BACKEND): {dispatch.forced_backend() or 'none'}")
    from fastseg import cpu_allocator

    print(f"CPU malloc ({cpu_allocator.ENV}): {cpu_allocator.keep_freed_memory()}")
    from fastseg import cpu_info  # which CPU, its ISA flags, and the ISA ATen and oneDNN dispatch to

    for line in cpu_info.summary_lines():
        print(line)
    tuning = sys.modules["fastseg.tune"]  # fastseg.tune is the function; this is its module
    tuning.install()  # the disk cache's tuned choices show in the lines below
    print(f"tuned dispatch: {len(tuning.summary_lines())} tuned (op, shape class) for these versions in "
          f"{tuning.cache_dir() / tuning.CACHE_FILE}; FASTSEG_AUTOTUNE={'1' if tuning.autotune_env() else '0'}")
    for line in tuning.summary_lines():
        print(f"  {line}")
    for device in ["cpu"] + (["cuda"] if cuda else []):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            print(f"\n{device} {str(dtype).replace('torch.', '')}:")
            for op in dispatch.FUSED_OPS:
                facts = dict(device=torch.device(device), dtype=dtype)
                if op == "sr_attention":
                    facts["head_dim"] = 32
                try:
                    text = dispatch.choose(op, **facts).describe()
                except dispatch.BackendUnavailable as e:
                    text = f"ERROR: {e}"
                print(f"  {op:24s} {text}")
            print(f"  {'linear':24s} {packed_linear.choice(torch.device(device), dtype).describe()}")
    return 0


def convert(args) -> int:
    """``fastseg convert SRC OUT --to FORMAT``: any checkpoint fastseg reads, rewritten in another layout."""
    from fastseg import SETR, SegFormer, checkpoints

    # Errors (FileExistsError, CheckpointError, a full disk…) are reported by main, in one line.
    saved = checkpoints.convert(args.src, args.out, args.to, model_classes={"segformer": SegFormer, "setr": SETR},
                                overwrite=args.overwrite, allow_eps_change=args.allow_eps_change)
    print(f"wrote {saved.path} ({saved.format})")
    for note in saved.notes:
        print(f"  note: {note}")
    return 0


def main(argv=None) -> int:
    from fastseg import bench

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fastseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="time eager vs fused (vs torch.compile) SegFormer, check parity, "
                                     "write JSON + table + PNG")
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)
    p = sub.add_parser("info", help="what is installed and which backend each op uses")
    p.set_defaults(func=info)
    p = sub.add_parser("convert", help="rewrite a SegFormer/SETR checkpoint in another library's layout")
    p.add_argument("src", help="any checkpoint from_pretrained reads (file, directory, cached HF repo id)")
    p.add_argument("out", help="output file or directory (hf and fastseg: a directory)")
    p.add_argument("--to", required=True, choices=["hf", "nvlabs", "mmseg", "smp", "fastseg", "timm"],
                   help="target layout (SETR: mmseg, timm, fastseg)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--allow-eps-change", action="store_true",
                   help="convert even where the target library computes with other LayerNorm eps")
    p.set_defaults(func=convert)
    from fastseg import evaluate, predict, train

    p = sub.add_parser("train", help="train SegFormer/SETR (--fused for the kernels; torchrun for DDP)")
    train.add_arguments(p)
    p.set_defaults(func=train.main)
    p = sub.add_parser("eval", help="mIoU / aAcc / mAcc of a checkpoint (whole, sliding window, multi-scale)")
    evaluate.add_eval_arguments(p)
    p.set_defaults(func=evaluate.eval_main)
    p = sub.add_parser("predict", help="colourised masks (and overlays) for images")
    predict.add_predict_arguments(p)
    p.set_defaults(func=predict.predict_main)
    from fastseg.deploy import cli as deploy_cli

    p = sub.add_parser("export", help="ONNX (ONNX Runtime / OpenVINO / TensorRT) or torch.export file of the fast graph")
    deploy_cli.add_arguments(p)
    p.set_defaults(func=deploy_cli.main)
    p = sub.add_parser("deploy", help="an engine folder on the fastest runtime here (torch / OpenVINO / ONNX Runtime) "
                                      "at fp32 / bf16 / fp16 / calibrated int8, with its report")
    deploy_cli.add_deploy_arguments(p)
    p.set_defaults(func=deploy_cli.deploy_main)
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    from fastseg.errors import run_command

    return run_command(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
