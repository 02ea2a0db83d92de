"""Loading a model to export or deploy from a path (checkpoint file, HF folder, fastseg folder)."""
from __future__ import annotations

from pathlib import Path

from fastseg.deploy.common import ExportError


def load_source(source, model: str | None = None):
    """A model from anything ``SegFormer.from_pretrained`` or ``SETR.from_pretrained`` reads (a
    file, an HF directory, a fastseg directory) or a ``fastseg train`` checkpoint. ``model``:
    "segformer[-bX]" or "setr[-naive|-pup|-mla]" picks the loader; otherwise SegFormer is tried
    first, then SETR."""
    from fastseg import SETR, SegFormer

    path = Path(source)
    if not path.exists():
        raise ExportError(f"SOURCE {source} does not exist (give a checkpoint file, an HF model folder "
                          "or a fastseg save_pretrained folder)")
    if model is not None and not (model.startswith("segformer") or model.startswith("setr")):
        raise ExportError(f"--model must be segformer[-b0..b5] or setr[-naive|-pup|-mla], got {model!r}")
    if model is not None and model.startswith("setr"):
        decoder = model.split("-")[1] if "-" in model else None
        return SETR.from_pretrained(path, decoder=decoder)
    if path.is_file() and path.suffix.lower() in (".pth", ".pt", ".ckpt"):
        from fastseg.inference import is_train_checkpoint, load_model
        from fastseg.io import load_weights_file

        obj, _ = load_weights_file(path)
        if is_train_checkpoint(obj):
            return load_model(path)[0]
    if model is not None:
        loaded = SegFormer.from_pretrained(path)
        want = model[len("segformer-"):] if model.startswith("segformer-") else None
        if want and loaded.variant and loaded.variant != want:
            raise ExportError(f"{source} holds a SegFormer-{loaded.variant}, but --model is {model}")
        return loaded
    errors = []
    for cls in (SegFormer, SETR):
        try:
            return cls.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - each loader's own message goes into the error
            errors.append(f"as {cls.__name__}: {str(e).splitlines()[0][:300]}")
    raise ExportError(f"cannot load {source} as a SegFormer or SETR checkpoint; pass --model to pick the kind.\n  "
                      + "\n  ".join(errors))
