"""fastseg's own saves (both models): ``model.safetensors`` with fastseg's parameter names and
``fastseg_config.json`` (also embedded in the safetensors metadata, so the file alone loads).

SegFormer keys ``encoder.stages.{i}.…``, ``decoder.…``; SETR keys ``encoder.patch_embed.proj``,
``encoder.blocks.{i}.…``, ``decoder.…``, ``neck.…``, ``aux_heads.…``. The saved config carries the
LayerNorm eps of the source the weights came from; a bare fastseg state dict gets the NVlabs eps.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import _mit
from ._common import (FASTSEG_CONFIG, WEIGHTS_FILE, Converted, has_key, model_directory, refuse_existing,
                      save_json_atomic, save_safetensors_atomic)

NAME = "fastseg"
FAMILY = None  # both; see family()
TITLE = "fastseg"
EPS = _mit.EPS_NVLABS  # a bare SegFormer state dict: the official eps, fastseg's default
OUTPUT = "as the model (SegFormer: logits at 1/4; SETR: PUP full resolution, Naive/MLA 1/4)"


def family(keys, src) -> str | None:
    if src.fastseg_config is not None:
        return "setr" if src.architecture == "SETR" else "segformer"
    if has_key(keys, r"encoder\.stages\.\d\.patch_embed\.proj\.weight"):
        return "segformer"
    if has_key(keys, r"encoder\.patch_embed\.proj\.weight") and has_key(keys, r"encoder\.blocks\.\d+\.attn\.qkv\.weight"):
        return "setr"
    return None


def detect(keys, src) -> bool:
    return family(keys, src) is not None


def to_fastseg(state: dict, src) -> Converted:
    return Converted(dict(state), hints={"eps": EPS, "config": src.fastseg_config})


def from_fastseg(state: dict, config) -> tuple[dict, list[str]]:
    return dict(state), []


def write(path: Path, tensors: dict, config, overwrite: bool, architecture: str = "SegFormer") -> Path:
    """A directory (model.safetensors + fastseg_config.json), or a single ``.safetensors`` file."""
    path = Path(path)
    refuse_existing(path, overwrite)
    cfg = config.to_dict()
    metadata = {"fastseg_config": json.dumps(cfg), "architecture": architecture}
    if path.suffix.lower() == ".safetensors":
        save_safetensors_atomic(tensors, path, metadata)
        return path
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    with model_directory(path) as tmp:
        save_safetensors_atomic(tensors, tmp / WEIGHTS_FILE, metadata)
        save_json_atomic({"format": "fastseg", "architecture": architecture, "config": cfg}, tmp / FASTSEG_CONFIG)
    return path
