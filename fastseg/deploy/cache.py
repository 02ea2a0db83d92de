"""The engine cache: compiled artifacts on disk, keyed by what they were built from.

An entry is an engine folder (see :mod:`fastseg.deploy.engine`) under ``cache_dir()``, named by a
digest of the weights' hash, the runtime, its version, the precision and the build options
(calibration digest for INT8). It is built in a temporary sibling folder and renamed into place;
``engine.json`` is written last inside it, so a build killed at any point leaves either nothing
or a folder without ``engine.json``, which no later ``deploy`` trusts (it is rebuilt).

The ``runtime="auto"`` choices live in ``auto.json`` beside the entries, keyed by the machine
(CPU model and bf16/AVX-512 flags, or GPU name), the versions, the precision and the shape class.
(A minimal CPU key is built here; fastseg.cpu_info, when it lands, is the place for CPU identity.)
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

MARKER = "engine.json"  # written last: its presence marks a complete entry
AUTO_FILE = "auto.json"
AUTO_SCHEMA = "fastseg-deploy-auto/1"


def cache_dir(override=None) -> Path:
    """``override``, else ``$FASTSEG_CACHE_DIR/engines``, else ``~/.cache/fastseg/engines``."""
    if override is not None:
        return Path(override)
    root = os.environ.get("FASTSEG_CACHE_DIR") or Path.home() / ".cache" / "fastseg"
    return Path(root) / "engines"


def weights_hash(model) -> str:
    """sha256 over the model's class, config and every state-dict tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    h.update(repr(getattr(model, "config", None)).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def entry_path(root: Path, runtime: str, precision: str, key: str) -> Path:
    return Path(root) / f"{runtime}-{precision}-{key[:20]}"


def is_complete(folder: Path, key: str) -> bool:
    """A finished entry for ``key``: its marker exists, parses and names the same key."""
    try:
        meta = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("cache_key") == key


def atomic_folder(dest: Path):
    """The engine entry written as a whole (``fastseg.io.atomic_directory``): a temporary sibling
    folder that replaces ``dest`` on success; nothing of an old entry is carried over. The caller
    writes the marker last inside it."""
    from fastseg.io import atomic_directory

    return atomic_directory(dest, replaces=("*",))


# --- machine identity and the auto choice ----------------------------------------------------------

def cpu_flags() -> set[str]:
    from fastseg.cpu_info import identity

    return set(identity().get("flags", ()))


def machine_key(device: torch.device) -> str:
    """CPU model + the ISA flags that change which runtime wins + threads; or the GPU's name."""
    from fastseg.timing import device_name

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni",
                                  "avx_vnni", "avx512_fp16"})
    return f"{device_name(device)} [{' '.join(flags)}]"


def load_auto(root: Path) -> dict:
    try:
        data = json.loads((Path(root) / AUTO_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("schema") != AUTO_SCHEMA or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def save_auto(root: Path, key: str, entry: dict) -> None:
    from fastseg.io import atomic_write

    entries = load_auto(root)
    entries[key] = entry
    with atomic_write(Path(root) / AUTO_FILE, "w") as f:
        json.dump({"schema": AUTO_SCHEMA, "entries": entries}, f, indent=1, sort_keys=True)
