"""ONNX operators TIDL-RT accelerates (data, one place).

Source: TexasInstruments/edgeai-tidl-tools ``docs/supported_ops_rts_versions.md`` ("Operators Supported",
ONNX, TIDL for ONNX Runtime 1.23 / opset 21). Per-op constraints (kernel sizes, axes, power-of-2 resize
scales...) are TIDL's to check at compile time; this list only flags ops TIDL does not offload at all,
which then run on the Arm core and break the network into subgraphs.
"""
from __future__ import annotations

import warnings

import onnx

TIDL_ONNX_OPS: frozenset[str] = frozenset({
    "Conv", "AveragePool", "GlobalAveragePool", "MaxPool", "Relu", "PRelu",
    "Max", "Sum", "Add", "Mul", "Div", "Sub", "Min", "Gemm", "MatMul", "Softmax", "BatchNormalization",
    "ConvTranspose", "Concat", "Slice", "Split", "Flatten", "ArgMin", "ArgMax", "Upsample", "Resize",
    "DepthToSpace", "Sigmoid", "Pad", "ReduceMin", "ReduceMax", "ScatterND", "ScatterElements", "Squeeze",
    "Tanh", "HardSigmoid", "Elu", "Reshape", "Gather", "Transpose", "LayerNormalization", "GridSample", "TopK",
    "DeformConv", "Clip", "LeakyRelu", "DequantizeLinear", "QuantizeLinear", "Sqrt", "ReduceMean",
    "ReduceSum", "Pow", "Cast", "Asin", "Asinh", "HardSwish", "Mish", "Log", "Unsqueeze", "Abs", "Floor",
    "Exp", "Sin", "InstanceNormalization", "SpaceToDepth", "Acos", "Atan", "Sinh", "Neg", "Cos", "Cosh",
    "Tan", "Expand",
})
# Dropout, Identity and Erf are listed by TIDL only as parts of fused patterns (GELU), never alone.


def unsupported_nodes(model: onnx.ModelProto, allowed: frozenset[str] = TIDL_ONNX_OPS) -> list[tuple[str, str]]:
    """(node name, op type) of every node whose op TIDL does not accelerate."""
    return [(n.name or n.output[0], n.op_type) for n in model.graph.node if n.op_type not in allowed]


def warn_unsupported(model: onnx.ModelProto, where: str = "") -> list[tuple[str, str]]:
    """Warn, naming the nodes, when ``model`` holds ops outside :data:`TIDL_ONNX_OPS`; returns them."""
    bad = unsupported_nodes(model)
    if bad:
        shown = ", ".join(f"{name} ({op})" for name, op in bad[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        warnings.warn(f"{where or 'export'}: {len(bad)} node(s) use ops TIDL does not accelerate (they will run on "
                      f"the Arm core and split the network into subgraphs): {shown}{more}. See "
                      "xnnq/export/allowlist.py; replace them with supported ops if speed matters.", stacklevel=3)
    return bad
