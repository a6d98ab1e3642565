"""OpenVINO IR (.xml / .bin) from the exported ONNX, with the manifest in ``rt_info``.

``model_info`` carries the keys OpenVINO Model API's anomaly wrapper reads (model_type, task, image_threshold,
pixel_threshold, normalization_scale, labels), so the IR also loads in Model API based tools.
"""

from __future__ import annotations

import json
from pathlib import Path

import openvino as ov


def export_openvino(onnx_path: Path, xml_path: Path, fp16: bool, threshold: dict, manifest_core: dict) -> None:
    model = ov.convert_model(str(onnx_path))
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
