"""INT8 for OpenVINO with NNCF: post-training quantization, or NNCF's accuracy-controlled quantization driven by
our anomaly gate (image and pixel AUROC on held-out normals plus anomalies), which returns the most sensitive
layers to floating point until the drop is within ``max_drop``.

Two NNCF defaults erase the anomaly signal and are overridden here: FakeQuantize on the distance, normalisation
and fusion ops (``SIGNAL_PATH``), and activation ranges from the *mean* of each calibration image's extremes,
which clip feature values that only anomalies reach. Both pinned every anomalous kit score at the normal maximum.
"""

from __future__ import annotations

import logging
import re

import nncf
import numpy as np
import openvino as ov
import openvino.opset13 as opset
from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
from nncf.quantization.range_estimator import RangeEstimatorParametersSet

from amoe_sdk.calibration.data import GateSet
from amoe_sdk.converters.openvino_export import compiled_infer
from amoe_sdk.converters.quantize_common import (
    FLOAT_FROM_THE_START, SIGNAL_PATH, GateMetrics, always_float, gate_metrics, layer_group,
)
from amoe_sdk.errors import ConversionError
from amoe_sdk.evaluation.metrics import auroc

LOG = logging.getLogger("amoe_sdk.converters")
# The ops whose weights NNCF quantizes: what "in float" is counted over.
WEIGHTED_OPS = ("Convolution", "GroupConvolution", "MatMul")
# Absolute min/max over the calibration set (NNCF's default averages each image's extremes).
ADVANCED = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)


def output_ops(model: ov.Model) -> list[str]:
    """The ops that produce the graph outputs: OpenVINO renames them after their output tensor (the last blur
    convolution is called ``anomaly_map``), so no module-path pattern can reach them."""
    return [out.get_node().input_value(0).get_node().get_friendly_name() for out in model.outputs]


def ignored_scope(model: ov.Model, float_groups: list[str] = ()) -> nncf.IgnoredScope:
    """Float from the start, the signal path, plus whole layer groups (``encoder/stem``...) found sensitive.

    OpenVINO keeps the ONNX node names, so the same module-path patterns apply; validate=False because a
    detector without, say, component experts has no node that matches their pattern."""
    patterns = [f".*{p}.*" for p in FLOAT_FROM_THE_START] + list(SIGNAL_PATH) + [f".*/{re.escape(g)}/.*" for g in float_groups]
    return nncf.IgnoredScope(names=output_ops(model), patterns=patterns, validate=False)


def check_signal_path_float(model: ov.Model) -> None:
    """Refuse a model with a FakeQuantize on the signal path: it would clip anomalies to the normal range."""
    protected = set(output_ops(model))
    offending = sorted({
        consumer.get_node().get_friendly_name()
        for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
        for consumer in op.output(0).get_target_inputs()
        if consumer.get_node().get_friendly_name() in protected
        or any(re.match(p, consumer.get_node().get_friendly_name()) for p in SIGNAL_PATH)
    })
    if offending:
        raise ConversionError(
            f"NNCF quantized {len(offending)} op(s) on the anomaly signal's path ({', '.join(offending[:3])}...); "
            "their names no longer match SIGNAL_PATH in amoe_sdk.converters.quantize_common: add them there"
        )


def store_float_weights_fp16(model: ov.Model) -> int:
    """Store the weights of the layers left in float as FP16 + Convert, as OpenVINO's FP16 compression would:
    ``save_model`` skips that compression for any model with a FakeQuantize. Computation stays FP32.
    -> the number of weight tensors converted."""
    converted = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant" or op.get_element_type() != ov.Type.f32 or int(np.prod(list(op.get_output_shape(0)))) < 1024:
            continue
        consumers = list(op.output(0).get_target_inputs())
        if not all(c.get_node().get_type_name() in ("Convolution", "GroupConvolution", "MatMul", "Reshape") for c in consumers):
            continue
        widened = opset.convert(opset.constant(op.get_data().astype(np.float16)), ov.Type.f32)
        for consumer in consumers:
            consumer.replace_source_output(widened.output(0))
        converted += 1
    return converted


