"""Pieces the SegFormer formats share: the NVlabs-style MiT names (NVlabs, ImageNet ``mit_b*`` and smp
use the same encoder names under different prefixes), attention packing, eps presets.

fastseg's SegFormer names::

    encoder.stages.{i}.patch_embed.{proj,norm}
    encoder.stages.{i}.blocks.{j}.{norm1, attn.{q,kv,sr,norm,proj}, norm2, mlp.{fc1,dwconv,fc2}}
    encoder.stages.{i}.norm
    decoder.{linear_c.{i}, linear_fuse, bn, classifier}                    (All-MLP head)
    decoder.{convs.{i}.{conv,bn}, fusion_conv.{conv,bn}, classifier}       (mmseg SegformerHead)
"""
from __future__ import annotations

import re

import torch

from ._common import ConversionError

# LayerNorm eps each source's own code computes with (patch embedding, blocks, spatial reduction,
# stage end). NVlabs: partial(nn.LayerNorm, eps=1e-6) for blocks and stage norms, plain nn.LayerNorm
# (1e-5) for the patch-embed and sr norms; smp copies NVlabs' MiT. HF: plain nn.LayerNorm everywhere.
# mmseg 1.x: norm_cfg=dict(type='LN', eps=1e-6) everywhere.
EPS_NVLABS = {"patch_embed": 1e-5, "block": 1e-6, "sr": 1e-5, "stage": 1e-6}
EPS_HF = {"patch_embed": 1e-5, "block": 1e-5, "sr": 1e-5, "stage": 1e-5}
EPS_MMSEG = {"patch_embed": 1e-6, "block": 1e-6, "sr": 1e-6, "stage": 1e-6}
# The head counts of every official variant: checkpoints outside HF do not store them.
OFFICIAL_HEADS = (1, 2, 5, 8)

_STAGE = lambda m, k=1: int(m[k]) - 1  # noqa: E731 - NVlabs numbers stages from 1


def nvlabs_encoder_rules(prefix: str) -> list:
    """Foreign → fastseg rules for the NVlabs MiT names under ``prefix`` ("backbone\\.", "encoder\\.", "")."""
    p = prefix
    return [
        (p + r"patch_embed(\d)\.(proj|norm)\.(weight|bias)",
         lambda m: f"encoder.stages.{_STAGE(m)}.patch_embed.{m[2]}.{m[3]}"),
        (p + r"block(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.(weight|bias)",
         lambda m: f"encoder.stages.{_STAGE(m)}.blocks.{m[2]}.mlp.dwconv.{m[3]}"),
        (p + r"block(\d)\.(\d+)\.(norm1|norm2|attn\.q|attn\.kv|attn\.proj|attn\.sr|attn\.norm|mlp\.fc1|mlp\.fc2)"
             r"\.(weight|bias)",
         lambda m: f"encoder.stages.{_STAGE(m)}.blocks.{m[2]}.{m[3]}.{m[4]}"),
        (p + r"norm(\d)\.(weight|bias)", lambda m: f"encoder.stages.{_STAGE(m)}.norm.{m[2]}"),
    ]


def nvlabs_encoder_inverse(prefix: str) -> list:
    """fastseg → foreign rules for the encoder, ``prefix`` a plain string ("backbone.", "encoder.", "")."""
    p = prefix
    return [
        (r"encoder\.stages\.(\d)\.patch_embed\.(proj|norm)\.(weight|bias)",
         lambda m: f"{p}patch_embed{int(m[1]) + 1}.{m[2]}.{m[3]}"),
        (r"encoder\.stages\.(\d)\.blocks\.(\d+)\.mlp\.dwconv\.(weight|bias)",
         lambda m: f"{p}block{int(m[1]) + 1}.{m[2]}.mlp.dwconv.dwconv.{m[3]}"),
        (r"encoder\.stages\.(\d)\.blocks\.(\d+)\.(.+)", lambda m: f"{p}block{int(m[1]) + 1}.{m[2]}.{m[3]}"),
        (r"encoder\.stages\.(\d)\.norm\.(weight|bias)", lambda m: f"{p}norm{int(m[1]) + 1}.{m[2]}"),
    ]


def merge_kv(sd: dict, origin: dict) -> None:
    """Separate ``attn.k`` + ``attn.v`` (HF) → fastseg's ``attn.kv`` (k rows first)."""
    for key in [k for k in sd if re.search(r"\.attn\.k\.(weight|bias)$", k)]:
        vkey = key.replace(".attn.k.", ".attn.v.")
        if vkey in sd:
            kv = key.replace(".attn.k.", ".attn.kv.")
            sd[kv] = torch.cat([sd.pop(key), sd.pop(vkey)], dim=0)
            origin[kv] = f"{origin.pop(key, key)} + {origin.pop(vkey, vkey)}"


def split_kv(sd: dict) -> None:
    """fastseg's ``attn.kv`` → ``attn.k`` + ``attn.v``: exact halves, as HF keeps them."""
    for key in [k for k in sd if re.search(r"\.attn\.kv\.(weight|bias)$", k)]:
        kv = sd.pop(key)
        half = kv.shape[0] // 2
        sd[key.replace(".attn.kv.", ".attn.k.")] = kv[:half].clone()
        sd[key.replace(".attn.kv.", ".attn.v.")] = kv[half:].clone()


def check_eps(config, eps: dict, title: str, allow_eps_change: bool) -> list[str]:
    """Refuse (unless allowed) a model whose LayerNorm eps differ from what ``title``'s code uses."""
    have = {k: getattr(config.norm_eps, k) for k in eps}
    if have == eps:
        return []
    msg = (f"the model computes with LayerNorm eps {have} but {title} models use {eps}: that library would "
           "compute different logits from these weights")
    if not allow_eps_change:
        raise ConversionError(msg + "; pass allow_eps_change=True (fastseg convert --allow-eps-change) to convert "
                                    "anyway")
    return [msg + " (converted anyway: allow_eps_change=True)"]


def require_head(config, head: str, title: str, why: str) -> None:
    if config.decoder != head:
        raise ConversionError(f"{title} cannot hold this model's {config.decoder!r} decoder: {why}")


def require_official_heads(config, title: str) -> None:
    if tuple(config.num_heads) != OFFICIAL_HEADS:
        raise ConversionError(
            f"the model has {tuple(config.num_heads)} attention heads per stage; {title} checkpoints do not store "
            f"head counts and are read with the official {OFFICIAL_HEADS}, so they would compute something else")
