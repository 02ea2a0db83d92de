"""HuggingFace Hub repo ids (``nvidia/segformer-b0-finetuned-ade-512-512``) from the local cache.

The cache is read through ``huggingface_hub`` with ``local_files_only=True``: fastseg never
downloads on its own. A repo that is not cached gives an error naming the cache folder and the
command that fills it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` with no further slashes and no weight-file suffix (those are local paths)."""
    return bool(_REPO_ID.fullmatch(text)) and not text.lower().endswith(_WEIGHT_SUFFIXES) \
        and not text.startswith((".", "~"))


def cache_dir() -> Path:
    """Where huggingface_hub keeps its cache, read from the environment now (HF_HUB_CACHE, then
    HF_HOME/hub, then XDG_CACHE_HOME/huggingface/hub, then ~/.cache/huggingface/hub), as the library does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def resolve(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of a cached repo; FileNotFoundError (with the download command) otherwise."""
    folder = cache_dir()
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with safetensors users' stacks
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path, and reading it as a HuggingFace repo id needs huggingface_hub "
            "(pip install huggingface_hub)") from None
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=folder, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError and friends; no network is ever tried
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and is not in the HuggingFace cache at {folder} "
            f"({type(e).__name__}). Download it first:\n    hf download {repo_id}\n"
            f"(or: huggingface-cli download {repo_id}; set HF_HUB_CACHE / HF_HOME if your cache lives elsewhere)"
        ) from None
    return Path(path)
