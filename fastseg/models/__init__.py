from fastseg.models.config import NORM_EPS, VARIANTS, NormEps, SegFormerConfig
from fastseg.models.segformer import SegFormer

__all__ = ["NORM_EPS", "VARIANTS", "NormEps", "SegFormer", "SegFormerConfig"]
from fastseg.models.setr import SETR, SETRConfig  # noqa: E402
__all__ += ["SETR", "SETRConfig"]
