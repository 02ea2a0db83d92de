"""ImageNet-pretrained MiT backbones of NVlabs/SegFormer (``mit_b0.pth`` … ``mit_b5.pth``).

Keys: the NVlabs encoder names with no prefix (``patch_embed1.proj``, ``block1.0.attn.q``, ``norm1``) and
the ImageNet classifier ``head`` (not used). Encoder only: loading needs ``num_classes=`` for a new head.
LayerNorm eps as NVlabs.
"""
from __future__ import annotations

from . import _mit
from ._common import ConversionError, Converted, Rules, has_key

NAME = "mit"
FAMILY = "segformer"
TITLE = "NVlabs ImageNet MiT backbone"
EPS = _mit.EPS_NVLABS
OUTPUT = "encoder features only (no segmentation head)"

_TO = Rules(_mit.nvlabs_encoder_rules(""), drop=[r"head\.(weight|bias)"])


def detect(keys, src) -> bool:
    return has_key(keys, r"patch_embed\d\.proj\.weight")


def to_fastseg(state: dict, src) -> Converted:
    origin = {}
    sd, unexpected, ignored = _TO.apply(state, origin)
    return Converted(sd, unexpected, ignored, origin=origin, hints={"eps": EPS})


def from_fastseg(state: dict, config):
    raise ConversionError(
        "the ImageNet MiT layout holds an encoder and an ImageNet classifier, not a segmentation model: this "
        "model's decoder would be lost; convert to nvlabs (the same encoder names under backbone., plus the head)")
