"""The official NVlabs/SegFormer checkpoints (built on mmseg-0.x): ``segformer.b*.*.pth``.

Keys: ``backbone.patch_embed{1-4}.{proj,norm}``, ``backbone.block{1-4}.{j}.{norm1, attn.{q,kv,sr,norm,proj},
norm2, mlp.{fc1, dwconv.dwconv, fc2}}``, ``backbone.norm{1-4}``, ``decode_head.linear_c{1-4}.proj``,
``decode_head.linear_fuse.{conv,bn}``, ``decode_head.linear_pred`` and the unused ``decode_head.conv_seg``
that mmseg's ``BaseDecodeHead`` creates. Files: mmcv's ``{"meta", "state_dict"}``.
LayerNorm eps: 1e-6 in blocks and stage norms, 1e-5 in patch-embed and sr norms. Logits at 1/4.
"""
from __future__ import annotations

from pathlib import Path

from fastseg.version import __version__

from . import _mit
from ._common import Converted, Rules, has_key, refuse_existing, save_torch_atomic, cpu_state

NAME = "nvlabs"
FAMILY = "segformer"
TITLE = "NVlabs / mmseg-0.x SegFormer"
EPS = _mit.EPS_NVLABS
OUTPUT = "logits at 1/4 of the input (ceil(H/4) x ceil(W/4)), as NVlabs' SegFormerHead"

HEAD_RULES = [
    (r"decode_head\.linear_c(\d)\.proj\.(weight|bias)", lambda m: f"decoder.linear_c.{int(m[1]) - 1}.{m[2]}"),
    (r"decode_head\.linear_fuse\.conv\.weight", "decoder.linear_fuse.weight"),
    (r"decode_head\.linear_fuse\.bn\.(.+)", r"decoder.bn.\1"),
    (r"decode_head\.linear_pred\.(weight|bias)", r"decoder.classifier.\1"),
]
_TO = Rules(_mit.nvlabs_encoder_rules(r"backbone\.") + HEAD_RULES,
            drop=[r"decode_head\.conv_seg\.(weight|bias)"])  # BaseDecodeHead's, never used by forward
_FROM = Rules(_mit.nvlabs_encoder_inverse("backbone.") + [
    (r"decoder\.linear_c\.(\d)\.(weight|bias)", lambda m: f"decode_head.linear_c{int(m[1]) + 1}.proj.{m[2]}"),
    (r"decoder\.linear_fuse\.weight", "decode_head.linear_fuse.conv.weight"),
    (r"decoder\.bn\.(.+)", r"decode_head.linear_fuse.bn.\1"),
    (r"decoder\.classifier\.(weight|bias)", r"decode_head.linear_pred.\1"),
])


def detect(keys, src) -> bool:
    return has_key(keys, r"backbone\.patch_embed\d\.proj\.weight")


def to_fastseg(state: dict, src) -> Converted:
    origin = {}
    sd, unexpected, ignored = _TO.apply(state, origin)
    return Converted(sd, unexpected, ignored, origin=origin, hints={"eps": EPS})


def from_fastseg(state: dict, config) -> tuple[dict, list[str]]:
    _mit.require_head(config, "mlp", TITLE, "NVlabs' SegFormerHead is the All-MLP head; mmseg's SegformerHead "
                      "(conv + BN + ReLU branches) has no NVlabs layout (convert to mmseg)")
    _mit.require_official_heads(config, TITLE)
    out, unexpected, _ = _FROM.apply(state)
    assert not unexpected, unexpected
    # mmseg's BaseDecodeHead builds conv_seg beside linear_pred; forward never uses it. A copy of the
    # classifier keeps the NVlabs code's load free of missing keys.
    out["decode_head.conv_seg.weight"] = out["decode_head.linear_pred.weight"].clone()
    out["decode_head.conv_seg.bias"] = out["decode_head.linear_pred.bias"].clone()
    return out, []


def write(path: Path, tensors: dict, config, overwrite: bool) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".pth", ".pt"):
        raise ValueError(f"{path}: an NVlabs checkpoint is a .pth file")
    refuse_existing(path, overwrite)
    meta = {"converted_by": f"fastseg {__version__}", "num_classes": int(config.num_classes),
            "CLASSES": [f"class_{i}" for i in range(config.num_classes)]}
    save_torch_atomic({"meta": meta, "state_dict": cpu_state(tensors)}, path)
    return path
