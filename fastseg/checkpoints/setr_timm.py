"""ImageNet ViT weights in timm's names (e.g. ``jx_vit_large_p16_384``), the SETR encoder's usual start.

Keys: ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``; ``norm`` / ``fc_norm`` and ``head`` (unused: SETR takes the raw block outputs) and
DeiT's ``dist_token`` / ``head_dist`` (dropped with its position entry). Encoder only: loading needs
``num_classes=`` and ``decoder=``. LayerNorm eps 1e-6 (timm's ViT default).

Writing (``--to timm``) gives the encoder only, loadable strictly into
``timm.create_model(…, num_classes=0, final_norm=False)``; a SETR without a patch-embedding bias gets a
zero one (timm's patch conv always has a bias; zero is the same computation).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ._common import Converted, Rules, has_key, refuse_existing, save_weights_file

NAME = "timm"
FAMILY = "setr"
TITLE = "timm ViT (ImageNet)"
OUTPUT = "encoder features only (no segmentation head)"

_TO = Rules([
    (r"patch_embed\.proj\.(weight|bias)", r"encoder.patch_embed.proj.\1"),
    (r"cls_token", "encoder.cls_token"),
    (r"pos_embed", "encoder.pos_embed"),
    (r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"encoder.blocks.\1.\2.\3"),
], drop=[r"norm\.(weight|bias)", r"fc_norm\.(weight|bias)", r"head\.(weight|bias)", r"head_dist\.(weight|bias)",
         r"pre_logits\.fc\.(weight|bias)", r"dist_token"])
_FROM = Rules([
    (r"encoder\.patch_embed\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.cls_token", "cls_token"),
    (r"encoder\.pos_embed", "pos_embed"),
    (r"encoder\.blocks\.(\d+)\.(.+)", r"blocks.\1.\2"),
], drop=[r"(decoder|neck|aux_heads)\..+"])


def detect(keys, src) -> bool:
    return has_key(keys, r"patch_embed\.proj\.weight") and has_key(keys, r"blocks\.\d+\.attn\.qkv\.weight")


def to_fastseg(state: dict, src) -> Converted:
    origin = {}
    sd, unexpected, ignored = _TO.apply(state, origin)
    if "dist_token" in state and "encoder.pos_embed" in sd:
        # DeiT-distilled: [cls, dist, grid…] position entries; SETR has no distillation token.
        pos = sd["encoder.pos_embed"]
        sd["encoder.pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    return Converted(sd, unexpected, ignored, origin=origin)


def from_fastseg(state: dict, config) -> tuple[dict, list[str]]:
    out, unexpected, dropped = _FROM.apply(state)
    assert not unexpected, unexpected
    notes = []
    if "patch_embed.proj.bias" not in out:
        w = out["patch_embed.proj.weight"]
        out["patch_embed.proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
        notes.append("the model has no patch-embedding bias: written as zeros (timm's patch conv has one)")
    if dropped:
        notes.append(f"timm's ViT holds the encoder only: the {config.decoder} neck/decoder/auxiliary heads "
                     f"({len(dropped)} tensors) are not written")
    notes.append("load it with timm.create_model(..., num_classes=0, final_norm=False): SETR has no final norm")
    return out, notes


LOSSY = True  # encoder only: the heads stay behind (warned)


def write(path: Path, tensors: dict, config, overwrite: bool) -> Path:
    path = Path(path)
    refuse_existing(path, overwrite)
    save_weights_file(tensors, path)
    return path
