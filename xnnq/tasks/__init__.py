"""Task faces (data, model, metric, export) on top of the wrappers and export_onnx."""
