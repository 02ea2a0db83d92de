"""Deployment: the fast graph, its exports (ONNX, torch.export, AOTInductor) and engines.

One module per concern: :mod:`.graph` (the fast graph: stock ops, weights folded), :mod:`.onnx`
(ONNX files), :mod:`.pt2` (torch.export programs), :mod:`.runtimes` (ONNX Runtime / OpenVINO
sessions), :mod:`.source` (loading a model from a path), :mod:`.calibration` (INT8 calibration
inputs), :mod:`.quantize` (INT8), :mod:`.payoff` (does INT8 beat fp32 here), :mod:`.cache` (the
engine cache), :mod:`.engine` (``fastseg.deploy`` / ``fastseg.load_engine``), :mod:`.cli`
(``fastseg export`` / ``fastseg deploy``).

``fastseg.deploy`` is the function; this package's modules are reached with
``from fastseg.deploy.engine import ...`` (``import fastseg.deploy.x as m`` would bind through
the function).
"""
from fastseg.deploy.common import ExportError, ExportReport, relative_error
from fastseg.deploy.engine import Engine, EngineReport, deploy, load_engine
from fastseg.deploy.graph import fast_graph, model_kind
from fastseg.deploy.onnx import check_parity, count_ops, export_onnx
from fastseg.deploy.pt2 import export_program
from fastseg.deploy.runtimes import onnx_session
from fastseg.deploy.source import load_source

__all__ = ["Engine", "EngineReport", "ExportError", "ExportReport", "deploy", "load_engine", "check_parity", "count_ops", "export_onnx", "export_program",
           "fast_graph", "load_source", "model_kind", "onnx_session", "relative_error"]
