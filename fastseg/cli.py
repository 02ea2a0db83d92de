"""Command line: ``fastseg demo`` (fused vs reference on a generated image) and ``fastseg info``."""
from __future__ import annotations

import argparse
import sys
import time

import torch


def generated_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A deterministic synthetic scene (smooth gradients, discs and stripes), normalised like ImageNet input."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, height)[:, None]
    xs = torch.linspace(-1, 1, width)[None, :]
    img = torch.stack([0.5 + 0.5 * xs.expand(height, width), 0.5 + 0.5 * ys.expand(height, width),
                       0.5 + 0.25 * torch.sin(8 * xs + 4 * ys)])
    for _ in range(6):
        cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([2.0, 2.0, 0.5]) - torch.tensor([1.0, 1.0, -0.1]))
        colour = torch.rand(3, 1, 1, generator=g)
        mask = ((ys - cy) ** 2 + (xs - cx) ** 2) < r ** 2
        img = torch.where(mask, colour, img)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((img - mean) / std)[None]


def _time(fn, x, repeats: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """Median wall-clock milliseconds of ``fn(x)`` after one warm-up call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    out = fn(x)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(x)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return out, sorted(times)[len(times) // 2]


def demo(args) -> int:
    from fastseg import SegFormer

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.checkpoint:
        model = SegFormer.from_pretrained(args.checkpoint, num_classes=args.num_classes)
        print(model.load_report)
    else:
        torch.manual_seed(args.seed)
        model = SegFormer(args.variant, num_classes=args.num_classes or 150)
    model = model.to(device).eval()
    x = generated_image(args.height, args.width, args.seed).to(device)
    print(f"SegFormer-{model.variant or 'custom'}, {model.num_classes} classes, input {tuple(x.shape)} on {device}")

    with torch.inference_mode():
        ref, ref_ms = _time(model.set_fused(False), x, args.repeats, device)
        out, fused_ms = _time(model.set_fused(True), x, args.repeats, device)
    print("\nbackend per op (fused path):")
    for op, choice in model.backends().items():
        print(f"  {op:24s} {choice.describe()}")
    err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    print(f"\n{'path':10s} {'median ms':>10s}")
    print(f"{'reference':10s} {ref_ms:10.2f}")
    print(f"{'fused':10s} {fused_ms:10.2f}   speedup {ref_ms / fused_ms:.2f}x")
    print(f"\nlogits {tuple(out.shape)}: max relative error {err:.2e}, argmax agreement {agree * 100:.3f}%")
    classes, counts = out.argmax(1).unique(return_counts=True)
    top = sorted(zip(counts.tolist(), classes.tolist()), reverse=True)[:5]
    print("most frequent predicted classes:", ", ".join(f"{c} ({n} px)" for n, c in top))
    ok = err < 1e-3 and agree >= 0.999 and bool(torch.isfinite(out).all())
    print("parity:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def info(args) -> int:
    import fastseg
    from fastseg.ops import dispatch

    print(f"fastseg {fastseg.__version__}, torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    cuda = torch.cuda.is_available()
    print(f"CUDA: {torch.cuda.get_device_name(0) if cuda else 'not available'}")
    print(f"forced backend (FASTSEG_BACKEND): {dispatch.forced_backend() or 'none'}")
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
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a SegFormer fused vs reference on a generated image")
    p.add_argument("--variant", default="b0", choices=["b0", "b1", "b2", "b3", "b4", "b5"])
    p.add_argument("--checkpoint", help="load weights from any format SegFormer.from_pretrained reads")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    p = sub.add_parser("info", help="what is installed and which backend each op uses")
    p.set_defaults(func=info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
