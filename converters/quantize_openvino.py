"""INT8 for OpenVINO with NNCF: post-training quantization, or NNCF's accuracy-controlled quantization driven by
our anomaly gate (image and pixel AUROC on held-out normals plus anomalies), which returns the most sensitive
layers to floating point until the drop is within ``max_drop``."""

from __future__ import annotations

import re

import nncf
import numpy as np
import openvino as ov

from amoe_sdk.calibration.data import GateSet
from amoe_sdk.converters.openvino_export import compiled_infer
from amoe_sdk.converters.quantize_common import FLOAT_FROM_THE_START, GateMetrics, gate_metrics
from amoe_sdk.evaluation.metrics import auroc


def ignored_scope(float_groups: list[str] = ()) -> nncf.IgnoredScope:
    """Float from the start, plus whole layer groups (``encoder/stem``...) found sensitive by the search.

    OpenVINO keeps the ONNX node names, so the same module-path patterns apply; validate=False because a
    detector without, say, component experts has no node that matches their pattern."""
    patterns = [f".*{p}.*" for p in FLOAT_FROM_THE_START] + [f".*/{re.escape(g)}/.*" for g in float_groups]
    return nncf.IgnoredScope(patterns=patterns, validate=False)


def quantize_openvino(
    model: ov.Model,
    frames: np.ndarray,
    gate: GateSet,
    batch_size: int,
    max_drop: float = 0.01,
    accuracy_control: bool = True,
    float_groups: list[str] = (),
) -> tuple[ov.Model, GateMetrics, GateMetrics, list[str]]:
    """-> (INT8 model, FP32 gate metrics, INT8 gate metrics, names of the layers left in float).

    ``float_groups`` (from the ONNX Runtime search, which is much faster than NNCF's) start in float; plain NNCF
    quantization runs first and accuracy control only when its gate still fails."""
    reference = gate_metrics(compiled_infer(model), gate, batch_size)
    usable = len(frames) - len(frames) % batch_size
    calibration = nncf.Dataset([frames[i : i + batch_size] for i in range(0, usable, batch_size)])
    quantized = nncf.quantize(model, calibration, subset_size=usable, ignored_scope=ignored_scope(float_groups))
    final = gate_metrics(compiled_infer(quantized), gate, batch_size)
    if accuracy_control and final.drop_from(reference) > max_drop:
        indices = list(range(0, len(gate.frames) - len(gate.frames) % batch_size, batch_size))

        def validate(compiled: ov.CompiledModel, items) -> tuple[float, None]:
            # The metric is 1 + the worse of the two AUROC differences from FP32: 1.0 for the FP32 model itself,
            # so NNCF's absolute max_drop bounds the image and the pixel AUROC drop at once.
            chosen = list(items)
            outputs = {o.get_any_name(): o for o in compiled.outputs}
            scores, maps, labels, masks = [], [], [], []
            for start in chosen:
                out = compiled({0: gate.frames[start : start + batch_size]})
                scores.append(np.asarray(out[outputs["score"]]))
                maps.append(np.asarray(out[outputs["anomaly_map"]])[:, 0])
                labels.append(gate.labels[start : start + batch_size])
                masks.append(gate.masks[start : start + batch_size])
            image = auroc(np.concatenate(labels), np.concatenate(scores))
            pixel = auroc(np.concatenate(masks), np.concatenate(maps))
            if len(chosen) != len(indices):  # a subset: compare with itself, not with the full-set reference
                return float(min(image, pixel)), None
            return 1.0 + min(image - reference.image_auroc, pixel - reference.pixel_auroc), None

        quantized = nncf.quantize_with_accuracy_control(
            model, calibration, nncf.Dataset(indices), validate, max_drop=max_drop,
            drop_type=nncf.DropType.ABSOLUTE, subset_size=usable, ignored_scope=ignored_scope(float_groups),
        )
        final = gate_metrics(compiled_infer(quantized), gate, batch_size)
    return quantized, reference, final, float_layers(quantized)


def float_layers(model: ov.Model) -> list[str]:
    """Convolutions and MatMuls whose weights did not go through a FakeQuantize or an 8-bit constant."""
    floating = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        producers = {op.input_value(i).get_node().get_type_name() for i in range(op.get_input_size())}
        weights_low_bit = any(
            op.input_value(i).get_node().get_type_name() in ("FakeQuantize", "Multiply", "Subtract", "Convert")
            and _feeds_from_int8(op.input_value(i).get_node())
            for i in range(op.get_input_size())
        )
        if "FakeQuantize" not in producers and not weights_low_bit:
            floating.append(op.get_friendly_name())
    return floating


def _feeds_from_int8(node, depth: int = 4) -> bool:
    if node.get_type_name() == "Constant":
        return str(node.get_element_type()) in ("<Type: 'int8_t'>", "<Type: 'uint8_t'>") or node.get_element_type().get_type_name() in ("i8", "u8")
    if depth == 0:
        return False
    return any(_feeds_from_int8(node.input_value(i).get_node(), depth - 1) for i in range(node.get_input_size()))
