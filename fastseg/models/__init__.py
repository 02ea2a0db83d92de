from fastseg.models.config import NORM_EPS, VARIANTS, NormEps, SegFormerConfig
from fastseg.models.segformer import SegFormer
from fastseg.models.setr import SETR, SETRConfig

__all__ = ["NORM_EPS", "VARIANTS", "NormEps", "SETR", "SETRConfig", "SegFormer", "SegFormerConfig"]
