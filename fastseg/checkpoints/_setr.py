"""Building a SETR from converted weights (see :mod:`._segformer`; the model class comes in as an argument)."""
from __future__ import annotations

import math
import re
import warnings

from . import native
from ._common import (CheckpointError, LoadReport, check_fit, materialise, missing_message, note_nonfinite,
                      skeleton)

HEAD_PREFIXES = ("decoder.", "neck.", "aux_heads.")


def _count(sd, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m[1]) for k in sd if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def head_kind(keys) -> str | None:
    """"mla", "up" (Naive / PUP) or None (no segmentation head), from fastseg keys."""
    keys = list(keys)
    if any(re.match(r"(neck\.|decoder\.branches\.)", k) for k in keys):
        return "mla"
    if any(k.startswith("decoder.") for k in keys):
        return "up"
    return None


def infer_config(cls, sd: dict, title: str, *, decoder, num_classes, img_size, num_heads, out_indices):
    """(config, whether the weights include the segmentation heads, the stored position grid)."""
    proj = sd.get("encoder.patch_embed.proj.weight")
    pos = sd.get("encoder.pos_embed")
    if proj is None or pos is None or proj.ndim != 4 or pos.ndim != 3:
        missing = [k for k in ("encoder.patch_embed.proj.weight", "encoder.pos_embed") if k not in sd]
        raise CheckpointError(missing_message("SETR", missing or ["a 4-d patch conv and a 3-d pos_embed"], [], title))
    dim, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = _count(sd, r"encoder\.blocks\.(\d+)\.")
    fc1 = sd.get("encoder.blocks.0.mlp.fc1.weight")
    if depth == 0 or fc1 is None:
        raise CheckpointError(missing_message("SETR", ["encoder.blocks.0.*"], [], title))
    if fc1.shape[0] % dim:
        raise CheckpointError(f"MLP width {fc1.shape[0]} is not a multiple of the embed dim {dim}")
    if num_heads is None:
        if dim % 64:
            raise CheckpointError(f"embed dim {dim} is not a multiple of 64: pass num_heads= (the weights do not say)")
        num_heads = dim // 64  # every ViT/DeiT of the SETR configs has head dim 64
    n = pos.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"pos_embed has {n} grid entries, not a square grid; cannot tell its shape")
    stored_grid = (side, side)

    kind = head_kind(sd)
    has_head = kind is not None
    if has_head:
        conv0 = sd.get("decoder.convs.0.conv.weight")
        found = "mla" if kind == "mla" else ("naive" if conv0 is not None and conv0.shape[-1] == 1 else "pup")
        if decoder is not None and decoder != found:
            raise CheckpointError(
                f"the checkpoint has a {found!r} decoder but decoder={decoder!r} was asked for; omit decoder= "
                "to use the checkpoint's own head")
        decoder = found
    elif decoder is None or num_classes is None:
        raise ValueError(
            "the checkpoint holds a ViT encoder only (no segmentation head); pass num_classes= and decoder= "
            f"(one of {list(cls.decoders)}) to build the heads for it")
    if decoder not in cls.decoders:
        raise ValueError(f"unknown SETR decoder {decoder!r}; choose one of {list(cls.decoders)}")

    head = {}
    if has_head:
        classifier = sd.get("decoder.classifier.weight")
        if classifier is None:
            raise CheckpointError(missing_message("SETR", ["decoder.classifier.weight"], [], title))
        head["num_classes"] = int(classifier.shape[0])
        head["aux_in_index"] = list(range(_count(sd, r"aux_heads\.(\d+)\.")))
        if decoder == "mla":
            head["neck_channels"] = int(sd["neck.proj.0.conv.weight"].shape[0])
            head["mla_channels"] = int(sd["decoder.branches.0.0.conv.weight"].shape[0])
        else:
            head["head_channels"] = int(conv0.shape[0])
            head["head_num_convs"] = _count(sd, r"decoder\.convs\.(\d+)\.")
            head["head_kernel_size"] = int(conv0.shape[-1])
            aux0 = sd.get("aux_heads.0.convs.0.conv.weight")
            if aux0 is not None:
                head["aux_channels"] = int(aux0.shape[0])
                head["aux_kernel_size"] = int(aux0.shape[-1])
                head["aux_num_convs"] = _count(sd, r"aux_heads\.0\.convs\.(\d+)\.")
    else:
        head["num_classes"] = num_classes

    encoder = next((name for name, spec in cls.encoders.items() if spec == (dim, depth, num_heads)), None)
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    cfg = cls.config_class.from_dict(dict(
        decoder=decoder, encoder=encoder,
        img_size=img_size if img_size is not None else (stored_grid[0] * patch, stored_grid[1] * patch),
        patch_size=int(patch), in_channels=int(in_channels), embed_dim=int(dim), depth=depth, num_heads=int(num_heads),
        mlp_ratio=fc1.shape[0] // dim, out_indices=list(out_indices) if out_indices is not None else None,
        patch_bias="encoder.patch_embed.proj.bias" in sd, **head,
    ))
    return cfg, has_head, stored_grid


