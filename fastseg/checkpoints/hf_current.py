"""The module names of the current ``transformers`` Segformer, i.e. a live model's ``state_dict()``.

Keys: ``segformer.stages.{i}.patch_embeddings.{proj,layer_norm}``, ``segformer.stages.{i}.blocks.{j}.
{layernorm_before, attention.{q_proj,k_proj,v_proj,o_proj, sequence_reduction.{sequence_reduction,layer_norm}},
layernorm_after, mlp.{fc1, dwconv.dwconv, fc2}}``, ``segformer.stages.{i}.layer_norm``,
``decode_head.{linear_projections.{i}.proj, linear_fuse, batch_norm, classifier}``. LayerNorm eps 1e-5.
``fastseg convert --to hf`` writes the hub names (:mod:`.hf_hub`), which transformers reads and writes;
this module's ``from_fastseg`` gives the live names (for ``model.load_state_dict``).
"""
from __future__ import annotations

from . import _mit, hf_hub
from ._common import Converted, Rules, has_key

NAME = "hf"
FAMILY = "segformer"
TITLE = "HuggingFace (current transformers module names)"
EPS = _mit.EPS_HF
OUTPUT = hf_hub.OUTPUT

_P = r"(?:segformer\.)?stages\.(\d)\."
_S = r"encoder.stages.\1"
_TO = Rules([
    (_P + r"patch_embeddings\.proj\.(.+)", _S + r".patch_embed.proj.\2"),
    (_P + r"patch_embeddings\.layer_norm\.(.+)", _S + r".patch_embed.norm.\2"),
    (_P + r"blocks\.(\d+)\.layernorm_before\.(.+)", _S + r".blocks.\2.norm1.\3"),
    (_P + r"blocks\.(\d+)\.layernorm_after\.(.+)", _S + r".blocks.\2.norm2.\3"),
    (_P + r"blocks\.(\d+)\.attention\.q_proj\.(.+)", _S + r".blocks.\2.attn.q.\3"),
    (_P + r"blocks\.(\d+)\.attention\.k_proj\.(.+)", _S + r".blocks.\2.attn.k.\3"),
    (_P + r"blocks\.(\d+)\.attention\.v_proj\.(.+)", _S + r".blocks.\2.attn.v.\3"),
    (_P + r"blocks\.(\d+)\.attention\.o_proj\.(.+)", _S + r".blocks.\2.attn.proj.\3"),
    (_P + r"blocks\.(\d+)\.attention\.sequence_reduction\.sequence_reduction\.(.+)", _S + r".blocks.\2.attn.sr.\3"),
    (_P + r"blocks\.(\d+)\.attention\.sequence_reduction\.layer_norm\.(.+)", _S + r".blocks.\2.attn.norm.\3"),
    (_P + r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(.+)", _S + r".blocks.\2.mlp.\3.\4"),
    (_P + r"blocks\.(\d+)\.mlp\.dwconv\.dwconv\.(.+)", _S + r".blocks.\2.mlp.dwconv.\3"),
    (_P + r"layer_norm\.(.+)", _S + r".norm.\2"),
    (r"decode_head\.linear_projections\.(\d)\.proj\.(.+)", r"decoder.linear_c.\1.\2"),
    (r"decode_head\.linear_fuse\.weight", "decoder.linear_fuse.weight"),
    (r"decode_head\.batch_norm\.(.+)", r"decoder.bn.\1"),
    (r"decode_head\.classifier\.(.+)", r"decoder.classifier.\1"),
], drop=[r"classifier\.(weight|bias)"])

_B = r"encoder\.stages\.(\d)\.blocks\.(\d+)\."
_H = r"segformer.stages.\1.blocks.\2."
_FROM = Rules([
    (r"encoder\.stages\.(\d)\.patch_embed\.proj\.(.+)", r"segformer.stages.\1.patch_embeddings.proj.\2"),
    (r"encoder\.stages\.(\d)\.patch_embed\.norm\.(.+)", r"segformer.stages.\1.patch_embeddings.layer_norm.\2"),
    (_B + r"norm1\.(.+)", _H + r"layernorm_before.\3"),
    (_B + r"norm2\.(.+)", _H + r"layernorm_after.\3"),
    (_B + r"attn\.q\.(.+)", _H + r"attention.q_proj.\3"),
    (_B + r"attn\.k\.(.+)", _H + r"attention.k_proj.\3"),
    (_B + r"attn\.v\.(.+)", _H + r"attention.v_proj.\3"),
    (_B + r"attn\.proj\.(.+)", _H + r"attention.o_proj.\3"),
    (_B + r"attn\.sr\.(.+)", _H + r"attention.sequence_reduction.sequence_reduction.\3"),
    (_B + r"attn\.norm\.(.+)", _H + r"attention.sequence_reduction.layer_norm.\3"),
    (_B + r"mlp\.(fc1|fc2)\.(.+)", _H + r"mlp.\3.\4"),
    (_B + r"mlp\.dwconv\.(.+)", _H + r"mlp.dwconv.dwconv.\3"),
    (r"encoder\.stages\.(\d)\.norm\.(.+)", r"segformer.stages.\1.layer_norm.\2"),
    (r"decoder\.linear_c\.(\d)\.(.+)", r"decode_head.linear_projections.\1.proj.\2"),
    (r"decoder\.linear_fuse\.weight", "decode_head.linear_fuse.weight"),
    (r"decoder\.bn\.(.+)", r"decode_head.batch_norm.\1"),
    (r"decoder\.classifier\.(.+)", r"decode_head.classifier.\1"),
])


def detect(keys, src) -> bool:
    return has_key(keys, _P + r"patch_embeddings\..+")


def to_fastseg(state: dict, src) -> Converted:
    origin = {}
    sd, unexpected, ignored = _TO.apply(state, origin)
    _mit.merge_kv(sd, origin)
    return Converted(sd, unexpected, ignored, origin=origin, hints=hf_hub.config_hints(src.hf_config))


def from_fastseg(state: dict, config) -> tuple[dict, list[str]]:
    hf_hub.check(config)
    sd = dict(state)
    _mit.split_kv(sd)
    out, unexpected, _ = _FROM.apply(sd)
    assert not unexpected, unexpected
    return out, []


