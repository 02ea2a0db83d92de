"""Every checkpoint format, in the order they are tried, and the names ``--to`` accepts.

A format module gives ``NAME``, ``FAMILY`` ("segformer", "setr", or None for fastseg's own saves, which
serve both), ``TITLE``, ``OUTPUT`` (the resolution of the logits the source's own code returns),
``detect(keys, source)``, ``to_fastseg(state_dict, source) -> Converted`` and
``from_fastseg(state_dict, config) -> (tensors, notes)`` (raising :class:`ConversionError` when the
target cannot hold the model faithfully); the ones that can be written also give ``write``.
"""
from __future__ import annotations

from . import hf_current, hf_hub, mit, mmseg_mit, native, nvlabs, setr_mmseg, setr_timm, smp

# Detection order: the key patterns are disjoint, but fastseg's own saves (which carry a config)
# come first, and smp's hub directory is recognised by its config before any key is looked at.
FORMATS = (native, smp, hf_current, hf_hub, mmseg_mit, nvlabs, mit, setr_mmseg, setr_timm)

TARGETS = {
    "segformer": {"fastseg": native, "hf": hf_hub, "nvlabs": nvlabs, "mmseg": mmseg_mit, "smp": smp, "mit": mit},
    "setr": {"fastseg": native, "mmseg": setr_mmseg, "timm": setr_timm},
}
MODEL_NAMES = {"segformer": "SegFormer", "setr": "SETR"}


def family_of(fmt, keys, src) -> str:
    return fmt.family(keys, src) if fmt.FAMILY is None else fmt.FAMILY


def detect(src):
    """(format module, family) of a source, or (None, None) for an unknown layout."""
    keys = list(src.state_dict)
    if src.smp_config is not None:
        return smp, "segformer"
    for fmt in FORMATS:
        if fmt.detect(keys, src):
            return fmt, family_of(fmt, keys, src)
    return None, None


def by_name(name: str):
    for fmt in FORMATS:
        if fmt.NAME == name:
            return fmt
    raise KeyError(name)


def target(family: str, name: str):
    targets = TARGETS[family]
    if name not in targets:
        raise ValueError(f"unknown {MODEL_NAMES[family]} checkpoint format {name!r}; choose one of {sorted(targets)}")
    return targets[name]
