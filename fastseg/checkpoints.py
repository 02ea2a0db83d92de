"""Loading the SegFormer checkpoints people already have, and saving our own.

Formats (detected from the keys, never from the file name):

==============  ==========================================================================
``fastseg``     what :meth:`SegFormer.save_pretrained` writes (safetensors + config)
``nvlabs``      the official NVlabs/SegFormer code (built on mmseg-0.x): ``backbone.patch_embed1``,
                ``backbone.block1.0.attn.q``/``kv``, ``decode_head.linear_c4``/``linear_fuse``/
                ``linear_pred``; also the ImageNet-pretrained ``mit_b*.pth`` backbones (no prefix)
``hf_legacy``   HuggingFace hub files (``segformer.encoder.block.0.0.attention.self.query``…), which
                is also what ``transformers`` writes with ``save_pretrained``
``hf``          the module names of the current ``transformers`` release
                (``segformer.stages.0.blocks.0.attention.q_proj``…), i.e. a live ``state_dict()``
``mmseg``       mmsegmentation's ``MixVisionTransformer`` (v0.17+ and 1.x): ``backbone.layers.0.0.
                projection``, ``attn.attn.in_proj_weight``, ``ffn.layers.0``; with its
                ``SegformerHead`` (``decode_head.convs``/``fusion_conv``/``conv_seg``)
==============  ==========================================================================

Each source computes with its own LayerNorm eps; the loaded model uses the same (see
:data:`fastseg.models.config.NORM_EPS`).
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastseg.io import (
    CheckpointError,
    load_weights_file,
    read_json,
    save_json_atomic,
    save_safetensors_atomic,
)
from fastseg.models.config import NORM_EPS, VARIANTS, SegFormerConfig, variant_of

FASTSEG_CONFIG = "fastseg_config.json"
WEIGHTS_FILE = "model.safetensors"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# Rename rules per format: (pattern over the whole source key, our key). ``attn.k``/``attn.v``
# are merged into ``attn.kv`` and ``attn.in_proj`` is split into ``attn.q`` + ``attn.kv`` after
# renaming. Keys matching a format's ``DROP`` patterns are known and deliberately unused.
_S = r"encoder.stages.\1"
_HEAD_RULES = [
    # NVlabs All-MLP head
    (r"decode_head\.linear_c(\d)\.proj\.(weight|bias)", lambda m: f"decoder.linear_c.{int(m[1]) - 1}.{m[2]}"),
    (r"decode_head\.linear_fuse\.conv\.weight", "decoder.linear_fuse.weight"),
    (r"decode_head\.linear_fuse\.bn\.(.+)", r"decoder.bn.\1"),
    (r"decode_head\.linear_pred\.(weight|bias)", r"decoder.classifier.\1"),
    # mmseg SegformerHead
    (r"decode_head\.convs\.(\d)\.(conv|bn)\.(.+)", r"decoder.convs.\1.\2.\3"),
    (r"decode_head\.fusion_conv\.(conv|bn)\.(.+)", r"decoder.fusion_conv.\1.\2"),
    (r"decode_head\.conv_seg\.(weight|bias)", r"decoder.classifier.\1"),
]
RULES = {
    "nvlabs": [
        (r"(?:backbone\.)?patch_embed(\d)\.(proj|norm)\.(.+)",
         lambda m: f"encoder.stages.{int(m[1]) - 1}.patch_embed.{m[2]}.{m[3]}"),
        (r"(?:backbone\.)?block(\d)\.(\d+)\.(norm1|norm2|attn\.q|attn\.kv|attn\.proj|attn\.sr|attn\.norm|mlp\.fc1|mlp\.fc2)\.(.+)",
         lambda m: f"encoder.stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}.{m[4]}"),
        (r"(?:backbone\.)?block(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.(.+)",
         lambda m: f"encoder.stages.{int(m[1]) - 1}.blocks.{m[2]}.mlp.dwconv.{m[3]}"),
        (r"(?:backbone\.)?norm(\d)\.(weight|bias)", lambda m: f"encoder.stages.{int(m[1]) - 1}.norm.{m[2]}"),
        *_HEAD_RULES,
    ],
    "hf_legacy": [
        (r"(?:segformer\.)?encoder\.patch_embeddings\.(\d)\.proj\.(.+)", _S + r".patch_embed.proj.\2"),
        (r"(?:segformer\.)?encoder\.patch_embeddings\.(\d)\.layer_norm\.(.+)", _S + r".patch_embed.norm.\2"),
        (r"(?:segformer\.)?encoder\.block\.(\d)\.(\d+)\.layer_norm_1\.(.+)", _S + r".blocks.\2.norm1.\3"),
        (r"(?:segformer\.)?encoder\.block\.(\d)\.(\d+)\.layer_norm_2\.(.+)", _S + r".blocks.\2.norm2.\3"),
        (r"(?:segformer\.)?encoder\.block\.(\d)\.(\d+)\.attention\.self\.query\.(.+)", _S + r".blocks.\2.attn.q.\3"),
        (r"(?:segformer\.)?encoder\.block\.(\d)\.(\d+)\.attention\.self\.key\.(.+)", _S + r".blocks.\2.attn.k.\3"),
        (r"(?:segformer\.)?encoder\.block\.(\d)\.(\d+)\.attention\.self\.value\.(.+)", _S + r".blocks.\2.attn.v.\3"),
        (r"(?:segformer\.)?encoder\.block\.(\d)\.(\d+)\.attention\.self\.sr\.(.+)", _S + r".blocks.\2.attn.sr.\3"),
        (r"(?:segformer\.)?encoder\.block\.(\d)\.(\d+)\.attention\.self\.layer_norm\.(.+)", _S + r".blocks.\2.attn.norm.\3"),
        (r"(?:segformer\.)?encoder\.block\.(\d)\.(\d+)\.attention\.output\.dense\.(.+)", _S + r".blocks.\2.attn.proj.\3"),
        (r"(?:segformer\.)?encoder\.block\.(\d)\.(\d+)\.mlp\.dense1\.(.+)", _S + r".blocks.\2.mlp.fc1.\3"),
        (r"(?:segformer\.)?encoder\.block\.(\d)\.(\d+)\.mlp\.dense2\.(.+)", _S + r".blocks.\2.mlp.fc2.\3"),
        (r"(?:segformer\.)?encoder\.block\.(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.(.+)", _S + r".blocks.\2.mlp.dwconv.\3"),
        (r"(?:segformer\.)?encoder\.layer_norm\.(\d)\.(.+)", _S + r".norm.\2"),
        (r"decode_head\.linear_c\.(\d)\.proj\.(.+)", r"decoder.linear_c.\1.\2"),
        (r"decode_head\.linear_fuse\.weight", "decoder.linear_fuse.weight"),
        (r"decode_head\.batch_norm\.(.+)", r"decoder.bn.\1"),
        (r"decode_head\.classifier\.(.+)", r"decoder.classifier.\1"),
    ],
    "hf": [
        (r"(?:segformer\.)?stages\.(\d)\.patch_embeddings\.proj\.(.+)", _S + r".patch_embed.proj.\2"),
        (r"(?:segformer\.)?stages\.(\d)\.patch_embeddings\.layer_norm\.(.+)", _S + r".patch_embed.norm.\2"),
        (r"(?:segformer\.)?stages\.(\d)\.blocks\.(\d+)\.layernorm_before\.(.+)", _S + r".blocks.\2.norm1.\3"),
        (r"(?:segformer\.)?stages\.(\d)\.blocks\.(\d+)\.layernorm_after\.(.+)", _S + r".blocks.\2.norm2.\3"),
        (r"(?:segformer\.)?stages\.(\d)\.blocks\.(\d+)\.attention\.q_proj\.(.+)", _S + r".blocks.\2.attn.q.\3"),
        (r"(?:segformer\.)?stages\.(\d)\.blocks\.(\d+)\.attention\.k_proj\.(.+)", _S + r".blocks.\2.attn.k.\3"),
        (r"(?:segformer\.)?stages\.(\d)\.blocks\.(\d+)\.attention\.v_proj\.(.+)", _S + r".blocks.\2.attn.v.\3"),
        (r"(?:segformer\.)?stages\.(\d)\.blocks\.(\d+)\.attention\.o_proj\.(.+)", _S + r".blocks.\2.attn.proj.\3"),
        (r"(?:segformer\.)?stages\.(\d)\.blocks\.(\d+)\.attention\.sequence_reduction\.sequence_reduction\.(.+)",
         _S + r".blocks.\2.attn.sr.\3"),
        (r"(?:segformer\.)?stages\.(\d)\.blocks\.(\d+)\.attention\.sequence_reduction\.layer_norm\.(.+)",
         _S + r".blocks.\2.attn.norm.\3"),
        (r"(?:segformer\.)?stages\.(\d)\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(.+)", _S + r".blocks.\2.mlp.\3.\4"),
        (r"(?:segformer\.)?stages\.(\d)\.blocks\.(\d+)\.mlp\.dwconv\.dwconv\.(.+)", _S + r".blocks.\2.mlp.dwconv.\3"),
        (r"(?:segformer\.)?stages\.(\d)\.layer_norm\.(.+)", _S + r".norm.\2"),
        (r"decode_head\.linear_projections\.(\d)\.proj\.(.+)", r"decoder.linear_c.\1.\2"),
        (r"decode_head\.linear_fuse\.weight", "decoder.linear_fuse.weight"),
        (r"decode_head\.batch_norm\.(.+)", r"decoder.bn.\1"),
        (r"decode_head\.classifier\.(.+)", r"decoder.classifier.\1"),
    ],
    "mmseg": [
        (r"(?:backbone\.)?layers\.(\d)\.0\.projection\.(.+)", _S + r".patch_embed.proj.\2"),
        (r"(?:backbone\.)?layers\.(\d)\.0\.norm\.(.+)", _S + r".patch_embed.norm.\2"),
        (r"(?:backbone\.)?layers\.(\d)\.1\.(\d+)\.(norm1|norm2)\.(.+)", _S + r".blocks.\2.\3.\4"),
        (r"(?:backbone\.)?layers\.(\d)\.1\.(\d+)\.attn\.attn\.in_proj_(weight|bias)", _S + r".blocks.\2.attn.in_proj.\3"),
        (r"(?:backbone\.)?layers\.(\d)\.1\.(\d+)\.attn\.attn\.out_proj\.(.+)", _S + r".blocks.\2.attn.proj.\3"),
        (r"(?:backbone\.)?layers\.(\d)\.1\.(\d+)\.attn\.(sr|norm)\.(.+)", _S + r".blocks.\2.attn.\3.\4"),
        (r"(?:backbone\.)?layers\.(\d)\.1\.(\d+)\.ffn\.layers\.0\.(.+)", _S + r".blocks.\2.mlp.fc1.\3"),
        (r"(?:backbone\.)?layers\.(\d)\.1\.(\d+)\.ffn\.layers\.1\.(.+)", _S + r".blocks.\2.mlp.dwconv.\3"),
        (r"(?:backbone\.)?layers\.(\d)\.1\.(\d+)\.ffn\.layers\.4\.(.+)", _S + r".blocks.\2.mlp.fc2.\3"),
        (r"(?:backbone\.)?layers\.(\d)\.2\.(weight|bias)", _S + r".norm.\2"),
        *_HEAD_RULES,
    ],
    "fastseg": [(r"((?:encoder|decoder)\..+)", r"\1")],
}
DROP = {
    # ImageNet classification heads of backbone checkpoints.
    "nvlabs": [r"head\.(weight|bias)"],
    "hf_legacy": [r"classifier\.(weight|bias)"],
    "hf": [r"classifier\.(weight|bias)"],
    "mmseg": [r"head\.(weight|bias)"],
    "fastseg": [],
}
FORMAT_NAMES = {
    "fastseg": "fastseg",
    "nvlabs": "NVlabs / mmseg-0.x SegFormer",
    "hf_legacy": "HuggingFace (hub file names)",
    "hf": "HuggingFace (current transformers module names)",
    "mmseg": "mmsegmentation MixVisionTransformer (mmseg>=0.17 / 1.x)",
}
# A bare fastseg state dict (no saved config) gets the official eps, our default.
EPS_OF_FORMAT = {"fastseg": "nvlabs", "nvlabs": "nvlabs", "hf_legacy": "hf", "hf": "hf", "mmseg": "mmseg"}

_COMPILED = {
    fmt: [(re.compile(p), r) for p, r in rules] for fmt, rules in RULES.items()
}


@dataclass
class LoadReport:
    """What ``from_pretrained`` did, kept on the model as ``model.load_report``."""

    source: str
    format: str
    variant: str | None
    num_classes: int
    decoder: str
    loaded: int = 0
    initialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"SegFormer-{self.variant or 'custom'} from {self.source}",
            f"  format: {FORMAT_NAMES.get(self.format, self.format)}",
            f"  loaded {self.loaded} tensors; decoder={self.decoder}; num_classes={self.num_classes}",
        ]
        if self.initialised:
            lines.append(f"  initialised (not in the checkpoint): {', '.join(self.initialised)}")
        if self.ignored:
            lines.append(f"  ignored checkpoint keys: {_preview(self.ignored)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _preview(keys, limit: int = 12) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --- reading the source -------------------------------------------------------------------------

@dataclass
class _Source:
    state_dict: dict[str, torch.Tensor]
    description: str
    hf_config: dict | None = None
    fastseg_config: dict | None = None


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


def _read_hf_directory(directory: Path) -> _Source:
    config = read_json(directory / "config.json")
    if config.get("model_type") != "segformer":
        raise CheckpointError(
            f"{directory}/config.json describes model_type={config.get('model_type')!r}, not 'segformer'"
        )
    for name in HF_WEIGHT_FILES:
        if (directory / name).exists():
            obj, _ = load_weights_file(directory / name)
            return _Source(_unwrap(obj, str(directory / name)), str(directory), hf_config=config)
    for name in HF_INDEX_FILES:
        if (directory / name).exists():
            weight_map = read_json(directory / name).get("weight_map", {})
            tensors = {}
            for shard in sorted(set(weight_map.values())):
                obj, _ = load_weights_file(directory / shard)
                tensors.update(_unwrap(obj, str(directory / shard)))
            return _Source(tensors, str(directory), hf_config=config)
    raise FileNotFoundError(f"{directory} has a config.json but no weights ({', '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)})")


def read_source(source) -> _Source:
    """Tensors (plus any config) from a file, a directory or an in-memory state dict."""
    if isinstance(source, dict):
        return _Source(_unwrap(source, "the given state dict"), "state dict")
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source must be a path or a state dict, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        if (path / FASTSEG_CONFIG).exists():
            config = read_json(path / FASTSEG_CONFIG)
            obj, _ = load_weights_file(path / WEIGHTS_FILE)
            return _Source(_unwrap(obj, str(path / WEIGHTS_FILE)), str(path), fastseg_config=config.get("config"))
        if (path / "config.json").exists():
            return _read_hf_directory(path)
        raise FileNotFoundError(
            f"{path} is a directory without {FASTSEG_CONFIG} (fastseg) or config.json (HuggingFace)"
        )
    obj, metadata = load_weights_file(path)
    config = json.loads(metadata["fastseg_config"]) if "fastseg_config" in metadata else None
    return _Source(_unwrap(obj, str(path)), str(path), fastseg_config=config)


# --- converting keys ------------------------------------------------------------------------------

def detect_format(keys) -> str | None:
    keys = list(keys)

    def has(pattern):
        rx = re.compile(pattern)
        return any(rx.match(k) for k in keys)

    if has(r"encoder\.stages\.\d\.patch_embed\."):
        return "fastseg"
    if has(r"(segformer\.)?stages\.\d\.patch_embeddings\."):
        return "hf"
    if has(r"(segformer\.)?encoder\.(patch_embeddings|block)\."):
        return "hf_legacy"
    if has(r"(backbone\.)?layers\.\d\.0\.projection\."):
        return "mmseg"
    if has(r"(backbone\.)?patch_embed\d\.proj\."):
        return "nvlabs"
    return None


def convert(state_dict: dict[str, torch.Tensor], fmt: str) -> tuple[dict, list[str], list[str]]:
    """Source keys → fastseg keys. Returns (converted, unexpected source keys, ignored source keys)."""
    out, unexpected, ignored = {}, [], []
    drops = [re.compile(p) for p in DROP[fmt]]
    if any(k.startswith("decode_head.linear_pred.") for k in state_dict):
        # NVlabs checkpoints carry mmseg's unused ``conv_seg`` beside the real ``linear_pred``.
        drops.append(re.compile(r"decode_head\.conv_seg\..+"))
    for key, value in state_dict.items():
        if any(d.fullmatch(key) for d in drops):
            ignored.append(key)
            continue
        for rx, repl in _COMPILED[fmt]:
            m = rx.fullmatch(key)
            if m:
                out[repl(m) if callable(repl) else m.expand(repl)] = value
                break
        else:
            unexpected.append(key)
    _merge_attention(out)
    for key in [k for k in out if re.search(r"mlp\.fc[12]\.weight$", k) and out[k].ndim == 4]:
        out[key] = out[key].flatten(1)  # mmseg's MixFFN uses 1×1 convs where the others use Linears
    return out, unexpected, ignored


def _merge_attention(sd: dict) -> None:
    """k + v → kv (HF); in_proj = [q; k; v] → q, kv (mmseg / nn.MultiheadAttention)."""
    for key in [k for k in sd if re.search(r"\.attn\.k\.(weight|bias)$", k)]:
        vkey = key.replace(".attn.k.", ".attn.v.")
        if vkey in sd:
            sd[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([sd.pop(key), sd.pop(vkey)], dim=0)
    for key in [k for k in sd if re.search(r"\.attn\.in_proj\.(weight|bias)$", k)]:
        packed = sd.pop(key)
        dim = packed.shape[0] // 3
        sd[key.replace(".in_proj.", ".q.")] = packed[:dim]
        sd[key.replace(".in_proj.", ".kv.")] = packed[dim:]


# --- inferring the architecture from the weights -----------------------------------------------

def infer_config(sd: dict, fmt: str, hf_config: dict | None, decoder: str | None) -> tuple[SegFormerConfig, bool]:
    """The configuration these weights were trained with; and whether they include a decoder."""
    dims, depths, sr_ratios, mlp_ratios = [], [], [], []
    for i in range(4):
        proj = sd.get(f"encoder.stages.{i}.patch_embed.proj.weight")
        if proj is None:
            raise CheckpointError(_missing_message([f"encoder.stages.{i}.patch_embed.proj.weight"], [], fmt))
        want_kernel = 7 if i == 0 else 3
        if proj.ndim != 4 or proj.shape[-1] != want_kernel:
            raise CheckpointError(
                f"stage {i + 1} patch embedding has kernel {tuple(proj.shape[2:])}; SegFormer uses "
                f"{want_kernel}x{want_kernel} (weight shape {tuple(proj.shape)})"
            )
        dims.append(proj.shape[0])
        blocks = {int(m[1]) for k in sd if (m := re.match(rf"encoder\.stages\.{i}\.blocks\.(\d+)\.", k))}
        depths.append(max(blocks) + 1 if blocks else 0)
        sr = sd.get(f"encoder.stages.{i}.blocks.0.attn.sr.weight")
        sr_ratios.append(sr.shape[-1] if sr is not None else 1)
        fc1 = sd.get(f"encoder.stages.{i}.blocks.0.mlp.fc1.weight")
        if fc1 is not None:
            mlp_ratios.append(fc1.shape[0] // proj.shape[0])
    if len(set(mlp_ratios)) > 1:
        raise CheckpointError(f"stages use different MLP ratios {mlp_ratios}; fastseg supports one ratio")
    in_channels = sd["encoder.stages.0.patch_embed.proj.weight"].shape[1]

    has_mlp_head = "decoder.linear_fuse.weight" in sd
    has_mmseg_head = "decoder.fusion_conv.conv.weight" in sd
    head = "mlp" if has_mlp_head else "mmseg" if has_mmseg_head else None
    if head and decoder and decoder != head:
        raise CheckpointError(
            f"the checkpoint has a {head!r} decoder but decoder={decoder!r} was asked for; omit decoder= "
            "to use the checkpoint's own head"
        )
    variant = variant_of(dims, depths)
    if has_mlp_head:
        decoder_dim = sd["decoder.linear_fuse.weight"].shape[0]
    elif has_mmseg_head:
        decoder_dim = sd["decoder.fusion_conv.conv.weight"].shape[0]
    elif hf_config and "decoder_hidden_size" in hf_config:
        decoder_dim = int(hf_config["decoder_hidden_size"])
    else:
        decoder_dim = VARIANTS[variant][2] if variant else (256 if dims[0] < 64 else 768)
    classifier = sd.get("decoder.classifier.weight")
    num_heads = (1, 2, 5, 8)
    if hf_config and "num_attention_heads" in hf_config:
        num_heads = tuple(int(h) for h in hf_config["num_attention_heads"])
    cfg = SegFormerConfig(
        num_classes=int(classifier.shape[0]) if classifier is not None else 1,
        embed_dims=tuple(dims),
        depths=tuple(depths),
        num_heads=num_heads,
        sr_ratios=tuple(sr_ratios),
        mlp_ratio=mlp_ratios[0] if mlp_ratios else 4,
        decoder_dim=decoder_dim,
        decoder=head or decoder or "mlp",
        in_channels=in_channels,
        norm_eps=NORM_EPS[EPS_OF_FORMAT[fmt]],
        variant=variant,
    )
    return cfg, head is not None


def _missing_message(missing, unexpected, fmt) -> str:
    parts = [f"checkpoint does not fit SegFormer (read as {FORMAT_NAMES.get(fmt, fmt)} layout)"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    return "; ".join(parts)


# --- building the model -----------------------------------------------------------------------------

def load_segformer(cls, source, num_classes=None, fused=False, decoder=None, strict=True, _hf_config=None):
    src = read_source(source)
    hf_config = _hf_config or src.hf_config
    fmt = "fastseg" if src.fastseg_config is not None else detect_format(src.state_dict)
    if fmt is None:
        from fastseg.models.segformer import SegFormer  # expected keys of a plain B0, for the message

        expected = list(SegFormer("b0", num_classes=1).state_dict())
        raise CheckpointError(
            "not a SegFormer checkpoint in any known layout (fastseg, NVlabs/mmseg-0.x, HuggingFace, "
            "mmseg MiT); " + _missing_message(expected, list(src.state_dict), "fastseg").split("; ", 1)[1]
        )
    sd, unexpected, ignored = convert(src.state_dict, fmt)
    if src.fastseg_config is not None:
        cfg = SegFormerConfig.from_dict(src.fastseg_config)
        has_head = True
    else:
        cfg, has_head = infer_config(sd, fmt, hf_config, decoder)
    report = LoadReport(src.description, fmt, cfg.variant, cfg.num_classes, cfg.decoder, ignored=ignored)

    if not has_head:
        if num_classes is None:
            raise ValueError(
                f"{src.description} holds an encoder only (no segmentation head); pass num_classes= "
                "to build a head for it"
            )
        report.initialised.append("decoder (official initialisation)")
        report.notes.append("encoder-only checkpoint: the decoder is newly initialised and must be trained")
    reinit_classifier = has_head and num_classes is not None and num_classes != cfg.num_classes
    checkpoint_classes = cfg.num_classes
    if num_classes is not None:
        cfg = cfg.replace(num_classes=num_classes)
        report.num_classes = num_classes

    model = cls(config=cfg, fused=fused)
    if reinit_classifier:
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder.classifier.")}
        report.initialised.append("decoder.classifier")
        msg = (f"the checkpoint's classifier has {checkpoint_classes} classes but num_classes={num_classes}: the classifier is re-initialised and must be trained")
        report.notes.append(msg)
        warnings.warn(msg, stacklevel=3)
    elif not has_head:
        warnings.warn(f"{src.description}: encoder-only checkpoint, decoder initialised from scratch", stacklevel=3)

    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    allowed_missing = [k for k in missing if (not has_head and k.startswith("decoder.")) or
                       (reinit_classifier and k.startswith("decoder.classifier."))]
    missing = [k for k in missing if k not in allowed_missing]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # HF/mmcv may omit it
    extra = [k for k in sd if k not in expected]
    wrong_shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if wrong_shape:
        raise CheckpointError(f"{src.description}: tensors with the wrong shape: {_preview(wrong_shape, 6)}")
    if strict and (missing or unexpected or extra):
        raise CheckpointError(f"{src.description}: " + _missing_message(missing, unexpected + extra, fmt))
    if missing or unexpected or extra:
        report.notes.append(_missing_message(missing, unexpected + extra, fmt))

    with torch.no_grad():
        for key, value in sd.items():
            if key in expected:
                expected[key].copy_(value)
    report.loaded = sum(1 for k in sd if k in expected)
    model.load_report = report
    return model


def load_segformer_from_hf(cls, hf_model, num_classes=None, fused=False):
    """A live ``transformers`` Segformer (``…ForSemanticSegmentation``, ``…Model`` or ``…ForImageClassification``)."""
    config = getattr(hf_model, "config", None)
    if config is None or getattr(config, "model_type", None) != "segformer":
        raise TypeError(f"expected a transformers Segformer model, got {type(hf_model).__name__}")
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    model = load_segformer(cls, state, num_classes=num_classes, fused=fused, _hf_config=config.to_dict())
    model.load_report.source = f"transformers {type(hf_model).__name__}"
    return model


def save_segformer(model, directory) -> None:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    config = model.config.to_dict()
    state = {k: v for k, v in model.state_dict().items()}
    save_safetensors_atomic(state, directory / WEIGHTS_FILE, {"fastseg_config": json.dumps(config)})
    save_json_atomic({"format": "fastseg", "architecture": "SegFormer", "config": config}, directory / FASTSEG_CONFIG)
