"""Export to ONNX for TIDL (float graph with Clips, or QDQ), TIDL emulation and export checks."""

from .api import ExportResult, export_graph, export_module, export_onnx
from .qdq import to_qdq
from .tidl_check import Violation, tidl_check, tidl_fix
from .tidl_ops import TIDL_ONNX_OPS, unsupported_nodes

__all__ = [
    "TIDL_ONNX_OPS",
    "ExportResult",
    "Violation",
    "export_graph",
    "export_module",
    "export_onnx",
    "tidl_check",
    "tidl_fix",
    "to_qdq",
    "unsupported_nodes",
]
