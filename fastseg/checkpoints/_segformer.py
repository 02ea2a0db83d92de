"""Building a SegFormer from converted weights: the architecture read off the tensor shapes, the
model built from the class the model itself passes in (this package never imports fastseg.models)."""
from __future__ import annotations

import re
import warnings

from . import native
from ._common import (CheckpointError, LoadReport, check_fit, materialise, missing_message, note_nonfinite,
                      skeleton)


def infer_config(cls, sd: dict, title: str, hints: dict, decoder: str | None):
    """(config dict for ``cls.config_class.from_dict``, whether the weights include a decoder)."""
    dims, depths, sr_ratios, mlp_ratios = [], [], [], []
    for i in range(4):
        proj = sd.get(f"encoder.stages.{i}.patch_embed.proj.weight")
        if proj is None:
            raise CheckpointError(missing_message("SegFormer", [f"encoder.stages.{i}.patch_embed.proj.weight"], [], title))
        want_kernel = 7 if i == 0 else 3
        if proj.ndim != 4 or proj.shape[-1] != want_kernel:
            raise CheckpointError(
                f"stage {i + 1} patch embedding has kernel {tuple(proj.shape[2:])}; SegFormer uses "
                f"{want_kernel}x{want_kernel} (weight shape {tuple(proj.shape)})")
        dims.append(int(proj.shape[0]))
        blocks = {int(m[1]) for k in sd if (m := re.match(rf"encoder\.stages\.{i}\.blocks\.(\d+)\.", k))}
        depths.append(max(blocks) + 1 if blocks else 0)
        sr = sd.get(f"encoder.stages.{i}.blocks.0.attn.sr.weight")
        sr_ratios.append(int(sr.shape[-1]) if sr is not None else 1)
        fc1 = sd.get(f"encoder.stages.{i}.blocks.0.mlp.fc1.weight")
        if fc1 is not None:
            mlp_ratios.append(fc1.shape[0] // proj.shape[0])
    if len(set(mlp_ratios)) > 1:
        raise CheckpointError(f"stages use different MLP ratios {mlp_ratios}; fastseg supports one ratio")

    has_mlp_head = "decoder.linear_fuse.weight" in sd
    has_mmseg_head = "decoder.fusion_conv.conv.weight" in sd
    head = "mlp" if has_mlp_head else "mmseg" if has_mmseg_head else None
    if head and decoder and decoder != head:
        raise CheckpointError(
            f"the checkpoint has a {head!r} decoder but decoder={decoder!r} was asked for; omit decoder= "
            "to use the checkpoint's own head")
    variant = next((name for name, (d, ds, _) in cls.variants.items()
                    if tuple(dims) == tuple(d) and tuple(depths) == tuple(ds)), None)
    if has_mlp_head:
        decoder_dim = sd["decoder.linear_fuse.weight"].shape[0]
    elif has_mmseg_head:
        decoder_dim = sd["decoder.fusion_conv.conv.weight"].shape[0]
    elif "decoder_dim" in hints:
        decoder_dim = hints["decoder_dim"]
    else:
        decoder_dim = cls.variants[variant][2] if variant else (256 if dims[0] < 64 else 768)
    classifier = sd.get("decoder.classifier.weight")
    cfg = dict(
        num_classes=int(classifier.shape[0]) if classifier is not None else 1,
        embed_dims=dims, depths=depths, num_heads=list(hints.get("num_heads", (1, 2, 5, 8))),
        sr_ratios=sr_ratios, mlp_ratio=mlp_ratios[0] if mlp_ratios else 4, decoder_dim=int(decoder_dim),
        decoder=head or decoder or "mlp", in_channels=int(sd["encoder.stages.0.patch_embed.proj.weight"].shape[1]),
        norm_eps=dict(hints["eps"]), variant=variant,
    )
    return cfg, head is not None


def load(cls, src, fmt, converted, *, num_classes=None, fused=False, decoder=None, strict=True):
    sd = converted.state_dict
    if fmt is native and src.fastseg_config is not None:
        cfg = cls.config_class.from_dict(src.fastseg_config)
        has_head = True
    else:
        cfg_dict, has_head = infer_config(cls, sd, fmt.TITLE, converted.hints, decoder)
        cfg = cls.config_class.from_dict(cfg_dict)
    report = LoadReport("SegFormer", src.description, fmt.NAME, fmt.TITLE, cfg.num_classes, cfg.decoder,
                        variant=cfg.variant, ignored=list(converted.ignored), notes=list(converted.notes),
                        output=converted.hints.get("output", fmt.OUTPUT))
    if not has_head:
        if num_classes is None:
            raise ValueError(f"{src.description} holds an encoder only (no segmentation head); pass num_classes= "
                             "to build a head for it")
        report.initialised.append("decoder (official initialisation)")
        report.notes.append("encoder-only checkpoint: the decoder is newly initialised and must be trained")
        report.output = "logits at 1/4 of the input"
    reinit = has_head and num_classes is not None and num_classes != cfg.num_classes
    checkpoint_classes = cfg.num_classes
    if num_classes is not None:
        cfg = cfg.replace(num_classes=num_classes)
        report.num_classes = num_classes

    built, on_meta = skeleton(cls, cfg, fused)
    if reinit:
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder.classifier.")}
        report.initialised.append("decoder.classifier")
        msg = (f"the checkpoint's classifier has {checkpoint_classes} classes but num_classes={num_classes}: "
               "the classifier is re-initialised and must be trained")
        report.notes.append(msg)
        warnings.warn(msg, stacklevel=4)
    elif not has_head:
        warnings.warn(f"{src.description}: encoder-only checkpoint, decoder initialised from scratch", stacklevel=4)

    def allowed_missing(k):
        return (not has_head and k.startswith("decoder.")) or (reinit and k.startswith("decoder.classifier."))

    expected = built.state_dict()
    check_fit("SegFormer", src.description, sd, expected, allowed_missing, list(converted.unexpected),
              fmt.TITLE, strict, report.notes, converted.origin)
    note_nonfinite(src.description, sd, expected, report.notes, converted.origin)
    model, report.loaded = materialise(cls, cfg, fused, built, on_meta, sd)
    model.load_report = report
    return model


def expected_keys(cls) -> list[str]:
    """A plain B0's parameter names, for the message about an unknown layout."""
    return list(cls(config=cls.config_class.from_dict({"num_classes": 1})).state_dict())
