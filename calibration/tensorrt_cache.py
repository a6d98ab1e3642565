"""TensorRT's text calibration cache, for TensorRT 8.x on older JetPacks (implicit quantization).

Format: a header line ``TRT-<version>-EntropyCalibration2`` (version as TensorRT writes it: 8.6.1 -> 8601),
then one ``tensor_name: <hex>`` line per activation, where <hex> is the big-endian IEEE-754 float32 of the
tensor's scale, amax / 127. The scales come from the same calibration statistics as the QDQ ONNX (symmetric
INT8), read off its QuantizeLinear nodes, so both paths quantize identically.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def tensorrt_version_code(version: str) -> int:
    major, minor, patch = (int(x) for x in (version.split(".") + ["0", "0"])[:3])
    return major * 1000 + minor * 100 + patch


def activation_scales(qdq_model: onnx.ModelProto) -> dict[str, float]:
    """Activation tensor name -> INT8 scale, from the QuantizeLinear nodes of a symmetric QDQ model."""
    initializers = {init.name: numpy_helper.to_array(init) for init in qdq_model.graph.initializer}
    scales = {}
    for node in qdq_model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers:
            continue  # weights are quantized by TensorRT itself from the FP32 weights
        scale = np.asarray(initializers[node.input[1]])
        if scale.size == 1:
            scales[node.input[0]] = float(scale.reshape(()))
    return scales


def write_tensorrt_cache(qdq_model: onnx.ModelProto, path: Path, tensorrt_version: str = "8.6.1") -> int:
    """Write the cache atomically; -> the number of tensors in it."""
    scales = activation_scales(qdq_model)
    lines = [f"TRT-{tensorrt_version_code(tensorrt_version)}-EntropyCalibration2"]
    lines += [f"{name}: {struct.pack('>f', scale).hex()}" for name, scale in scales.items()]
    path = Path(path)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text("\n".join(lines) + "\n")
    temporary.replace(path)
    return len(scales)


def read_tensorrt_cache(path: Path) -> tuple[str, dict[str, float]]:
    """(header, {tensor: scale}) of a cache file, for checks and tests."""
    header, *rows = Path(path).read_text().splitlines()
    scales = {}
    for row in rows:
        name, value = row.rsplit(": ", 1)
        scales[name] = struct.unpack(">f", bytes.fromhex(value))[0]
    return header, scales
