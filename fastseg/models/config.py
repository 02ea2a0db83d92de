"""SegFormer configurations: the MiT-B0…B5 table and the LayerNorm eps of each checkpoint source.

The variant table follows the SegFormer paper (Xie et al., NeurIPS 2021, arXiv:2105.15203) and
the official NVlabs code: heads [1, 2, 5, 8], spatial-reduction ratios [8, 4, 2, 1], MLP ratio 4,
decoder width 256 for B0/B1 and 768 for B2–B5.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# (embed dims, depths, decoder dim) per variant.
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3), 768),
}

DECODERS = ("mlp", "mmseg")


@dataclass(frozen=True)
class NormEps:
    """LayerNorm eps at each place it occurs in the MiT encoder.

    The sources disagree, and the model must compute what the checkpoint's own code computes:
    - NVlabs / mmseg-0.x: blocks and stage-end norms use eps=1e-6 (``partial(nn.LayerNorm,
      eps=1e-6)``); the patch-embedding norm and the spatial-reduction norm are plain
      ``nn.LayerNorm`` (1e-5).
    - HuggingFace transformers: plain ``nn.LayerNorm`` everywhere (1e-5).
    - mmseg-1.x ``MixVisionTransformer``: ``norm_cfg=dict(type='LN', eps=1e-6)`` everywhere.
    """

    patch_embed: float = 1e-5
    block: float = 1e-6
    sr: float = 1e-5
    stage: float = 1e-6


NORM_EPS = {
    "nvlabs": NormEps(patch_embed=1e-5, block=1e-6, sr=1e-5, stage=1e-6),
    "hf": NormEps(patch_embed=1e-5, block=1e-5, sr=1e-5, stage=1e-5),
    "mmseg": NormEps(patch_embed=1e-6, block=1e-6, sr=1e-6, stage=1e-6),
}


@dataclass(frozen=True)
class SegFormerConfig:
    """Everything that fixes a SegFormer's architecture (not its weights)."""

    num_classes: int = 150
    embed_dims: tuple[int, ...] = VARIANTS["b0"][0]
    depths: tuple[int, ...] = VARIANTS["b0"][1]
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    mlp_ratio: int = 4
    decoder_dim: int = VARIANTS["b0"][2]
    decoder: str = "mlp"
    in_channels: int = 3
    norm_eps: NormEps = field(default_factory=NormEps)
    drop_path_rate: float = 0.1
    decoder_dropout: float = 0.1
    variant: str | None = "b0"

    def __post_init__(self):
        n = len(self.embed_dims)
        if n != 4 or not (len(self.depths) == len(self.num_heads) == len(self.sr_ratios) == 4):
            raise ValueError(
                "SegFormer has 4 stages: embed_dims, depths, num_heads and sr_ratios need 4 "
                f"entries each; got {self.embed_dims}, {self.depths}, {self.num_heads}, "
                f"{self.sr_ratios}"
            )
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if dim % heads:
                raise ValueError(f"embed dim {dim} is not divisible by its {heads} heads")
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; choose one of {list(DECODERS)}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")

    @classmethod
    def from_variant(cls, variant: str, **overrides) -> "SegFormerConfig":
        if variant not in VARIANTS:
            raise ValueError(f"unknown SegFormer variant {variant!r}; choose one of {list(VARIANTS)}")
        dims, depths, decoder_dim = VARIANTS[variant]
        base = dict(embed_dims=dims, depths=depths, decoder_dim=decoder_dim, variant=variant)
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "SegFormerConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("embed_dims", "depths", "num_heads", "sr_ratios"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SegFormerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SegFormer config fields: {sorted(unknown)}")
        d = dict(d)
        for key in ("embed_dims", "depths", "num_heads", "sr_ratios"):
            if key in d:
                d[key] = tuple(int(v) for v in d[key])
        if isinstance(d.get("norm_eps"), dict):
            d["norm_eps"] = NormEps(**d["norm_eps"])
        return cls(**d)


def variant_of(embed_dims, depths) -> str | None:
    """The variant name whose dims and depths these are, or None for a custom configuration."""
    for name, (dims, ds, _) in VARIANTS.items():
        if tuple(embed_dims) == dims and tuple(depths) == ds:
            return name
    return None
