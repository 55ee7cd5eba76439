"""Export to ONNX for TIDL (float graph with Clips, or QDQ), TIDL emulation and export checks."""
from .allowlist import TIDL_ONNX_OPS, unsupported_nodes
from .api import ExportResult, export_graph, export_module, export_onnx
from .qdq import to_qdq

__all__ = ["TIDL_ONNX_OPS", "ExportResult", "export_graph", "export_onnx", "to_qdq", "unsupported_nodes"]
