"""What the ONNX and torch.export writers share: the error type, the report, size parsing, atomic
output files, optional imports, example inputs and the relative-error measure."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Callable

import torch

MIN_SIZE = 32


class ExportError(ValueError):
    """An export that cannot be done as asked (bad option, unwritable output, missing package)."""


@dataclasses.dataclass
class ExportReport:
    """What an export wrote: the file, its format and shapes, the ops it uses, its size, and
    (when checked) the max relative error against the PyTorch model per runtime and size."""

    path: str
    format: str
    model: str
    opset: int | None
    dynamic: bool
    input_shape: tuple
    output_shape: tuple
    fp16: bool
    exporter: str | None = None
    ops: dict = dataclasses.field(default_factory=dict)
    size_bytes: int = 0
    seconds: float = 0.0
    parity: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        dims = "x".join(str(d) for d in self.input_shape)
        lines = [f"wrote {self.path} ({self.format}, {self.size_bytes / 2**20:.1f} MiB, {self.seconds:.1f} s): "
                 f"{self.model}, images {dims} -> logits {'x'.join(str(d) for d in self.output_shape)}"
                 f"{', fp16 compute' if self.fp16 else ''}{f', opset {self.opset}' if self.opset else ''}"]
        if self.ops:
            lines.append("ops: " + ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items(), key=lambda kv: -kv[1])))
        for where, err in self.parity.items():
            lines.append(f"parity {where}: max relative error {err:.2e}")
        lines += self.notes
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _parse_size(size) -> tuple[int, int]:
    if isinstance(size, str):
        parts = size.lower().replace("×", "x").split("x")
        if len(parts) == 1:
            parts = parts * 2
        try:
            size = tuple(int(p) for p in parts)
        except ValueError:
            raise ExportError(f"size must be HxW (e.g. 512x512), got {size!r}") from None
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ExportError(f"size must be (H, W), got {size!r}")
    if min(size) < MIN_SIZE:
        raise ExportError(f"image size {size[0]}x{size[1]} is too small: H and W must be >= {MIN_SIZE}")
    return size


def _check_output(path) -> Path:
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ExportError(f"output {path} is a folder; give a file name, e.g. {path / 'model.onnx'}")
    if not folder.is_dir():
        raise ExportError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"output folder {folder} is not writable")
    return path


def _atomic_path(path: Path):
    """A temporary path beside ``path``, renamed onto it (fsynced, with the umask's mode) if the block
    succeeds and removed otherwise (``fastseg.io.atomic_path``): no half-written export."""
    from fastseg.io import atomic_path

    return atomic_path(path)


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ExportError(f"{module} is needed for this export: pip install 'fastseg[export]' ({e})") from None


@contextlib.contextmanager
def _size_oblivious():
    """Size-oblivious reasoning where this torch has it: fewer 0/1 guards, wider dynamic ranges."""
    try:
        from torch.fx.experimental import _config
    except ImportError:
        _config = None
    if _config is None or not hasattr(_config, "backed_size_oblivious"):
        yield
        return
    with _config.patch(backed_size_oblivious=True):
        yield


def _example(model, batch: int, size, dynamic: bool) -> torch.Tensor:
    device = next(model.parameters()).device
    # torch.export specialises dims that are 1 in the example, so a dynamic export traces batch 2.
    b = max(batch, 2) if dynamic else batch
    return torch.randn(b, model.config.in_channels, *size, device=device)


def _progress(progress: Callable | None, text: str) -> None:
    if progress is not None:
        progress(text)


def _odd_size(size) -> tuple[int, int]:
    return (max(MIN_SIZE + 1, size[0] * 3 // 4) | 1, max(MIN_SIZE + 1, size[1] * 5 // 8) | 1)


def _describe(model) -> str:
    from fastseg.deploy.graph import model_kind

    kind = model_kind(model)
    cfg = model.config
    if kind == "segformer":
        return f"SegFormer-{cfg.variant or 'custom'} ({cfg.decoder} head, {cfg.num_classes} classes)"
    return f"SETR-{cfg.decoder} ({cfg.encoder or 'custom ViT'}, {cfg.num_classes} classes)"


def relative_error(got, want) -> float:
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != PyTorch's {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