def quantize_openvino(
    model: ov.Model,
    frames: np.ndarray,
    gate: GateSet,
    batch_size: int,
    max_drop: float = 0.01,
    accuracy_control: bool = True,
    float_groups: list[str] = (),
    sigma: float = 3.0,
    max_threshold_rise: float = 2.0,
    ranking: list[str] = (),
) -> tuple[ov.Model, GateMetrics, GateMetrics, list[str], list[str]]:
    """-> (INT8 model, FP32 gate metrics, INT8 gate metrics, names of the layers left in float, the layer groups
    wholly in float in it).

    ``float_groups`` (from the ONNX Runtime search, which is much faster than NNCF's) start in float. When NNCF's
    result still fails the gate, the next groups of ``ranking`` (the ONNX Runtime search's damage order) return
    to float one at a time; NNCF's accuracy control runs only when that ranking is used up."""
    reference = gate_metrics(compiled_infer(model), gate, batch_size, sigma)
    usable = len(frames) - len(frames) % batch_size
    calibration = nncf.Dataset([frames[i : i + batch_size] for i in range(0, usable, batch_size)])
    kept = list(float_groups)
    remaining = [g for g in ranking if g not in kept]
    while True:
        quantized = nncf.quantize(model, calibration, subset_size=usable, ignored_scope=ignored_scope(model, kept), advanced_parameters=ADVANCED)
        store_float_weights_fp16(quantized)
        final = gate_metrics(compiled_infer(quantized), gate, batch_size, sigma)
        if final.passes(reference, max_drop, max_threshold_rise) or not remaining:
            break
        LOG.info("OpenVINO INT8 with %d group(s) in float misses the gate (threshold x%.2f); %s back to float",
                 len(kept), final.threshold_rise(reference), remaining[0])
        kept.append(remaining.pop(0))
    if accuracy_control and not final.passes(reference, max_drop, max_threshold_rise):
        quantized = accuracy_controlled(model, calibration, usable, gate, batch_size, reference, max_drop, float_groups)
        final = gate_metrics(compiled_infer(quantized), gate, batch_size, sigma)
    check_signal_path_float(quantized)
    floating = float_layers(quantized)
    return quantized, reference, final, floating, groups_in_float(quantized, floating)


def accuracy_controlled(
    model: ov.Model, calibration: nncf.Dataset, subset_size: int, gate: GateSet, batch_size: int,
    reference: GateMetrics, max_drop: float, float_groups: list[str],
) -> ov.Model:
    """NNCF's accuracy-control quantization, with the gate's image and pixel AUROC as its metric."""
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
        drop_type=nncf.DropType.ABSOLUTE, subset_size=subset_size, ignored_scope=ignored_scope(model, float_groups),
        advanced_quantization_parameters=ADVANCED,
    )
    store_float_weights_fp16(quantized)
    return quantized


def groups_in_float(model: ov.Model, floating: list[str]) -> list[str]:
    """The layer groups (``layer_group``) whose every Convolution and MatMul the IR holds in float, without the
    ones float from the start: what the model is, not what was asked of NNCF (its accuracy control starts from
    the first float groups and returns its own choice of layers to float)."""
    floating = set(floating)
    by_group: dict[str, list[bool]] = {}
    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        if op.get_type_name() in WEIGHTED_OPS and not always_float(name):
            by_group.setdefault(layer_group(name), []).append(name in floating)
    return [group for group, float_flags in by_group.items() if all(float_flags)]


def float_layers(model: ov.Model) -> list[str]:
    """Convolutions and MatMuls whose weights did not go through a FakeQuantize or an 8-bit constant."""
    floating = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in WEIGHTED_OPS:
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
