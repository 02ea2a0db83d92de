"""mmsegmentation SETR checkpoints (``setr_{naive,pup,mla}_*.pth``) and mmseg-converted ViT backbones.

Keys: ``backbone.patch_embed.projection`` (weight; bias only when built with ``patch_bias=True`` —
mmseg 1.x's ``VisionTransformer`` defaults to no bias), ``backbone.cls_token``, ``backbone.pos_embed``,
``backbone.layers.{i}.{ln1, attn.attn.in_proj_weight/bias, attn.attn.out_proj, ln2, ffn.layers.0.0,
ffn.layers.1}``; heads ``decode_head.{norm, up_convs.{j}.0.{conv,bn}, conv_seg}`` (Naive/PUP),
``neck.{norm.{i}, mla.channel_proj.{i}, mla.feat_extract.{i}}`` + ``decode_head.up_convs.{i}.{0,1}`` (MLA),
``auxiliary_head.{k}.…``. Backbones: the same keys without ``backbone.``. LayerNorm eps 1e-6.
Logits: PUP at full resolution, Naive and MLA at 1/4 (mmseg then resizes them to the input).

``nn.MultiheadAttention``'s packed ``in_proj`` and fastseg's ``attn.qkv`` are the same [q; k; v] matrix.
"""
from __future__ import annotations

import re


from ._common import Converted, Rules, has_key, write_mmseg_pth

NAME = "mmseg"
FAMILY = "setr"
TITLE = "mmsegmentation SETR / ViT"
OUTPUT = "PUP: logits at full (padded) resolution; Naive and MLA: at 1/4, as mmseg's heads"

_B = r"(?:backbone\.)?"
_ENC = [
    (_B + r"patch_embed\.projection\.(weight|bias)", r"encoder.patch_embed.proj.\1"),
    (_B + r"cls_token", "encoder.cls_token"),
    (_B + r"pos_embed", "encoder.pos_embed"),
    (_B + r"layers\.(\d+)\.ln([12])\.(weight|bias)", r"encoder.blocks.\1.norm\2.\3"),
    (_B + r"layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)", r"encoder.blocks.\1.attn.qkv.\2"),
    (_B + r"layers\.(\d+)\.attn\.attn\.out_proj\.(weight|bias)", r"encoder.blocks.\1.attn.proj.\2"),
    (_B + r"layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", r"encoder.blocks.\1.mlp.fc1.\2"),
    (_B + r"layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)", r"encoder.blocks.\1.mlp.fc2.\2"),
]
# SETRUPHead: norm, up_convs.{j}.0 (ConvModule; .1 is a parameter-free Upsample), conv_seg.
# SETRMLAHead: up_convs.{i}.{0,1} (two ConvModules). FCNHead(num_convs=0): conv_seg.
_UP = [
    (r"decode_head\.norm\.(weight|bias)", r"decoder.norm.\1"),
    (r"decode_head\.up_convs\.(\d+)\.0\.(conv|bn)\.(.+)", r"decoder.convs.\1.\2.\3"),
    (r"decode_head\.conv_seg\.(weight|bias)", r"decoder.classifier.\1"),
    (r"auxiliary_head\.(\d+)\.norm\.(weight|bias)", r"aux_heads.\1.norm.\2"),
    (r"auxiliary_head\.(\d+)\.up_convs\.(\d+)\.0\.(conv|bn)\.(.+)", r"aux_heads.\1.convs.\2.\3.\4"),
    (r"auxiliary_head\.(\d+)\.conv_seg\.(weight|bias)", r"aux_heads.\1.classifier.\2"),
]
_MLA = [
    (r"neck\.norm\.(\d+)\.(weight|bias)", r"neck.norms.\1.\2"),
    (r"neck\.mla\.channel_proj\.(\d+)\.(conv|bn)\.(.+)", r"neck.proj.\1.\2.\3"),
    (r"neck\.mla\.feat_extract\.(\d+)\.(conv|bn)\.(.+)", r"neck.extract.\1.\2.\3"),
    (r"decode_head\.up_convs\.(\d+)\.([01])\.(conv|bn)\.(.+)", r"decoder.branches.\1.\2.\3.\4"),
    (r"decode_head\.conv_seg\.(weight|bias)", r"decoder.classifier.\1"),
    (r"auxiliary_head\.(\d+)\.conv_seg\.(weight|bias)", r"aux_heads.\1.classifier.\2"),
]
# Known and unused: mmseg ViT's final norm (SETR runs with final_norm=False) and ImageNet classifiers.
_DROP = [_B + r"(?:ln1|norm1)\.(weight|bias)", r"head\.(weight|bias)"]
_TO_UP, _TO_MLA = Rules(_ENC + _UP, _DROP), Rules(_ENC + _MLA, _DROP)


