"""What every INT8 path shares: which layers may be quantized, the layer groups the sensitivity search works
on, and the accuracy gate measured on our own anomaly metrics.

Layer names come from the exported graph, whose node names keep the PyTorch module path
(``/detector/encoder/stages.3/...``, ``/detector/patch_experts.0/blocks.1/...``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from amoe_sdk.calibration.data import GateSet
from amoe_sdk.converters.graph import infer_in_batches
from amoe_sdk.evaluation.metrics import auroc

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")

# Kept in floating point from the start: a flipped routing or component assignment, or a shifted distance or
# normalisation, changes the anomaly signal itself rather than adding noise to it.
FLOAT_FROM_THE_START = (
    r"/router/",
    r"/assigner/",
    r"/blur/",
    r"/patch_experts\.\d+/head/",
    r"/component_experts\.\d+/decoder/fc2/",
    r"/global_experts\.\d+/ae_head/",
    r"/global_experts\.\d+/student/student\.6/",
)


def always_float(name: str) -> bool:
    return any(re.search(pattern, name) for pattern in FLOAT_FROM_THE_START)


def layer_group(name: str) -> str:
    """The unit the sensitivity search keeps in float together: an encoder stage, or a block of one expert."""
    parts = [p for p in name.split("/") if p]
    # encoder/stem, encoder/stages.3, patch_experts.0/blocks.1, global_experts.1/student ...
    return "/".join(parts[1:3]) or name


def quantizable_groups(model: onnx.ModelProto) -> "OrderedDict[str, list[str]]":
    """Quantizable node names by group, in graph order, without the float-from-the-start ones."""
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OP_TYPES and not always_float(node.name):
            groups.setdefault(layer_group(node.name), []).append(node.name)
    return groups


def float_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES and always_float(n.name)]


@dataclass
class GateMetrics:
    image_auroc: float
    pixel_auroc: float
    scores: np.ndarray
    maps: np.ndarray
    routing: np.ndarray

    def drop_from(self, reference: "GateMetrics") -> float:
        """The larger of the image and pixel AUROC drops (positive = worse)."""
        return max(reference.image_auroc - self.image_auroc, reference.pixel_auroc - self.pixel_auroc)


def gate_metrics(infer: Callable[[np.ndarray], dict[str, np.ndarray]], gate: GateSet, batch_size: int) -> GateMetrics:
    """Image and pixel AUROC of an artifact (``infer`` takes a uint8 [B, S, S, 3] batch) on the gate set."""
    outputs = infer_in_batches(infer, gate.frames, batch_size)
    scores, maps = outputs["score"].astype(np.float64), outputs["anomaly_map"][:, 0].astype(np.float32)
    return GateMetrics(auroc(gate.labels, scores), auroc(gate.masks, maps), scores, maps, outputs["routing_weights"])
