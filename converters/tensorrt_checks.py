"""Host-side checks that a TensorRT 10 build of our ONNX will not fail on the device.

TensorRT cannot run without an NVIDIA GPU, so the converter checks what it can on any host: every node is an
operator TensorRT 10's ONNX parser implements (opset 9 to 20, from NVIDIA's onnx-tensorrt support matrix), the
inputs that TensorRT wants as build-time constants are constants, and every shape is static.
"""

from __future__ import annotations

import onnx

from amoe_sdk.errors import ConversionError

TENSORRT_MAX_OPSET = 20

# ONNX operators the TensorRT 10 parser supports (default domain).
TENSORRT_10_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BitShift
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout DynamicQuantizeLinear Einsum Elu Equal Erf Exp
    Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
    GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid
    HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu
    Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean Min Mish Mod
    Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
    Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu
    Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze
    STFT Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

# (operator, input index) pairs TensorRT needs as build-time constants.
CONSTANT_INPUTS = {("TopK", 1), ("Conv", 1), ("ConvTranspose", 1), ("Unsqueeze", 1), ("Squeeze", 1), ("CumSum", 1)}


def tensorrt_problems(model: onnx.ModelProto) -> list[str]:
    """Everything in ``model`` that would stop a TensorRT 10 build; empty when it should build."""
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset > TENSORRT_MAX_OPSET:
        problems.append(f"opset {opset} is outside TensorRT 10's range (9 to {TENSORRT_MAX_OPSET})")
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    # Explicit quantization: TensorRT folds DequantizeLinear(constant weights) into a constant too.
    constants |= {
        node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear" and node.input[0] in constants
    }
    for node in model.graph.node:
        where = f"node {node.name or '?'} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where} is in custom domain '{node.domain}', which TensorRT has no plugin for")
        elif node.op_type not in TENSORRT_10_OPS:
            problems.append(f"{where}: TensorRT 10 does not implement {node.op_type}")
        for op, index in CONSTANT_INPUTS:
            if node.op_type == op and len(node.input) > index and node.input[index] and node.input[index] not in constants:
                problems.append(f"{where}: input {index} ({node.input[index]}) must be a constant for TensorRT")
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            problems.append(f"tensor {value.name} has a dynamic shape; TensorRT bundles are exported with static shapes")
    return problems


def check_tensorrt_onnx(model: onnx.ModelProto, path: str) -> None:
    problems = tensorrt_problems(model)
    if problems:
        listed = "\n  ".join(problems)
        raise ConversionError(f"{path} would not build with TensorRT 10:\n  {listed}")
