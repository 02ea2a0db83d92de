"""Reading and writing weight files safely.

Nothing here ever unpickles arbitrary objects: ``.pth``/``.pt``/``.bin`` files go through
``torch.load(weights_only=True)`` (tensors, containers and plain Python values only, plus the
numpy array/scalar reconstructors that mmcv checkpoints put in their ``meta``); ``.safetensors``
holds no code at all. Writes are atomic: a temporary file in the same folder, then a rename,
so a crash never leaves a half-written file where a good one was.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model, with the reason."""


def _numpy_safe_globals() -> list:
    """numpy's array/scalar reconstructors: they rebuild plain data and run no user code."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    core = getattr(np, "_core", None) or np.core
    found = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(core.multiarray, name, None)
        if fn is not None:
            found.append(fn)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return found


def load_torch_file(path: Path) -> object:
    """``torch.load`` with ``weights_only=True``; clear errors for unsafe or damaged files."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" in str(e).lower() or "unsupported global" in str(e).lower():
            raise CheckpointError(
                f"refused to load {path}: it contains pickled objects that are not plain weights "
                f"({first}). fastseg never unpickles arbitrary objects; re-save the weights with "
                "torch.save(model.state_dict(), ...) or as .safetensors"
            ) from None
        raise CheckpointError(f"could not read {path}: the file is corrupt or truncated ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(
            f"could not read {path}: the file is corrupt or truncated ({type(e).__name__}: {e})"
        ) from None


def load_safetensors_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the string metadata of a ``.safetensors`` file."""
    from safetensors import SafetensorError, safe_open

    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        return tensors, metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(f"could not read {path}: not a valid safetensors file ({e})") from None


def load_weights_file(path) -> tuple[object, dict[str, str]]:
    """Load one weight file by its suffix: (contents, safetensors metadata or {})."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, expected a weight file")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return load_safetensors_file(path)
    if suffix in TORCH_SUFFIXES:
        return load_torch_file(path), {}
    raise CheckpointError(
        f"unsupported checkpoint file type {suffix or '(no suffix)'!r} for {path}; "
        f"expected one of {[*TORCH_SUFFIXES, SAFETENSORS_SUFFIX]}"
    )


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"could not parse {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb"):
    """Yield a temporary file next to ``path``; rename it over ``path`` only if writing succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(path) as f:
        f.write(data)


def save_json_atomic(data: dict, path: Path) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
