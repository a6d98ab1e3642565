"""OpenVINO IR (.xml / .bin) from the exported ONNX, with the manifest in ``rt_info``.

``model_info`` carries the keys OpenVINO Model API's anomaly wrapper reads (model_type, task, image_threshold,
pixel_threshold, normalization_scale, labels), so the IR also loads in Model API based tools.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openvino as ov


def save_openvino(model: ov.Model, xml_path: Path, fp16: bool, threshold: dict, manifest_core: dict) -> None:
    """Write ``model`` as IR with its rt_info; ``fp16`` stores the floating-point weights in FP16 (INT8 weights
    of a quantized model stay INT8)."""
    model_info = {
        "model_type": "AnomalyDetection",
        "task": "segmentation",
        "labels": "Normal Anomaly",
        "image_threshold": str(threshold["image"]),
        "pixel_threshold": str(threshold["pixel"]),
        # Model API divides by this to map scores to [0, 1] around 0.5 at the threshold.
        "normalization_scale": str(2.0 * threshold["image"]),
        "amoe_manifest": json.dumps(manifest_core),
    }
    for key, value in model_info.items():
        model.set_rt_info(value, ["model_info", key])
    ov.save_model(model, str(xml_path), compress_to_fp16=fp16)


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
