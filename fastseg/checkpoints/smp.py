"""segmentation_models_pytorch (smp ≥ 0.4) ``smp.Segformer`` with a ``mit_b*`` encoder.

Keys: ``encoder.`` + the NVlabs MiT names (``encoder.patch_embed1.proj``, ``encoder.block1.0.attn.q``,
``encoder.norm1``); decoder ``decoder.mlp_stage.{i}.linear`` with i = 0 for the *deepest* stage (smp
reverses the features), ``decoder.fuse_stage.0`` (1×1 conv, no bias), ``decoder.fuse_stage.1`` (BN; ReLU
after it); ``segmentation_head.0`` (the 1×1 classifier). A state dict, or smp's ``save_pretrained``
directory (config.json with ``_model_class``, model.safetensors). LayerNorm eps as NVlabs (smp copies
its MiT).

smp's decoder is the All-MLP head: the same Linear → bilinear (align_corners=False) → concat [c4, c3, c2,
c1] → conv + BN + ReLU → classifier, with no dropout. It resizes to (H // 4, W // 4) where NVlabs resizes
to stage 1's ceil(H / 4); smp accepts only H, W divisible by 32, where the two agree. Its
``segmentation_head`` then upsamples the logits ×4 with ``nn.Upsample(mode="bilinear",
align_corners=True)``. fastseg returns the 1/4-resolution logits; that upsampling of them is smp's output.
"""
from __future__ import annotations

from pathlib import Path

from . import _mit
from ._common import (WEIGHTS_FILE, CheckpointError, ConversionError, Converted, Rules, has_key, model_directory,
                      refuse_existing, save_json_atomic, save_weights_file)

NAME = "smp"
FAMILY = "segformer"
TITLE = "segmentation_models_pytorch Segformer"
EPS = _mit.EPS_NVLABS
UPSAMPLING = 4


def output_note(upsampling: int = UPSAMPLING) -> str:
    return (f"logits at 1/4 of the input; smp's Segformer returns them upsampled x{upsampling} by its "
            f"segmentation_head (nn.Upsample(scale_factor={upsampling}, mode='bilinear', align_corners=True)): "
            f"F.interpolate(logits, scale_factor={upsampling}, mode='bilinear', align_corners=True) reproduces "
            "smp's full-resolution output")


OUTPUT = output_note()

_TO = Rules(_mit.nvlabs_encoder_rules(r"encoder\.") + [
    (r"decoder\.mlp_stage\.(\d)\.linear\.(weight|bias)", lambda m: f"decoder.linear_c.{3 - int(m[1])}.{m[2]}"),
    (r"decoder\.fuse_stage\.0\.weight", "decoder.linear_fuse.weight"),
    (r"decoder\.fuse_stage\.1\.(.+)", r"decoder.bn.\1"),
    (r"segmentation_head\.0\.(weight|bias)", r"decoder.classifier.\1"),
], drop=[r"classification_head\..+"])  # smp's optional aux_params classifier (not a segmentation output)
_FROM = Rules(_mit.nvlabs_encoder_inverse("encoder.") + [
    (r"decoder\.linear_c\.(\d)\.(weight|bias)", lambda m: f"decoder.mlp_stage.{3 - int(m[1])}.linear.{m[2]}"),
    (r"decoder\.linear_fuse\.weight", "decoder.fuse_stage.0.weight"),
    (r"decoder\.bn\.(.+)", r"decoder.fuse_stage.1.\1"),
    (r"decoder\.classifier\.(weight|bias)", r"segmentation_head.0.\1"),
])


def detect(keys, src) -> bool:
    return src.smp_config is not None or has_key(keys, r"encoder\.patch_embed\d\.proj\.weight") \
        or has_key(keys, r"decoder\.mlp_stage\.\d\.linear\.weight")


def to_fastseg(state: dict, src) -> Converted:
    if not has_key(state, r"encoder\.patch_embed\d\.proj\.weight"):
        name = (src.smp_config or {}).get("encoder_name")
        raise CheckpointError(
            f"{src.description}: an smp Segformer whose encoder is not a Mix Transformer"
            f"{f' ({name})' if name else ''} (keys like {next(iter(state))}); fastseg loads smp Segformers with "
            "encoder_name='mit_b0' … 'mit_b5' only")
    origin = {}
    sd, unexpected, ignored = _TO.apply(state, origin)
    upsampling = int((src.smp_config or {}).get("upsampling", UPSAMPLING))
    notes = []
    if any(k.startswith("classification_head.") for k in ignored):
        notes.append("smp's auxiliary classification_head (aux_params) is not loaded: fastseg has no such head")
    hints = {"eps": EPS, "output": output_note(upsampling)}
    if src.smp_config and "decoder_segmentation_channels" in src.smp_config:
        hints["decoder_dim"] = int(src.smp_config["decoder_segmentation_channels"])
    return Converted(sd, unexpected, ignored, notes=notes, hints=hints, origin=origin)


def from_fastseg(state: dict, config) -> tuple[dict, list[str]]:
    _mit.require_head(config, "mlp", TITLE, "smp's SegformerDecoder is the All-MLP head; mmseg's SegformerHead "
                      "(conv + BN + ReLU branches) is another architecture")
    if config.variant is None:
        raise ConversionError(f"{TITLE} builds its encoder by name (mit_b0 … mit_b5); this model has custom sizes "
                              f"{tuple(config.embed_dims)} / depths {tuple(config.depths)}")
    _mit.require_official_heads(config, TITLE)
    out, unexpected, _ = _FROM.apply(state)
    assert not unexpected, unexpected
    return out, [f"smp's model returns these logits upsampled x{UPSAMPLING} (align_corners=True): "
                 "build it with upsampling=4 (the default)"]


def smp_config(config) -> dict:
    """The init arguments smp's ``save_pretrained`` records (config.json), for ``smp.from_pretrained``."""
    return {"_model_class": "Segformer", "encoder_name": f"mit_{config.variant}", "encoder_depth": 5,
            "encoder_weights": None, "decoder_segmentation_channels": int(config.decoder_dim),
            "in_channels": int(config.in_channels), "classes": int(config.num_classes), "activation": None,
            "upsampling": UPSAMPLING, "aux_params": None}


def write(path: Path, tensors: dict, config, overwrite: bool) -> Path:
    """A state dict file (``.pth``/``.safetensors``) or, for a path without suffix, smp's directory."""
    path = Path(path)
    refuse_existing(path, overwrite)
    if path.suffix:
        save_weights_file(tensors, path)
        return path
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    with model_directory(path) as tmp:
        save_weights_file(tensors, tmp / WEIGHTS_FILE, {"format": "pt"})
        save_json_atomic(smp_config(config), tmp / "config.json")
    return path
