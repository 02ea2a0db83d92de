"""mmsegmentation's ``MixVisionTransformer`` (v0.17+ and 1.x) with its ``SegformerHead``.

Keys: ``backbone.layers.{i}.0.{projection,norm}`` (patch embedding), ``backbone.layers.{i}.1.{j}.{norm1,
attn.attn.{in_proj_weight,in_proj_bias,out_proj}, attn.{sr,norm}, norm2, ffn.layers.{0,1,4}}`` (1×1 convs
for fc1/fc2, the depthwise conv at 1), ``backbone.layers.{i}.2`` (stage norm); head ``decode_head.convs.{i}.
{conv,bn}``, ``decode_head.fusion_conv.{conv,bn}``, ``decode_head.conv_seg``. mmseg-converted ImageNet
backbones have the same keys without ``backbone.``. LayerNorm eps 1e-6 everywhere. Logits at 1/4.
"""
from __future__ import annotations

import re

import torch


from . import _mit
from ._common import Converted, Rules, has_key, write_mmseg_pth

NAME = "mmseg"
FAMILY = "segformer"
TITLE = "mmsegmentation MixVisionTransformer (mmseg>=0.17 / 1.x)"
EPS = _mit.EPS_MMSEG
OUTPUT = "logits at 1/4 of the input, as mmseg's SegformerHead"

_L = r"(?:backbone\.)?layers\.(\d)\."
_S = r"encoder.stages.\1"
_TO = Rules([
    (_L + r"0\.projection\.(.+)", _S + r".patch_embed.proj.\2"),
    (_L + r"0\.norm\.(.+)", _S + r".patch_embed.norm.\2"),
    (_L + r"1\.(\d+)\.(norm1|norm2)\.(.+)", _S + r".blocks.\2.\3.\4"),
    (_L + r"1\.(\d+)\.attn\.attn\.in_proj_(weight|bias)", _S + r".blocks.\2.attn.in_proj.\3"),
    (_L + r"1\.(\d+)\.attn\.attn\.out_proj\.(.+)", _S + r".blocks.\2.attn.proj.\3"),
    (_L + r"1\.(\d+)\.attn\.(sr|norm)\.(.+)", _S + r".blocks.\2.attn.\3.\4"),
    (_L + r"1\.(\d+)\.ffn\.layers\.0\.(.+)", _S + r".blocks.\2.mlp.fc1.\3"),
    (_L + r"1\.(\d+)\.ffn\.layers\.1\.(.+)", _S + r".blocks.\2.mlp.dwconv.\3"),
    (_L + r"1\.(\d+)\.ffn\.layers\.4\.(.+)", _S + r".blocks.\2.mlp.fc2.\3"),
    (_L + r"2\.(weight|bias)", _S + r".norm.\2"),
    (r"decode_head\.convs\.(\d)\.(conv|bn)\.(.+)", r"decoder.convs.\1.\2.\3"),
    (r"decode_head\.fusion_conv\.(conv|bn)\.(.+)", r"decoder.fusion_conv.\1.\2"),
    (r"decode_head\.conv_seg\.(weight|bias)", r"decoder.classifier.\1"),
], drop=[r"head\.(weight|bias)"])

_B = r"encoder\.stages\.(\d)\.blocks\.(\d+)\."
_M = r"backbone.layers.\1.1.\2."
_FROM = Rules([
    (r"encoder\.stages\.(\d)\.patch_embed\.proj\.(.+)", r"backbone.layers.\1.0.projection.\2"),
    (r"encoder\.stages\.(\d)\.patch_embed\.norm\.(.+)", r"backbone.layers.\1.0.norm.\2"),
    (_B + r"(norm1|norm2)\.(.+)", _M + r"\3.\4"),
    (_B + r"attn\.in_proj\.(weight|bias)", _M + r"attn.attn.in_proj_\3"),
    (_B + r"attn\.proj\.(.+)", _M + r"attn.attn.out_proj.\3"),
    (_B + r"attn\.(sr|norm)\.(.+)", _M + r"attn.\3.\4"),
    (_B + r"mlp\.fc1\.(.+)", _M + r"ffn.layers.0.\3"),
    (_B + r"mlp\.dwconv\.(.+)", _M + r"ffn.layers.1.\3"),
    (_B + r"mlp\.fc2\.(.+)", _M + r"ffn.layers.4.\3"),
    (r"encoder\.stages\.(\d)\.norm\.(weight|bias)", r"backbone.layers.\1.2.\2"),
    (r"decoder\.convs\.(\d)\.(conv|bn)\.(.+)", r"decode_head.convs.\1.\2.\3"),
    (r"decoder\.fusion_conv\.(conv|bn)\.(.+)", r"decode_head.fusion_conv.\1.\2"),
    (r"decoder\.classifier\.(weight|bias)", r"decode_head.conv_seg.\1"),
])


def detect(keys, src) -> bool:
    return has_key(keys, _L + r"0\.projection\.weight")


def to_fastseg(state: dict, src) -> Converted:
    origin = {}
    sd, unexpected, ignored = _TO.apply(state, origin)
    # in_proj = [q; k; v] (nn.MultiheadAttention) → q and kv = [k; v]
    for key in [k for k in sd if re.search(r"\.attn\.in_proj\.(weight|bias)$", k)]:
        packed = sd.pop(key)
        dim = packed.shape[0] // 3
        sd[key.replace(".in_proj.", ".q.")] = packed[:dim]
        sd[key.replace(".in_proj.", ".kv.")] = packed[dim:]
        source_key = origin.pop(key, key)
        origin[key.replace(".in_proj.", ".q.")] = origin[key.replace(".in_proj.", ".kv.")] = source_key
    for key in [k for k in sd if re.search(r"mlp\.fc[12]\.weight$", k) and sd[k].ndim == 4]:
        sd[key] = sd[key].flatten(1)  # mmseg's MixFFN uses 1×1 convs where the others use Linears
    return Converted(sd, unexpected, ignored, origin=origin, hints={"eps": EPS})


def from_fastseg(state: dict, config) -> tuple[dict, list[str]]:
    _mit.require_head(config, "mmseg", TITLE,
                      "mmseg's SegformerHead puts a 1×1 conv + BN + ReLU on each branch, while the All-MLP head "
                      "has a plain Linear there (no BN, no ReLU), and it concatenates in the other order; convert "
                      "to nvlabs, hf or smp instead")
    _mit.require_official_heads(config, TITLE)
    sd = dict(state)
    for qkey in [k for k in sd if re.search(r"\.attn\.q\.(weight|bias)$", k)]:
        kvkey = qkey.replace(".attn.q.", ".attn.kv.")
        sd[qkey.replace(".attn.q.", ".attn.in_proj.")] = torch.cat([sd.pop(qkey), sd.pop(kvkey)], dim=0)
    for key in [k for k in sd if re.search(r"mlp\.fc[12]\.weight$", k)]:
        sd[key] = sd[key][:, :, None, None]
    out, unexpected, _ = _FROM.apply(sd)
    assert not unexpected, unexpected
    return out, []


# mmseg-1.x checkpoints of either model are the same {meta, state_dict} .pth.
write = write_mmseg_pth
