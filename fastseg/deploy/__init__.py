"""Deployment: the fast graph and its exports (ONNX, torch.export, AOTInductor).

One module per concern: :mod:`.graph` (the fast graph: stock ops, weights folded), :mod:`.onnx`
(ONNX files), :mod:`.pt2` (torch.export programs), :mod:`.runtimes` (ONNX Runtime / OpenVINO
sessions), :mod:`.source` (loading a model from a path), :mod:`.cli` (``fastseg export``).
"""
from fastseg.deploy.common import ExportError, ExportReport, relative_error
from fastseg.deploy.graph import fast_graph, model_kind
from fastseg.deploy.onnx import check_parity, count_ops, export_onnx
from fastseg.deploy.pt2 import export_program
from fastseg.deploy.runtimes import onnx_session
from fastseg.deploy.source import load_source

__all__ = ["ExportError", "ExportReport", "check_parity", "count_ops", "export_onnx", "export_program",
           "fast_graph", "load_source", "model_kind", "onnx_session", "relative_error"]
