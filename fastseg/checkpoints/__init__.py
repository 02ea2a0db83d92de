"""Checkpoint formats: reading every layout users have, writing each ecosystem's own.

One module per format (see :mod:`.registry` for the interface), for both models:

==============  ============================================================================================
SegFormer
``fastseg``     :meth:`save_pretrained`'s directory / ``.safetensors`` (:mod:`.native`)
``nvlabs``      NVlabs/SegFormer (mmseg-0.x) ``segformer.b*.pth`` (:mod:`.nvlabs`)
``mit``         NVlabs' ImageNet ``mit_b*.pth`` backbones, read only (:mod:`.mit`)
``hf_legacy``   HuggingFace hub files and directories, what ``transformers`` saves (:mod:`.hf_hub`)
``hf``          the current ``transformers`` module names, a live ``state_dict()`` (:mod:`.hf_current`)
``mmseg``       mmsegmentation MiT (0.17+ / 1.x) with its ``SegformerHead`` (:mod:`.mmseg_mit`)
``smp``         segmentation_models_pytorch ``Segformer`` (mit_b* encoders) (:mod:`.smp`)
SETR
``fastseg``     :meth:`SETR.save_pretrained` (:mod:`.native`)
``mmseg``       mmsegmentation SETR / ViT, with or without the patch-embedding bias (:mod:`.setr_mmseg`)
``timm``        timm ImageNet ViT encoders (:mod:`.setr_timm`)
==============  ============================================================================================

The dependency runs one way: ``fastseg.models`` → ``fastseg.checkpoints``. This package never imports
the models; :func:`load_pretrained` and :func:`save_pretrained` receive the model class (or model),
which carries what loading needs to know about its architecture (``checkpoint_family``,
``config_class``, the variant / encoder tables, the position-embedding resize).

Files are read through :mod:`fastseg.io` (``torch.load(weights_only=True)`` or safetensors: never an
arbitrary unpickle) and written atomically.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

from fastseg.io import CheckpointError, recover

from . import _segformer, _setr, native, registry
from ._common import ConversionError, LoadReport, Source, preview, read_source
from .registry import FORMATS, TARGETS

_BUILDERS = {"segformer": _segformer, "setr": _setr}


def detect_format(keys) -> str | None:
    """The format name of a bare state dict's keys (None if no format matches)."""
    src = Source({k: None for k in keys}, "keys")
    fmt, _ = registry.detect(src)
    return fmt.NAME if fmt else None


def identify(source) -> tuple[str, str]:
    """(family, format name) of a checkpoint: family "segformer" or "setr"."""
    src = read_source(source)
    fmt, family = registry.detect(src)
    if fmt is None:
        raise CheckpointError(f"{src.description}: not a SegFormer or SETR checkpoint in any known layout "
                              f"(keys: {preview(src.state_dict)})")
    return family, fmt.NAME


def load_pretrained(cls, source, *, _hf_config: dict | None = None, **options):
    """Build ``cls`` (SegFormer or SETR) from any supported checkpoint; ``options`` are the model's
    ``from_pretrained`` keywords. The model gets a :class:`LoadReport` as ``model.load_report``."""
    family = cls.checkpoint_family
    src = read_source(source)
    if _hf_config is not None:
        src.hf_config = _hf_config
    fmt, found = registry.detect(src)
    builder = _BUILDERS[family]
    name = registry.MODEL_NAMES[family]
    if fmt is None:
        expected = builder.expected_keys(cls)
        others = " / ".join(f.TITLE for f in FORMATS if f.FAMILY in (family, None))
        raise CheckpointError(
            f"{src.description}: not a {name} checkpoint in any known layout ({others}); "
            f"missing keys ({len(expected)}): {preview(expected)}; unexpected keys ({len(src.state_dict)}): "
            f"{preview(src.state_dict)}")
    if found != family:
        other = registry.MODEL_NAMES[found]
        raise CheckpointError(f"{src.description}: this is a {other} checkpoint; use fastseg.{other}.from_pretrained "
                              f"(its keys are in the {fmt.TITLE} layout; fastseg.{name}.from_pretrained reads {name} "
                              "checkpoints)")
    converted = fmt.to_fastseg(src.state_dict, src)
    return builder.load(cls, src, fmt, converted, **options)


def load_from_hf(cls, hf_model, num_classes=None, fused=False):
    """A live ``transformers`` Segformer (``…ForSemanticSegmentation``, ``…Model`` or ``…ForImageClassification``)."""
    config = getattr(hf_model, "config", None)
    if config is None or getattr(config, "model_type", None) != "segformer":
        kind = getattr(config, "model_type", None)
        raise TypeError(f"expected a transformers Segformer model, got {type(hf_model).__name__}"
                        + (f" (model_type={kind!r})" if kind else ""))
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    model = load_pretrained(cls, state, _hf_config=config.to_dict(), num_classes=num_classes, fused=fused)
    model.load_report.source = f"transformers {type(hf_model).__name__}"
    return model


class Saved(NamedTuple):
    path: Path
    format: str
    notes: list


def save_pretrained(model, path, format: str = "fastseg", *, overwrite: bool = True,
                    allow_eps_change: bool = False) -> Saved:
    """Write ``model`` in ``format``'s own layout (see ``TARGETS``), atomically.

    Refuses, with the reason, a model the format cannot represent faithfully (another head
    architecture, LayerNorm eps the target library does not use — unless ``allow_eps_change`` —,
    head counts the format does not store). ``overwrite=False`` refuses an existing output.
    """
    family = type(model).checkpoint_family
    fmt = registry.target(family, format)
    config = model.config
    tensors, notes = fmt.from_fastseg(dict(model.state_dict()), config)  # refuses other heads first
    if family == "segformer" and fmt is not native:
        from . import _mit

        notes = _mit.check_eps(config, fmt.EPS, fmt.TITLE, allow_eps_change) + notes
    if fmt is native:
        out = native.write(path, tensors, config, overwrite, architecture=registry.MODEL_NAMES[family])
    else:
        out = fmt.write(path, tensors, config, overwrite)
    if getattr(fmt, "LOSSY", False) or allow_eps_change and any("allow_eps_change" in n for n in notes):
        warnings.warn(f"{out}: " + "; ".join(notes), stacklevel=3)
    return Saved(Path(out), format, notes)


def convert(source, out, to: str, *, model_classes: dict, overwrite: bool = False, allow_eps_change: bool = False,
            **load_options) -> Saved:
    """Load ``source`` (any format) with the class ``model_classes[family]`` and write it as ``to``."""
    out = Path(out)
    recover(out)  # a killed earlier save: finish its swap before asking what exists
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    src = read_source(source)
    fmt, family = registry.detect(src)
    if fmt is None:
        raise CheckpointError(f"{src.description}: not a SegFormer or SETR checkpoint in any known layout "
                              f"(keys: {preview(src.state_dict)})")
    model = model_classes[family].from_pretrained(src, **load_options)
    return save_pretrained(model, out, to, overwrite=overwrite, allow_eps_change=allow_eps_change)


__all__ = ["CheckpointError", "ConversionError", "FORMATS", "LoadReport", "Saved", "TARGETS", "convert",
           "detect_format", "identify", "load_from_hf", "load_pretrained", "read_source", "save_pretrained"]
