"""OpenVINO IR (.xml / .bin) from the exported ONNX, with the bundle's manifest in ``rt_info``.

The manifest sits under ``rt_info["amoe_sdk"]["manifest"]`` (JSON), not under ``model_info``: OpenVINO Model API
reads ``model_info`` to pick a wrapper, and its anomaly wrapper expects one or four outputs and float input in
[0, 1], where this IR has three outputs and takes uint8 BGR. Run the IR with ``EdgeDetector``, or with OpenVINO
itself as ``manifest.json`` describes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openvino as ov

RT_INFO_PATH = ["amoe_sdk", "manifest"]


def save_openvino(model: ov.Model, xml_path: Path, fp16: bool, manifest: dict | None = None) -> None:
    """Write ``model`` as IR, with ``manifest`` in its rt_info when given; ``fp16`` stores the floating-point
    weights in FP16 (INT8 weights of a quantized model stay INT8)."""
    if manifest is not None:
        model.set_rt_info(json.dumps(manifest, allow_nan=False), RT_INFO_PATH)
    ov.save_model(model, str(xml_path), compress_to_fp16=fp16)


def read_manifest(model: ov.Model) -> dict:
    """The manifest ``save_openvino`` wrote into an IR's rt_info."""
    return json.loads(model.get_rt_info(RT_INFO_PATH).astype(str))


def compiled_infer(model: ov.Model, threads: int | None = None):
    """An ``infer(batch) -> {output name: array}`` over ``model`` compiled for the CPU in FP32 arithmetic."""
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    compiled = ov.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    names = [o.get_any_name() for o in compiled.outputs]

    def infer(batch: np.ndarray) -> dict[str, np.ndarray]:
        result = request.infer({0: batch})
        return {name: np.asarray(result[output]) for name, output in zip(names, compiled.outputs)}

    return infer
