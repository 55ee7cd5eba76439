"""The ONNX operators TIDL-RT accelerates and the TIDL layer each becomes (data, one place).

Source: TexasInstruments/edgeai-tidl-tools ``docs/operators.md`` @238cb8b, 'ONNX / Operators Supported'
(ONNX 1.14.0, ONNX Runtime 1.15.0, opset 19). An op outside this table runs on the Arm core and splits the
network into subgraphs. Per-operator constraints are rules in :mod:`xnnq.export.tidl_check`.
"""

from __future__ import annotations

import onnx

# ONNX op -> TIDL layer
TIDL_LAYERS: dict[str, str] = {
    "Conv": "TIDL_ConvolutionLayer",
    "AveragePool": "TIDL_PoolingLayer",
    "GlobalAveragePool": "TIDL_PoolingLayer",
    "MaxPool": "TIDL_PoolingLayer",
    "Relu": "TIDL_ReLULayer",
    "PRelu": "TIDL_PReLULayer",
    **{op: "TIDL_EltWiseLayer" for op in ("Max", "Sum", "Add", "Mul", "Div", "Sub", "Min")},
    "Gemm": "TIDL_InnerProductLayer",
    "MatMul": "TIDL_InnerProductLayer",
    "Softmax": "TIDL_SoftMaxLayer",
    "BatchNormalization": "TIDL_BatchNormLayer",
    "ConvTranspose": "TIDL_Deconv2DLayer",
    "Concat": "TIDL_ConcatLayer",
    "Slice": "TIDL_SliceLayer",
    "Split": "TIDL_SliceLayer",
    "Flatten": "TIDL_FlattenLayer",
    "ArgMin": "TIDL_ArgOpLayer",
    "ArgMax": "TIDL_ArgOpLayer",
    "Upsample": "TIDL_ResizeLayer",
    "Resize": "TIDL_ResizeLayer",
    "DepthToSpace": "TIDL_DepthToSpaceLayer",
    "Sigmoid": "TIDL_SigmoidLayer",
    "Pad": "TIDL_PadLayer",
    "ReduceMin": "TIDL_ReduceLayer",
    "ReduceMax": "TIDL_ReduceLayer",
    "ScatterND": "TIDL_ScatterElementsLayer",
    "ScatterElements": "TIDL_ScatterElementsLayer",
    "Squeeze": "TIDL_SqueezeLayer",
    "Tanh": "TIDL_TanhLayer",
    "HardSigmoid": "TIDL_HardSigmoidLayer",
    "Elu": "TIDL_ELULayer",
    "Reshape": "TIDL_ReshapeLayer",
    "Gather": "TIDL_GatherLayer",
    "Transpose": "TIDL_TransposeLayer",
    "LayerNormalization": "TIDL_LayerNormLayer",
    "GridSample": "TIDL_GridSampleLayer",
    "TopK": "TIDL_TopKLayer",
    "DeformConv": "TIDL_DeformableConvLayer",
    "Clip": "TIDL_ClipLayer",
    "LeakyRelu": "TIDL_LeakyReluLayer",
    "DequantizeLinear": "TIDL_DequantizeLayer",
    "QuantizeLinear": "TIDL_QuantizeLayer",
    "Sqrt": "TIDL_SqrtLayer",
    "ReduceMean": "TIDL_ReduceMeanLayer",
    "ReduceSum": "TIDL_ReduceSumLayer",
    "Pow": "TIDL_PowLayer",
    "Cast": "TIDL_CastLayer",
    "Asin": "TIDL_AsinLayer",
    "Asinh": "TIDL_AsinhLayer",
    "HardSwish": "TIDL_HardSwishLayer",
    "Mish": "TIDL_MishLayer",
    "Log": "TIDL_LogLayer",
    "Unsqueeze": "TIDL_UnsqueezeLayer",
    "Abs": "TIDL_AbsLayer",
    "Floor": "TIDL_FloorLayer",
    "Exp": "TIDL_ExpLayer",
    "Sin": "TIDL_SinLayer",
    "InstanceNormalization": "TIDL_InstanceNormLayer",
    "SpaceToDepth": "TIDL_SpaceToDepthLayer",
    "Acos": "TIDL_AcosLayer",
    "Atan": "TIDL_AtanLayer",
    "Sinh": "TIDL_SinhLayer",
    "Neg": "TIDL_NegLayer",
    "Cos": "TIDL_CosLayer",
    "Cosh": "TIDL_CoshLayer",
    "Tan": "TIDL_TanLayer",
    "Expand": "TIDL_ExpandLayer",
}
TIDL_ONNX_OPS: frozenset[str] = frozenset(TIDL_LAYERS)
# listed by TIDL only as parts of fused patterns (Dropout; Erf/Identity in GELU), never alone
FUSED_ONLY_OPS: frozenset[str] = frozenset({"Dropout", "Identity", "Erf"})
DATA_LAYER = "TIDL_DataLayer"
SOURCE = "TexasInstruments/edgeai-tidl-tools docs/operators.md @238cb8b, 'ONNX / Operators Supported'"


def unsupported_nodes(
    model: onnx.ModelProto, allowed: frozenset[str] = TIDL_ONNX_OPS
) -> list[tuple[str, str]]:
    """(node name, op type) of every node whose op TIDL does not accelerate."""
    return [(n.name or n.output[0], n.op_type) for n in model.graph.node if n.op_type not in allowed]