_FROM_ENC = [
    (r"encoder\.patch_embed\.proj\.(weight|bias)", r"backbone.patch_embed.projection.\1"),
    (r"encoder\.cls_token", "backbone.cls_token"),
    (r"encoder\.pos_embed", "backbone.pos_embed"),
    (r"encoder\.blocks\.(\d+)\.norm([12])\.(weight|bias)", r"backbone.layers.\1.ln\2.\3"),
    (r"encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"backbone.layers.\1.attn.attn.in_proj_\2"),
    (r"encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"backbone.layers.\1.attn.attn.out_proj.\2"),
    (r"encoder\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"backbone.layers.\1.ffn.layers.0.0.\2"),
    (r"encoder\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"backbone.layers.\1.ffn.layers.1.\2"),
]
_FROM_UP = Rules(_FROM_ENC + [
    (r"decoder\.norm\.(weight|bias)", r"decode_head.norm.\1"),
    (r"decoder\.convs\.(\d+)\.(conv|bn)\.(.+)", r"decode_head.up_convs.\1.0.\2.\3"),
    (r"decoder\.classifier\.(weight|bias)", r"decode_head.conv_seg.\1"),
    (r"aux_heads\.(\d+)\.norm\.(weight|bias)", r"auxiliary_head.\1.norm.\2"),
    (r"aux_heads\.(\d+)\.convs\.(\d+)\.(conv|bn)\.(.+)", r"auxiliary_head.\1.up_convs.\2.0.\3.\4"),
    (r"aux_heads\.(\d+)\.classifier\.(weight|bias)", r"auxiliary_head.\1.conv_seg.\2"),
])
_FROM_MLA = Rules(_FROM_ENC + [
    (r"neck\.norms\.(\d+)\.(weight|bias)", r"neck.norm.\1.\2"),
    (r"neck\.proj\.(\d+)\.(conv|bn)\.(.+)", r"neck.mla.channel_proj.\1.\2.\3"),
    (r"neck\.extract\.(\d+)\.(conv|bn)\.(.+)", r"neck.mla.feat_extract.\1.\2.\3"),
    (r"decoder\.branches\.(\d+)\.([01])\.(conv|bn)\.(.+)", r"decode_head.up_convs.\1.\2.\3.\4"),
    (r"decoder\.classifier\.(weight|bias)", r"decode_head.conv_seg.\1"),
    (r"aux_heads\.(\d+)\.classifier\.(weight|bias)", r"auxiliary_head.\1.conv_seg.\2"),
])


def detect(keys, src) -> bool:
    return has_key(keys, _B + r"patch_embed\.projection\.weight") and has_key(keys, _B + r"layers\.\d+\.attn\.attn\.in_proj_weight")


def head_kind(keys) -> str | None:
    """"mla", "up" (Naive / PUP) or None (no segmentation head)."""
    keys = list(keys)
    if any(re.match(r"(neck\.|decode_head\.up_convs\.\d+\.1\.conv\.)", k) for k in keys):
        return "mla"
    if any(k.startswith("decode_head.") for k in keys):
        return "up"
    return None


def to_fastseg(state: dict, src) -> Converted:
    rules = _TO_MLA if head_kind(state) == "mla" else _TO_UP
    origin = {}
    sd, unexpected, ignored = rules.apply(state, origin)
    return Converted(sd, unexpected, ignored, origin=origin)


def from_fastseg(state: dict, config) -> tuple[dict, list[str]]:
    out, unexpected, _ = (_FROM_MLA if config.decoder == "mla" else _FROM_UP).apply(state)
    assert not unexpected, unexpected
    notes = []
    if "backbone.patch_embed.projection.bias" not in out:
        notes.append("no patch-embedding bias: build mmseg's VisionTransformer with patch_bias=False")
    return out, notes


# mmseg-1.x checkpoints of either model are the same {meta, state_dict} .pth.
write = write_mmseg_pth
