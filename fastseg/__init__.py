"""fastseg: fused kernels for transformer semantic segmentation (SegFormer, SETR)."""
from fastseg.models import SETR, SegFormer, SegFormerConfig, SETRConfig
from fastseg.deploy import export_onnx
from fastseg.deploy.engine import deploy, load_engine  # the function; its package stays importable as fastseg.deploy
from fastseg.ops.dispatch import BackendUnavailable, use_backend
from fastseg.version import __version__
from fastseg.tune import tune  # the function; its module stays importable as fastseg.tune

__all__ = ["BackendUnavailable", "SETR", "SETRConfig", "SegFormer", "SegFormerConfig", "tune", "use_backend", "__version__", "export_onnx", "deploy", "load_engine"]
