from fastseg.models.config import NORM_EPS, VARIANTS, NormEps, SegFormerConfig
from fastseg.models.segformer import SegFormer

__all__ = ["NORM_EPS", "VARIANTS", "NormEps", "SegFormer", "SegFormerConfig"]