def _is_classifier(key: str) -> bool:
    return bool(re.fullmatch(r"(decoder|aux_heads\.\d+)\.classifier\.(weight|bias)", key))


def load(cls, src, fmt, converted, *, num_classes=None, decoder=None, img_size=None, num_heads=None,
         out_indices=None, fused=False, strict=True):
    sd = dict(converted.state_dict)
    if fmt is native and src.fastseg_config is not None:
        cfg = cls.config_class.from_dict(src.fastseg_config)
        if decoder is not None and decoder != cfg.decoder:
            raise CheckpointError(f"the checkpoint has a {cfg.decoder!r} decoder but decoder={decoder!r} was asked for")
        has_head, stored_grid = True, cfg.grid
        if img_size is not None:
            cfg = cfg.replace(img_size=img_size)
        if out_indices is not None:
            cfg = cfg.replace(out_indices=tuple(out_indices))
    else:
        cfg, has_head, stored_grid = infer_config(cls, sd, fmt.TITLE, decoder=decoder, num_classes=num_classes,
                                                  img_size=img_size, num_heads=num_heads, out_indices=out_indices)
    report = LoadReport("SETR", src.description, fmt.NAME, fmt.TITLE, cfg.num_classes, cfg.decoder,
                        encoder=cfg.encoder, ignored=list(converted.ignored), notes=list(converted.notes),
                        output=fmt.OUTPUT)
    if not getattr(cfg, "patch_bias", True):
        report.notes.append("no patch-embedding bias in the checkpoint (mmseg 1.x patch_bias=False): the patch "
                            "conv is built without one")

    checkpoint_classes = cfg.num_classes
    reinit = has_head and num_classes is not None and num_classes != checkpoint_classes
    if num_classes is not None:
        cfg = cfg.replace(num_classes=num_classes)
        report.num_classes = num_classes
    built, on_meta = skeleton(cls, cfg, fused)

    if "encoder.pos_embed" in sd and stored_grid != cfg.grid:
        pos = sd["encoder.pos_embed"]
        sd["encoder.pos_embed"] = cls.resize_pos_embed(pos.float(), stored_grid, cfg.grid).to(pos.dtype)
        report.notes.append(f"position embedding resized from a {stored_grid[0]}x{stored_grid[1]} grid to "
                            f"{cfg.grid[0]}x{cfg.grid[1]} (img_size {cfg.img_size[0]}x{cfg.img_size[1]})")
    if not has_head:
        report.initialised.append("neck, decoder and auxiliary heads (official initialisation)")
        report.notes.append("encoder-only checkpoint: the heads are newly initialised and must be trained")
        report.output = "PUP: logits at full resolution; Naive/MLA: at 1/4"
        warnings.warn(f"{src.description}: encoder-only checkpoint, SETR-{cfg.decoder} heads initialised from scratch",
                      stacklevel=4)
    if reinit:
        sd = {k: v for k, v in sd.items() if not _is_classifier(k)}
        report.initialised.append("decoder.classifier and aux_heads.*.classifier")
        msg = (f"the checkpoint's classifiers have {checkpoint_classes} classes but num_classes={num_classes}: "
               "the classifiers are re-initialised and must be trained")
        report.notes.append(msg)
        warnings.warn(msg, stacklevel=4)

    def allowed_missing(k):
        return (not has_head and k.startswith(HEAD_PREFIXES)) or (reinit and _is_classifier(k))

    expected = built.state_dict()
    check_fit("SETR", src.description, sd, expected, allowed_missing, list(converted.unexpected),
              fmt.TITLE, strict, report.notes, converted.origin)
    note_nonfinite(src.description, sd, expected, report.notes, converted.origin)
    model, report.loaded = materialise(cls, cfg, fused, built, on_meta, sd)
    model.load_report = report
    return model


def expected_keys(cls) -> list[str]:
    cfg = cls.config_class.from_dict(dict(encoder=None, embed_dim=64, depth=4, num_heads=1, num_classes=1))
    return list(cls(config=cfg).state_dict())
