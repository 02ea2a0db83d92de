"""Loading SETR checkpoints people already have, and saving our own.

Formats (detected from the keys, never from the file name):

=========  =========================================================================================
``fastseg``  what :meth:`SETR.save_pretrained` writes (``model.safetensors`` + config)
``mmseg``    mmsegmentation SETR checkpoints (``backbone.patch_embed.projection``,
             ``backbone.layers.{i}.ln1`` / ``attn.attn.in_proj_weight`` / ``attn.attn.out_proj`` /
             ``ln2`` / ``ffn.layers.0.0`` / ``ffn.layers.1``, ``decode_head.*``, ``neck.*`` (MLA),
             ``auxiliary_head.{k}.*``); also mmseg-converted ViT backbones (same keys, no prefix)
``timm``     ImageNet ViT weights in timm names (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
             ``blocks.{i}.norm1`` / ``attn.qkv`` / ``attn.proj`` / ``norm2`` / ``mlp.fc1`` /
             ``mlp.fc2``; ``norm`` and ``head`` unused), e.g. ``jx_vit_large_p16_384``
=========  =========================================================================================

The packed ``in_proj`` of ``nn.MultiheadAttention`` and timm's ``qkv`` are the same [q; k; v]
matrix, so both load into ``attn.qkv`` as they are. Position embeddings stored for another grid
are resized to the model's (bilinear, align_corners=False; the cls entry kept), as mmseg does when
it loads ImageNet weights. Files are read through :mod:`fastseg.io`: never an arbitrary unpickle.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastseg.checkpoints import _preview  # one key-list formatter for both loaders
from fastseg.io import CheckpointError, load_weights_file, read_json, save_json_atomic, save_safetensors_atomic

FASTSEG_CONFIG = "fastseg_config.json"
WEIGHTS_FILE = "model.safetensors"

_B = r"(?:backbone\.)?"
_ENC_RULES = {
    "mmseg": [
        (_B + r"patch_embed\.projection\.(weight|bias)", r"encoder.patch_embed.proj.\1"),
        (_B + r"cls_token", "encoder.cls_token"),
        (_B + r"pos_embed", "encoder.pos_embed"),
        (_B + r"layers\.(\d+)\.ln([12])\.(weight|bias)", r"encoder.blocks.\1.norm\2.\3"),
        (_B + r"layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)", r"encoder.blocks.\1.attn.qkv.\2"),
        (_B + r"layers\.(\d+)\.attn\.attn\.out_proj\.(weight|bias)", r"encoder.blocks.\1.attn.proj.\2"),
        (_B + r"layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", r"encoder.blocks.\1.mlp.fc1.\2"),
        (_B + r"layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)", r"encoder.blocks.\1.mlp.fc2.\2"),
    ],
    "timm": [
        (r"patch_embed\.proj\.(weight|bias)", r"encoder.patch_embed.proj.\1"),
        (r"cls_token", "encoder.cls_token"),
        (r"pos_embed", "encoder.pos_embed"),
        (r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
         r"encoder.blocks.\1.\2.\3"),
    ],
}
# mmseg heads. SETRUPHead: norm, up_convs.{j}.0 (ConvModule; .1 is a parameter-free Upsample),
# conv_seg. SETRMLAHead: up_convs.{i}.{0,1} (two ConvModules). FCNHead(num_convs=0): conv_seg.
_UP_HEAD_RULES = [
    (r"decode_head\.norm\.(weight|bias)", r"decoder.norm.\1"),
    (r"decode_head\.up_convs\.(\d+)\.0\.(conv|bn)\.(.+)", r"decoder.convs.\1.\2.\3"),
    (r"decode_head\.conv_seg\.(weight|bias)", r"decoder.classifier.\1"),
    (r"auxiliary_head\.(\d+)\.norm\.(weight|bias)", r"aux_heads.\1.norm.\2"),
    (r"auxiliary_head\.(\d+)\.up_convs\.(\d+)\.0\.(conv|bn)\.(.+)", r"aux_heads.\1.convs.\2.\3.\4"),
    (r"auxiliary_head\.(\d+)\.conv_seg\.(weight|bias)", r"aux_heads.\1.classifier.\2"),
]
_MLA_HEAD_RULES = [
    (r"neck\.norm\.(\d+)\.(weight|bias)", r"neck.norms.\1.\2"),
    (r"neck\.mla\.channel_proj\.(\d+)\.(conv|bn)\.(.+)", r"neck.proj.\1.\2.\3"),
    (r"neck\.mla\.feat_extract\.(\d+)\.(conv|bn)\.(.+)", r"neck.extract.\1.\2.\3"),
    (r"decode_head\.up_convs\.(\d+)\.([01])\.(conv|bn)\.(.+)", r"decoder.branches.\1.\2.\3.\4"),
    (r"decode_head\.conv_seg\.(weight|bias)", r"decoder.classifier.\1"),
    (r"auxiliary_head\.(\d+)\.conv_seg\.(weight|bias)", r"aux_heads.\1.classifier.\2"),
]
# Known and deliberately unused: ImageNet classifiers, timm's final norm (SETR uses the raw block
# outputs: final_norm=False), DeiT's distillation token (its position entry is dropped too).
DROP = {
    "mmseg": [_B + r"(?:ln1|norm1)\.(weight|bias)", r"head\.(weight|bias)"],
    "timm": [r"norm\.(weight|bias)", r"fc_norm\.(weight|bias)", r"head\.(weight|bias)", r"head_dist\.(weight|bias)",
             r"pre_logits\.fc\.(weight|bias)", r"dist_token"],
    "fastseg": [],
}
FORMAT_NAMES = {
    "fastseg": "fastseg",
    "mmseg": "mmsegmentation SETR / ViT",
    "timm": "timm ViT (ImageNet)",
}


@dataclass
class SETRLoadReport:
    """What ``SETR.from_pretrained`` did, kept on the model as ``model.load_report``."""

    source: str
    format: str
    encoder: str | None
    decoder: str
    num_classes: int
    loaded: int = 0
    initialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"SETR-{self.decoder} ({self.encoder or 'custom ViT'}) from {self.source}",
            f"  format: {FORMAT_NAMES.get(self.format, self.format)}",
            f"  loaded {self.loaded} tensors; num_classes={self.num_classes}",
        ]
        if self.initialised:
            lines.append(f"  initialised (not in the checkpoint): {', '.join(self.initialised)}")
        if self.ignored:
            lines.append(f"  ignored checkpoint keys: {_preview(self.ignored)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --- reading ------------------------------------------------------------------------------------------

def _unwrap(obj, description: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint container (mmcv ``state_dict``, ``model``, DDP ``module.``)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{description} holds a {type(obj).__name__}, not a state dict")
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{description} contains no tensors (top-level keys: {_preview(map(str, obj))})")
    others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise CheckpointError(f"{description}: entries that are not tensors: {_preview(others)}")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def read_source(source) -> tuple[dict[str, torch.Tensor], str, dict | None]:
    """(tensors, description, fastseg config or None) from a file, a fastseg directory or a dict."""
    if isinstance(source, dict):
        return _unwrap(source, "the given state dict"), "state dict", None
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source must be a path or a state dict, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        if not (path / FASTSEG_CONFIG).exists():
            raise FileNotFoundError(f"{path} is a directory without {FASTSEG_CONFIG} (a fastseg SETR save)")
        config = read_json(path / FASTSEG_CONFIG)
        if config.get("architecture") != "SETR":
            raise CheckpointError(f"{path / FASTSEG_CONFIG} describes a {config.get('architecture')!r}, not a SETR")
        obj, _ = load_weights_file(path / WEIGHTS_FILE)
        return _unwrap(obj, str(path / WEIGHTS_FILE)), str(path), config.get("config")
    obj, metadata = load_weights_file(path)
    config = None
    if "fastseg_config" in metadata and metadata.get("architecture") == "SETR":
        config = json.loads(metadata["fastseg_config"])
    return _unwrap(obj, str(path)), str(path), config


# --- converting keys ---------------------------------------------------------------------------------

def detect_format(keys) -> str | None:
    keys = list(keys)

    def has(pattern):
        rx = re.compile(pattern)
        return any(rx.fullmatch(k) for k in keys)

    if has(r"encoder\.patch_embed\.proj\.weight") and has(r"encoder\.blocks\.\d+\.attn\.qkv\.weight"):
        return "fastseg"
    if has(_B + r"patch_embed\.projection\.weight") and has(_B + r"layers\.\d+\.attn\.attn\.in_proj_weight"):
        return "mmseg"
    if has(r"patch_embed\.proj\.weight") and has(r"blocks\.\d+\.attn\.qkv\.weight"):
        return "timm"
    return None


def head_kind(keys) -> str | None:
    """"mla", "up" (Naive / PUP) or None (no segmentation head) from mmseg / fastseg keys."""
    keys = list(keys)
    if any(re.match(r"(neck\.|decode_head\.up_convs\.\d+\.1\.conv\.|decoder\.branches\.)", k) for k in keys):
        return "mla"
    if any(re.match(r"(decode_head|decoder)\.", k) for k in keys):
        return "up"
    return None


def convert(state_dict: dict[str, torch.Tensor], fmt: str) -> tuple[dict, list[str], list[str]]:
    """Source keys → fastseg keys. Returns (converted, unexpected source keys, ignored source keys)."""
    if fmt == "fastseg":
        return dict(state_dict), [], []
    rules = list(_ENC_RULES[fmt])
    if fmt == "mmseg":
        rules += _MLA_HEAD_RULES if head_kind(state_dict) == "mla" else _UP_HEAD_RULES
    compiled = [(re.compile(p), r) for p, r in rules]
    drops = [re.compile(p) for p in DROP[fmt]]
    out, unexpected, ignored = {}, [], []
    for key, value in state_dict.items():
        if any(d.fullmatch(key) for d in drops):
            ignored.append(key)
            continue
        for rx, repl in compiled:
            m = rx.fullmatch(key)
            if m:
                out[m.expand(repl)] = value
                break
        else:
            unexpected.append(key)
    if fmt == "timm" and "dist_token" in state_dict and "encoder.pos_embed" in out:
        # DeiT-distilled: [cls, dist, grid…] position entries; SETR has no distillation token.
        pos = out["encoder.pos_embed"]
        out["encoder.pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    return out, unexpected, ignored


# --- inferring the architecture -------------------------------------------------------------------------

def _count(sd, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m[1]) for k in sd if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _missing_message(missing, unexpected, fmt) -> str:
    parts = [f"checkpoint does not fit SETR (read as {FORMAT_NAMES.get(fmt, fmt)} layout)"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    return "; ".join(parts)


def infer_config(sd: dict, fmt: str, *, decoder, num_classes, img_size, num_heads, out_indices):
    """(config, whether the weights include the segmentation heads, the stored position grid)."""
    from fastseg.models.setr import DECODERS, ENCODERS, SETRConfig

    proj = sd.get("encoder.patch_embed.proj.weight")
    pos = sd.get("encoder.pos_embed")
    if proj is None or pos is None or proj.ndim != 4 or pos.ndim != 3:
        missing = [k for k in ("encoder.patch_embed.proj.weight", "encoder.pos_embed") if k not in sd]
        raise CheckpointError(_missing_message(missing or ["a 4-d patch conv and a 3-d pos_embed"], [], fmt))
    dim, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = _count(sd, r"encoder\.blocks\.(\d+)\.")
    fc1 = sd.get("encoder.blocks.0.mlp.fc1.weight")
    if depth == 0 or fc1 is None:
        raise CheckpointError(_missing_message(["encoder.blocks.0.*"], [], fmt))
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
            f"(one of {list(DECODERS)}) to build the heads for it")
    if decoder not in DECODERS:
        raise ValueError(f"unknown SETR decoder {decoder!r}; choose one of {list(DECODERS)}")

    head = {}
    if has_head:
        classifier = sd.get("decoder.classifier.weight")
        if classifier is None:
            raise CheckpointError(_missing_message(["decoder.classifier.weight"], [], fmt))
        head["num_classes"] = int(classifier.shape[0])
        n_aux = _count(sd, r"aux_heads\.(\d+)\.")
        head["aux_in_index"] = tuple(range(n_aux))
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

    encoder = next((name for name, spec in ENCODERS.items() if spec == (dim, depth, num_heads)), None)
    cfg = SETRConfig(
        decoder=decoder,
        encoder=encoder,
        img_size=img_size if img_size is not None else (stored_grid[0] * patch, stored_grid[1] * patch),
        patch_size=patch,
        in_channels=in_channels,
        embed_dim=dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=fc1.shape[0] // dim,
        out_indices=tuple(out_indices) if out_indices is not None else None,
        **head,
    )
    return cfg, has_head, stored_grid


# --- building the model ----------------------------------------------------------------------------------

def load_setr(cls, source, num_classes=None, decoder=None, img_size=None, num_heads=None, out_indices=None,
              fused=False, strict=True):
    from fastseg.models.setr import SETRConfig, resize_pos_embed

    state, description, saved_config = read_source(source)
    fmt = "fastseg" if saved_config is not None else detect_format(state)
    if fmt is None:
        expected = list(cls(config=SETRConfig(embed_dim=64, depth=4, num_heads=1, num_classes=1)).state_dict())
        raise CheckpointError(
            f"{description}: not a SETR checkpoint in any known layout (fastseg, mmseg SETR/ViT, timm ViT); "
            + _missing_message(expected, list(state), "fastseg").split("; ", 1)[1])
    sd, unexpected, ignored = convert(state, fmt)
    if saved_config is not None:
        cfg = SETRConfig.from_dict(saved_config)
        if decoder is not None and decoder != cfg.decoder:
            raise CheckpointError(f"the checkpoint has a {cfg.decoder!r} decoder but decoder={decoder!r} was asked for")
        has_head, stored_grid = True, cfg.grid
        if img_size is not None:
            cfg = cfg.replace(img_size=img_size)
        if out_indices is not None:
            cfg = cfg.replace(out_indices=tuple(out_indices))
    else:
        cfg, has_head, stored_grid = infer_config(sd, fmt, decoder=decoder, num_classes=num_classes,
                                                  img_size=img_size, num_heads=num_heads, out_indices=out_indices)
    report = SETRLoadReport(description, fmt, cfg.encoder, cfg.decoder, cfg.num_classes, ignored=ignored)

    checkpoint_classes = cfg.num_classes
    reinit_classifiers = has_head and num_classes is not None and num_classes != checkpoint_classes
    if num_classes is not None:
        cfg = cfg.replace(num_classes=num_classes)
        report.num_classes = num_classes
    model = cls(config=cfg, fused=fused)

    if "encoder.pos_embed" in sd and stored_grid != cfg.grid:
        sd["encoder.pos_embed"] = resize_pos_embed(sd["encoder.pos_embed"].float(), stored_grid, cfg.grid).to(
            sd["encoder.pos_embed"].dtype)
        report.notes.append(f"position embedding resized from a {stored_grid[0]}x{stored_grid[1]} grid to "
                            f"{cfg.grid[0]}x{cfg.grid[1]} (img_size {cfg.img_size[0]}x{cfg.img_size[1]})")

    head_prefixes = ("decoder.", "neck.", "aux_heads.")
    if not has_head:
        report.initialised.append("neck, decoder and auxiliary heads (official initialisation)")
        report.notes.append("encoder-only checkpoint: the heads are newly initialised and must be trained")
        warnings.warn(f"{description}: encoder-only checkpoint, SETR-{cfg.decoder} heads initialised from scratch",
                      stacklevel=3)
    if reinit_classifiers:
        sd = {k: v for k, v in sd.items() if not _is_classifier(k)}
        report.initialised.append("decoder.classifier and aux_heads.*.classifier")
        msg = (f"the checkpoint's classifiers have {checkpoint_classes} classes but num_classes={num_classes}: "
               "the classifiers are re-initialised and must be trained")
        report.notes.append(msg)
        warnings.warn(msg, stacklevel=3)

    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    missing = [k for k in missing if not ((not has_head and k.startswith(head_prefixes))
                                          or (reinit_classifiers and _is_classifier(k)))]
    extra = [k for k in sd if k not in expected]
    wrong_shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if wrong_shape:
        raise CheckpointError(f"{description}: tensors with the wrong shape: {_preview(wrong_shape, 6)}")
    if strict and (missing or unexpected or extra):
        raise CheckpointError(f"{description}: " + _missing_message(missing, unexpected + extra, fmt))
    if missing or unexpected or extra:
        report.notes.append(_missing_message(missing, unexpected + extra, fmt))

    with torch.no_grad():
        for key, value in sd.items():
            if key in expected:
                expected[key].copy_(value)
    report.loaded = sum(1 for k in sd if k in expected)
    model.load_report = report
    return model


def _is_classifier(key: str) -> bool:
    return bool(re.fullmatch(r"(decoder|aux_heads\.\d+)\.classifier\.(weight|bias)", key))


def save_setr(model, directory) -> None:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    config = model.config.to_dict()
    state = dict(model.state_dict())
    save_safetensors_atomic(state, directory / WEIGHTS_FILE,
                            {"fastseg_config": json.dumps(config), "architecture": "SETR"})
    save_json_atomic({"format": "fastseg", "architecture": "SETR", "config": config}, directory / FASTSEG_CONFIG)
