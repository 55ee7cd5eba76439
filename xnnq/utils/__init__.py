"""Utilities: BatchNorm freezing and restore, cross-layer equalization, weights files, export checks, analysis."""

from .._lazy import lazy_getattr
from .bn import freeze_bn, unfreeze_bn
from .io import load_state_dict_file
from .schedule import apply_freeze_schedule

# imported on first use (they pull in onnxruntime, matplotlib or torch.fx passes)
_LAZY = {
    "onnx_check": ("xnnq.export.check", "onnx_check"),
    "tidl_check": ("xnnq.export.tidl_check", "tidl_check"),
    "analyze": ("xnnq.analysis", "analyze"),
    "suggest_16bit": ("xnnq.analysis", "suggest_16bit"),
    "model_restore_bn": ("xnnq.utils.bn_restore", "model_restore_bn"),
    "cross_layer_equalize": ("xnnq.utils.cle", "cross_layer_equalize"),
}


__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = ["freeze_bn", "unfreeze_bn", "apply_freeze_schedule", "load_state_dict_file", *_LAZY]
