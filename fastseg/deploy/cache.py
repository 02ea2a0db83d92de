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

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
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


@contextlib.contextmanager
def atomic_folder(dest: Path):
    """Yield a temporary sibling folder; on success it replaces ``dest`` (an old folder there is
    moved aside first and removed after), on any error it is removed. The caller writes the
    marker last inside it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _honour_umask(tmp)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "x")
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _honour_umask(folder: Path) -> None:
    # mkdtemp makes 0700 folders; give the entry the permissions a plain mkdir would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


# --- machine identity and the auto choice ----------------------------------------------------------

def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


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
