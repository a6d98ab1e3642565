"""What every INT8 path shares: which layers may be quantized, the layer groups the sensitivity search works
on, and the accuracy gate measured on our own anomaly metrics.

Layer names come from the exported graph, whose node names keep the PyTorch module path
(``/detector/encoder/stages.3/...``, ``/detector/patch_experts.0/blocks.1/...``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnx

from amoe_sdk.calibration.data import GateSet
from amoe_sdk.calibration.thresholds import normal_threshold
from amoe_sdk.converters.graph import infer_in_batches
from amoe_sdk.evaluation.metrics import auroc

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")

# An expert's module path: ``patch_experts.0`` in a dense detector, ``experts.0`` in a folded one.
EXPERT = r"(?:patch_|component_|global_)?experts\.\d+"

# Kept in floating point from the start: a flipped routing or component assignment, or a shifted distance or
# normalisation, changes the anomaly signal itself rather than adding noise to it. The encoder's first layers
# carry the finest detail, where small defects live: quantized, the stem and first stage cost kit 12 and 7
# points of gate pixel AUROC each, and weave 1.5 points of test image AUROC that the pseudo-anomaly gate could
# not see; in float they cost about 4 % of the FP32 model's time.
FLOAT_FROM_THE_START = (
    r"/encoder/stem/",
    r"/encoder/stages\.0/",
    r"/encoder/patch_embed/",
    r"/router/",
    r"/assigner/",
    r"/patch_memory/",
    r"/colour/",
    r"/blur/",
    rf"/{EXPERT}/head/",
    rf"/{EXPERT}/decoder/fc2/",
    rf"/{EXPERT}/ae_head/",
    rf"/{EXPERT}/student/student\.6/",
)

# The anomaly signal's own path: each expert's distance between features and reconstruction (ops directly under
# an expert) and the detector's normalisation, fusion, upsampling and top-k (ops directly under the detector).
# Its values on anomalies lie beyond anything normal calibration images produce, so a quantizer calibrated on
# them clips exactly the anomalies (measured on kit: every anomalous score pinned at the normal maximum).
SIGNAL_PATH = (r"^/detector/[^/]+$", rf"^/detector/{EXPERT}/[^/]+$")


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


# AUROC only ranks: scores squeezed into a narrow band keep their order and lose every verdict. So the gate also
# bounds the gate images whose verdict, each model at its own threshold, differs from FP32's.
MAX_FLIPPED_SHARE = 0.05


def allowed_flips(gate_images: int) -> int:
    return max(1, int(np.ceil(MAX_FLIPPED_SHARE * gate_images)))


@dataclass
class GateMetrics:
    """One artifact on the gate set. ``threshold``: mean + sigma * std of its own scores on the normal images,
    the rule ``convert`` applies to the bundle, so verdicts compare as they will be deployed. ``groups``: image and
    pixel AUROC of each anomaly group (blatant and subtle pseudo-anomalies, or real ones) against the normals."""

    image_auroc: float
    pixel_auroc: float
    scores: np.ndarray
    maps: np.ndarray
    routing: np.ndarray
    threshold: float
    groups: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def verdicts(self) -> np.ndarray:
        return self.scores > self.threshold

    def drop_from(self, reference: "GateMetrics") -> float:
        """The largest image or pixel AUROC drop (positive = worse), over the whole gate set and over each anomaly
        group alone: subtle pseudo-anomalies are gated on their own, or the blatant ones, still perfectly
        separated, would hide what the subtle ones lost."""
        drops = [reference.image_auroc - self.image_auroc, reference.pixel_auroc - self.pixel_auroc]
        for name, (image, pixel) in self.groups.items():
            if name in reference.groups:
                drops += [reference.groups[name][0] - image, reference.groups[name][1] - pixel]
        return max(drops)

    def flips_from(self, reference: "GateMetrics") -> int:
        return int((self.verdicts != reference.verdicts).sum())

    def threshold_rise(self, reference: "GateMetrics") -> float:
        """How many times FP32's threshold this model's is: the normal noise floor a defect must clear."""
        return self.threshold / reference.threshold if reference.threshold > 0 else 1.0

    def passes(self, reference: "GateMetrics", max_drop: float, max_threshold_rise: float = 2.0) -> bool:
        """AUROC drops within ``max_drop``, few verdict flips, and a threshold at most ``max_threshold_rise`` times
        FP32's. Pseudo-anomalies are blatant and stay separated however noisy the normal maps get; a raised noise
        floor is what loses the subtle real defects (washer: threshold 0.55 -> 2.56, image AUROC 1.000 -> 0.883
        on its test set, while the gate's AUROCs held)."""
        return (
            self.drop_from(reference) <= max_drop
            and self.flips_from(reference) <= allowed_flips(len(self.scores))
            and self.threshold_rise(reference) <= max_threshold_rise
        )


def gate_metrics(infer: Callable[[np.ndarray], dict[str, np.ndarray]], gate: GateSet, batch_size: int, sigma: float = 3.0) -> GateMetrics:
    """Image and pixel AUROC and verdicts of an artifact (``infer`` takes a uint8 [B, S, S, 3] batch) on the gate set."""
    outputs = infer_in_batches(infer, gate.frames, batch_size)
    scores, maps = outputs["score"].astype(np.float64), outputs["anomaly_map"][:, 0].astype(np.float32)
    threshold = normal_threshold(scores[gate.labels == 0], sigma)[0]
    groups = {name: (auroc(gate.labels[i], scores[i]), auroc(gate.masks[i], maps[i])) for name, i in gate.group_indices().items()}
    return GateMetrics(auroc(gate.labels, scores), auroc(gate.masks, maps), scores, maps, outputs["routing_weights"], threshold, groups)


@dataclass
class QuantizationReport:
    """What an INT8 conversion measured and kept, as ``manifest.json`` records it under ``quantization``.

    ``fp32`` / ``int8``: image and pixel AUROC on the whole gate set; ``groups``: each anomaly group's (image,
    pixel) AUROC, FP32 and INT8; ``drop``: the worst of them (``GateMetrics.drop_from``); ``float_layers``: the
    convolutions and matmuls the artifact holds in float; ``float_groups``: the layer groups wholly in float
    beyond those float from the start; ``ranking``: the groups by damage, when the search measured it;
    ``routing_changed_images``: gate images whose expert set INT8 changed (dense routing); ``threshold_shift``:
    the INT8 bundle's measured threshold less FP32's on the gate normals."""

    method: str
    max_drop: float
    gate_data: str
    fp32: dict[str, float]
    int8: dict[str, float]
    groups: dict[str, dict[str, list[float]]]
    drop: float
    gate_label_flips: int
    gate_images: int
    threshold_rise: float
    passed: bool
    float_layers: list[str]
    float_groups: list[str]
    ranking: list[str]
    routing_changed_images: list[int]
    tries: list[dict]
    threshold_fp32: float
    threshold_shift: float | None = None
    tensorrt_calibration_cache: dict | None = None

    @classmethod
    def measure(
        cls, reference: GateMetrics, final: GateMetrics, gate: GateSet, method: str, max_drop: float, max_threshold_rise: float,
        float_layers: list[str], float_groups: list[str], ranking: list[str], tries: list[dict], dense_routing: bool,
    ) -> "QuantizationReport":
        changed = np.nonzero(((reference.routing > 0) != (final.routing > 0)).any(axis=1))[0] if dense_routing else []
        return cls(
            method=method, max_drop=max_drop, gate_data=gate.source,
            fp32={"image_auroc": reference.image_auroc, "pixel_auroc": reference.pixel_auroc},
            int8={"image_auroc": final.image_auroc, "pixel_auroc": final.pixel_auroc},
            groups={name: {"fp32": list(reference.groups[name]), "int8": list(values)} for name, values in final.groups.items()},
            drop=final.drop_from(reference), gate_label_flips=final.flips_from(reference), gate_images=len(gate.labels),
            threshold_rise=final.threshold_rise(reference), passed=final.passes(reference, max_drop, max_threshold_rise),
            float_layers=list(float_layers), float_groups=list(float_groups), ranking=list(ranking),
            routing_changed_images=[int(i) for i in changed], tries=tries, threshold_fp32=reference.threshold,
        )

    def group_summary(self) -> str:
        """Image / pixel AUROC FP32 -> INT8 of each gate group, as one clause."""
        return "by group: " + ", ".join(
            f"{name} {g['fp32'][0]:.4f} / {g['fp32'][1]:.4f} -> {g['int8'][0]:.4f} / {g['int8'][1]:.4f}" for name, g in self.groups.items()
        )

    def failure(self, max_threshold_rise: float) -> str:
        """Why the gate refused, with what to do."""
        return (
            f"INT8 misses the accuracy gate (--max-drop {self.max_drop}): image AUROC {self.fp32['image_auroc']:.4f} -> "
            f"{self.int8['image_auroc']:.4f}, pixel AUROC {self.fp32['pixel_auroc']:.4f} -> {self.int8['pixel_auroc']:.4f}, "
            f"{self.gate_label_flips} gate verdict(s) flipped (at most {allowed_flips(self.gate_images)} allowed), "
            f"threshold x{self.threshold_rise:.2f} (at most x{max_threshold_rise:g}); {self.group_summary()} "
            f"even with {len(self.float_layers)} layer(s) in float; use --precision fp16, raise --max-drop, or --force to keep it"
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["tensorrt_calibration_cache"] is None:
            del data["tensorrt_calibration_cache"]
        return data
