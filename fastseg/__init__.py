"""fastseg: fused kernels for transformer semantic segmentation (SegFormer, SETR)."""
from fastseg.models import SegFormer, SegFormerConfig
from fastseg.ops.dispatch import BackendUnavailable, use_backend
from fastseg.version import __version__

__all__ = ["BackendUnavailable", "SegFormer", "SegFormerConfig", "use_backend", "__version__"]
from fastseg.models import SETR, SETRConfig  # noqa: E402
__all__ += ["SETR", "SETRConfig"]
