"""What every format module shares: the renaming table, the source reader, the report, the writers.

Nothing here knows a model class: the format modules turn foreign keys into fastseg's parameter
names and back, and the family builders (:mod:`._segformer`, :mod:`._setr`) receive the model class
from the model itself. The dependency runs one way, models → checkpoints.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastseg.version import __version__
from fastseg.io import (
    CheckpointError,
    atomic_directory,
    atomic_write,
    load_weights_file,
    read_json,
    recover,
    save_json_atomic,
    save_safetensors_atomic,
)

FASTSEG_CONFIG = "fastseg_config.json"
WEIGHTS_FILE = "model.safetensors"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Files of a model folder (any format fastseg writes or reads) that a new save into the folder
# supersedes even where it does not write them; anything else there is the user's and is kept.
MODEL_FILE_PATTERNS = (FASTSEG_CONFIG, "config.json", *HF_WEIGHT_FILES, *HF_INDEX_FILES,
                       "model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")


class ConversionError(CheckpointError):
    """A model that the target format cannot represent faithfully, with the reason."""


def preview(keys, limit: int = 12) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --- renaming ---------------------------------------------------------------------------------------

class Rules:
    """An ordered table of (regex over a whole key, replacement) pairs; the first match wins.

    A replacement is a ``re`` template (``r"encoder.stages.\\1"``) or a function of the match.
    """

    def __init__(self, rules, drop=()):
        self.rules = [(re.compile(p), r) for p, r in rules]
        self.drop = [re.compile(p) for p in drop]

    def apply(self, state: dict, origin: dict | None = None) -> tuple[dict, list[str], list[str]]:
        """(renamed, unexpected source keys, ignored source keys); ``origin`` collects new key → source key."""
        out, unexpected, ignored = {}, [], []
        for key, value in state.items():
            if any(d.fullmatch(key) for d in self.drop):
                ignored.append(key)
                continue
            for rx, repl in self.rules:
                m = rx.fullmatch(key)
                if m:
                    new = repl(m) if callable(repl) else m.expand(repl)
                    out[new] = value
                    if origin is not None:
                        origin[new] = key
                    break
            else:
                unexpected.append(key)
        return out, unexpected, ignored


def has_key(keys, pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.fullmatch(k) for k in keys)


@dataclass
class Converted:
    """A format module's ``to_fastseg`` result."""

    state_dict: dict[str, torch.Tensor]
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Architecture facts the weights cannot tell (e.g. HF config.json's head counts), and the
    # LayerNorm eps the source's own code computes with.
    hints: dict = field(default_factory=dict)
    # fastseg key → the checkpoint's own key(s) it came from, for error messages
    origin: dict = field(default_factory=dict)


# --- the report -------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What ``from_pretrained`` did, kept on the model as ``model.load_report`` (SegFormer and SETR)."""

    model: str
    source: str
    format: str
    format_title: str
    num_classes: int
    decoder: str
    variant: str | None = None  # SegFormer: b0…b5, None for custom sizes
    encoder: str | None = None  # SETR: vit_*_patch16, None for a custom ViT
    loaded: int = 0
    output: str = ""
    initialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.model == "SETR":
            head = f"SETR-{self.decoder} ({self.encoder or 'custom ViT'})"
            body = f"num_classes={self.num_classes}"
        else:
            head = f"SegFormer-{self.variant or 'custom'}"
            body = f"decoder={self.decoder}; num_classes={self.num_classes}"
        lines = [f"{head} from {self.source}", f"  format: {self.format_title}",
                 f"  loaded {self.loaded} tensors; {body}"]
        if self.output:
            lines.append(f"  output: {self.output}")
        if self.initialised:
            lines.append(f"  initialised (not in the checkpoint): {', '.join(self.initialised)}")
        if self.ignored:
            lines.append(f"  ignored checkpoint keys: {preview(self.ignored)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def missing_message(model: str, missing, unexpected, title: str) -> str:
    parts = [f"checkpoint does not fit {model} (read as {title} layout)"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {preview(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {preview(unexpected)}")
    return "; ".join(parts)


def check_fit(model_name: str, description: str, sd: dict, expected: dict, allowed_missing, unexpected,
              title: str, strict: bool, notes: list[str], origin: dict | None = None) -> None:
    """Compare converted tensors with the model's; raise on wrong shapes (naming the checkpoint's key,
    fastseg's key and both shapes) and, when ``strict``, on missing or unexpected keys."""
    origin = origin or {}

    def name(k):
        return f"{origin[k]} (fastseg {k})" if origin.get(k, k) != k else k

    wrong = [f"{name(k)}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{description}: tensors with the wrong shape: {preview(wrong, 6)}")
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")
               and not allowed_missing(k)]
    extra = unexpected + [k for k in sd if k not in expected]
    if strict and (missing or extra):
        raise CheckpointError(f"{description}: " + missing_message(model_name, missing, extra, title))
    if missing or extra:
        notes.append(missing_message(model_name, missing, extra, title))


def note_nonfinite(description: str, sd: dict, expected: dict, notes: list[str], origin: dict | None = None) -> None:
    """Tensors with NaN or Inf load as they are (the reference computes with them as well), but
    never silently: a note in the load report and one warning naming them. Such a model's
    logits are NaN wherever those weights reach, in every backend."""
    bad = [k for k, v in sd.items()
           if k in expected and isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if not bad:
        return
    origin = origin or {}
    names = [f"{origin[k]} (fastseg {k})" if origin.get(k, k) != k else k for k in bad]
    msg = f"{len(bad)} tensor(s) hold NaN or Inf values: {preview(names, 5)}"
    notes.append(msg)
    # stacklevel: this function, load(), load_pretrained(), from_pretrained(), the caller
    warnings.warn(f"{description}: {msg}; the model's outputs will be NaN/Inf", RuntimeWarning, stacklevel=5)


def copy_into(model: torch.nn.Module, sd: dict) -> int:
    expected = model.state_dict()
    with torch.no_grad():
        for key, value in sd.items():
            if key in expected:
                expected[key].copy_(value)
    return sum(1 for k in sd if k in expected)


def skeleton(cls, config, fused: bool):
    """(model, on_meta): the model built on the meta device (no memory, no random initialisation),
    or, where its constructor cannot run there, built normally. Its ``state_dict()`` gives the
    expected names and shapes either way."""
    try:
        with torch.device("meta"):
            return cls(config=config, fused=fused), True
    except Exception:  # e.g. a constructor that reads a tensor's values
        return cls(config=config, fused=fused), False


def materialise(cls, config, fused: bool, built, on_meta: bool, sd: dict):
    """(model with ``sd`` copied in, tensors loaded). When ``sd`` fills every parameter and buffer,
    the meta model gets CPU storage and is filled: the random initialisation the weights would
    overwrite is skipped. Otherwise (some tensors keep their initialisation) it is built normally."""
    if on_meta:
        expected = built.state_dict()
        complete = all(k in sd and sd[k].shape == v.shape for k, v in expected.items()
                       if not k.endswith("num_batches_tracked"))
        tensors_elsewhere = len(expected) != len(list(built.parameters())) + len(list(built.buffers())) or any(
            isinstance(v, torch.Tensor) and v.is_meta
            for m in built.modules() for k, v in vars(m).items() if k not in ("_parameters", "_buffers"))
        if complete and not tensors_elsewhere:
            model = built.to_empty(device="cpu")
            with torch.no_grad():
                for key, value in model.state_dict().items():
                    value.copy_(sd[key] if key in sd else torch.zeros((), dtype=value.dtype))
            return model, sum(1 for k in sd if k in expected)
        built = cls(config=config, fused=fused)
    return built, copy_into(built, sd)


# --- reading the source -----------------------------------------------------------------------------

@dataclass
class Source:
    state_dict: dict[str, torch.Tensor]
    description: str
    hf_config: dict | None = None        # HuggingFace config.json
    smp_config: dict | None = None       # segmentation_models_pytorch hub config.json
    fastseg_config: dict | None = None   # fastseg_config.json / safetensors metadata
    architecture: str | None = None      # "SegFormer" / "SETR" for fastseg saves
    meta: dict | None = None             # an mmcv checkpoint's "meta"


def unwrap(obj, description: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensor dict inside a checkpoint container (mmcv ``state_dict``, ``model``, DDP ``module.``),
    and the container's ``meta`` if it has one."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{description} holds a {type(obj).__name__}, not a state dict")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{description} contains no tensors (top-level keys: {preview(map(str, obj))})")
    others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise CheckpointError(f"{description}: entries that are not tensors: {preview(others)}")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors, meta


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    for name in HF_WEIGHT_FILES:
        if (directory / name).exists():
            obj, _ = load_weights_file(directory / name)
            return unwrap(obj, str(directory / name))[0]
    for name in HF_INDEX_FILES:
        if (directory / name).exists():
            weight_map = read_json(directory / name).get("weight_map", {})
            tensors = {}
            for shard in sorted(set(weight_map.values())):
                obj, _ = load_weights_file(directory / shard)
                tensors.update(unwrap(obj, str(directory / shard))[0])
            return tensors
    raise FileNotFoundError(f"{directory} has a config.json but no weights "
                            f"({', '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)})")


def _read_directory(path: Path) -> Source:
    if (path / FASTSEG_CONFIG).exists():
        saved = read_json(path / FASTSEG_CONFIG)
        obj, _ = load_weights_file(path / WEIGHTS_FILE)
        return Source(unwrap(obj, str(path / WEIGHTS_FILE))[0], str(path), fastseg_config=saved.get("config"),
                      architecture=saved.get("architecture", "SegFormer"))
    if (path / "config.json").exists():
        config = read_json(path / "config.json")
        if "_model_class" in config:  # segmentation_models_pytorch's save_pretrained
            return Source(_read_weights(path), str(path), smp_config=config)
        if config.get("model_type") != "segformer":
            raise CheckpointError(
                f"{path}/config.json describes a HuggingFace model of model_type={config.get('model_type')!r}, "
                "not a SegFormer ('segformer'); fastseg reads SegFormer directories only")
        return Source(_read_weights(path), str(path), hf_config=config)
    raise FileNotFoundError(
        f"{path} is a directory without {FASTSEG_CONFIG} (fastseg) or config.json (HuggingFace, smp)")


def read_source(source) -> Source:
    """Tensors (plus any config) from a file, a directory, a cached HF repo id or a state dict."""
    if isinstance(source, Source):
        return source
    if isinstance(source, dict):
        tensors, meta = unwrap(source, "the given state dict")
        return Source(tensors, "state dict", meta=meta)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source must be a path, a HuggingFace repo id or a state dict, got {type(source).__name__}")
    path = recover(Path(source))  # a save killed mid-swap: finish or undo it first
    if not path.exists():
        from . import hf_cache

        if isinstance(source, str) and hf_cache.looks_like_repo_id(source):
            src = _read_directory(hf_cache.resolve(source))
            src.description = f"{source} (HuggingFace cache: {src.description})"
            return src
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_directory(path)
    obj, metadata = load_weights_file(path)
    tensors, meta = unwrap(obj, str(path))
    config = json.loads(metadata["fastseg_config"]) if "fastseg_config" in metadata else None
    arch = metadata.get("architecture", "SegFormer") if config is not None else None
    return Source(tensors, str(path), fastseg_config=config, architecture=arch, meta=meta)


# --- writing ----------------------------------------------------------------------------------------

def model_directory(path: Path):
    """``with model_directory(path) as tmp:`` write a model folder's files into ``tmp``; it then
    replaces ``path`` as a whole (:func:`fastseg.io.atomic_directory`), keeping the user's other files."""
    return atomic_directory(path, replaces=MODEL_FILE_PATTERNS)


def refuse_existing(path: Path, overwrite: bool) -> None:
    recover(path)  # a killed save's swap finished first, so "exists" means what the user sees
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (fastseg convert --overwrite) to replace it")


def save_torch_atomic(obj, path: Path) -> None:
    """``torch.save`` of plain data (tensors, dicts, strings, numbers) through a temporary file."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def save_weights_file(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """A state dict as ``.safetensors`` or a torch file (``.pth``/``.pt``/``.bin``), by suffix."""
    if path.suffix.lower() == ".safetensors":
        save_safetensors_atomic(tensors, path, metadata or {})
    elif path.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt"):
        save_torch_atomic({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
    else:
        raise ValueError(f"{path}: name the output .safetensors or .pth (got suffix {path.suffix or 'none'!r})")


def cpu_state(tensors: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


__all__ = ["CheckpointError", "ConversionError", "Converted", "LoadReport", "Rules", "Source", "read_source",
           "save_json_atomic", "save_safetensors_atomic", "save_torch_atomic", "save_weights_file"]


def write_mmseg_pth(path: Path, tensors: dict, config, overwrite: bool) -> Path:
    """An mmseg-1.x checkpoint: ``{"meta", "state_dict"}`` in a .pth, written atomically."""
    path = Path(path)
    if path.suffix.lower() not in (".pth", ".pt"):
        raise ValueError(f"{path}: an mmseg checkpoint is a .pth file")
    refuse_existing(path, overwrite)
    meta = {"converted_by": f"fastseg {__version__}",
            "dataset_meta": {"classes": [f"class_{i}" for i in range(config.num_classes)]}}
    save_torch_atomic({"meta": meta, "state_dict": cpu_state(tensors)}, path)
    return path
