"""INT8 for ONNX Runtime and TensorRT: QDQ ONNX from ONNX Runtime's static quantization, with an accuracy gate
and a sensitivity search that keeps the layers that hurt most in floating point.

ONNX Runtime on x86: unsigned 8-bit activations with ``reduce_range`` (7-bit weights): the default signed
activations saturate on this model family (map correlation with FP32 as low as 0.3 measured on a Lite0 toy).
TensorRT: signed symmetric activations and weights (TensorRT requires zero points of 0).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from tqdm.auto import tqdm

from amoe_sdk.calibration.data import GateSet
from amoe_sdk.converters.graph import INPUT_NAME
from amoe_sdk.converters.quantize_common import GateMetrics, float_nodes, gate_metrics, quantizable_groups
from amoe_sdk.runtimes.preprocess import pad_batch

LOG = logging.getLogger("amoe_sdk.converters")
CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}


class FramesReader(CalibrationDataReader):
    """Feeds uint8 [N, S, S, 3] frames to ONNX Runtime's calibrator in the graph's fixed batch size."""

    def __init__(self, frames: np.ndarray, batch_size: int):
        # Every frame is seen: a short last batch is padded with copies of its last frame.
        self.batches = [pad_batch(frames[i : i + batch_size], batch_size) for i in range(0, len(frames), batch_size)]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {INPUT_NAME: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


@dataclass
class QuantizeResult:
    """What the gate measured: FP32 and final INT8 metrics, the groups and all the nodes kept in float, every try."""

    reference: GateMetrics
    final: GateMetrics
    float_groups: list[str]
    float_nodes: list[str]
    passed: bool
    tries: list[dict] = field(default_factory=list)
    ranking: list[str] = field(default_factory=list)  # groups by damage, when the search measured it


def quantize_qdq(
    fp32_path: Path, out_path: Path, frames: np.ndarray, batch_size: int, method: str, exclude: list[str],
    for_tensorrt: bool, ranges_cache: Path | None = None,
) -> None:
    """``ranges_cache``: a JSON file of calibrated tensor ranges, written by the first call and read by the next
    ones. The ranges cover every Conv/MatMul/Gemm input whatever ``exclude`` says, so the search's tries share
    one calibration pass instead of running the calibration images again for each try."""
    symmetric = {"ActivationSymmetric": True, "WeightSymmetric": True} if for_tensorrt else {}
    quantize_static(
        str(fp32_path), str(out_path), FramesReader(frames, batch_size),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        per_channel=True,
        reduce_range=not for_tensorrt,
        activation_type=QuantType.QInt8 if for_tensorrt else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        calibrate_method=CALIBRATION_METHODS[method],
        extra_options={**symmetric, "CalibMovingAverage": False},
        calibration_cache_path=str(ranges_cache) if ranges_cache is not None else None,
    )


def rank_by_damage(groups: list[str], attempt: Callable[[list[str], str], GateMetrics], reference: GateMetrics) -> list[str]:
    """The layer groups, most damaging first: each quantized alone with every other group in float (``attempt``
    quantizes with the given groups in float), ranked by gate drop, then flipped verdicts, then threshold rise."""
    damage = {}
    for group in tqdm(groups, desc="sensitivity", unit="group", leave=False):
        alone = attempt([g for g in groups if g != group], f"only {group} in INT8")
        damage[group] = (alone.drop_from(reference), alone.flips_from(reference), alone.threshold_rise(reference))
    return sorted(groups, key=lambda g: tuple(-d for d in damage[g]))


def gated_quantize(
    fp32_path: Path,
    out_path: Path,
    frames: np.ndarray,
    gate: GateSet,
    batch_size: int,
    make_infer: Callable[[Path], Callable[[np.ndarray], dict]],
    max_drop: float = 0.01,
    method: str = "minmax",
    for_tensorrt: bool = False,
    sigma: float = 3.0,
    max_threshold_rise: float = 2.0,
) -> QuantizeResult:
    """Quantize, measure the gate, and while it fails keep the most sensitive layer group in float.

    Sensitivity of a group: the gate drop (then the verdict flips, then the threshold rise) when only that group
    is quantized and everything else stays in float.
    Measured that way, one group's damage is not hidden by the others' (with everything else quantized, no
    single group brought any recovery on kit, although two of them together held the whole drop). Groups then
    return to float in order of damage, one at a time, until the gate holds.
    """
    model = onnx.load(str(fp32_path))
    groups = quantizable_groups(model)
    base_float = float_nodes(model)
    reference = gate_metrics(make_infer(fp32_path), gate, batch_size, sigma)
    tries: list[dict] = []

    def excluded(float_groups: list[str]) -> list[str]:
        return base_float + [n for g in float_groups for n in groups[g]]

    ranges_cache = out_path.with_name(out_path.stem + ".ranges.json")
    ranges_cache.unlink(missing_ok=True)

    def attempt(float_groups: list[str], label: str) -> GateMetrics:
        exclude = excluded(float_groups)
        quantize_qdq(fp32_path, out_path, frames, batch_size, method, exclude, for_tensorrt, ranges_cache)
        metrics = gate_metrics(make_infer(out_path), gate, batch_size, sigma)
        tries.append({
            "label": label, "float_groups": list(float_groups), "image_auroc": metrics.image_auroc,
            "pixel_auroc": metrics.pixel_auroc, "drop": metrics.drop_from(reference), "verdict_flips": metrics.flips_from(reference),
            "threshold_rise": metrics.threshold_rise(reference),
        })
        LOG.info(
            "INT8 try '%s': image AUROC %.4f (FP32 %.4f), pixel AUROC %.4f (FP32 %.4f), %d verdict(s) flipped, threshold x%.2f",
            label, metrics.image_auroc, reference.image_auroc, metrics.pixel_auroc, reference.pixel_auroc,
            metrics.flips_from(reference), metrics.threshold_rise(reference),
        )
        return metrics

    try:
        metrics = attempt([], "all quantizable layers in INT8")
        if metrics.passes(reference, max_drop, max_threshold_rise):
            return QuantizeResult(reference, metrics, [], excluded([]), True, tries)
        ranked = rank_by_damage(list(groups), attempt, reference)
        kept: list[str] = []
        for group in ranked:
            kept.append(group)
            if len(kept) == len(groups):
                break
            metrics = attempt(kept, f"{len(kept)} group(s) in float")
            if metrics.passes(reference, max_drop, max_threshold_rise):
                return QuantizeResult(reference, metrics, kept, excluded(kept), True, tries, ranked)
        # Nothing left worth quantizing: the gate cannot hold with INT8 on this model.
        return QuantizeResult(reference, metrics, kept, excluded(kept), False, tries, ranked)
    finally:
        ranges_cache.unlink(missing_ok=True)
