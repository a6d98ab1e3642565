"""Routing folded into static branches.

The router picks experts per image from a global descriptor. On a production line the images are alike, so the
router usually picks the same experts for all of them; then the router and every expert that never counts can be
dropped and the fusion weights become constants. ``fold_routing`` measures that on calibration images, refuses
when the images disagree (unless forced), and builds the smaller static detector.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from amoe_sdk.errors import ConversionError
from amoe_sdk.models.detector import AnomalyMoE, DetectorOutput, normalise_expert_maps, upsample_score_and_map
from amoe_sdk.models.encoders import EncoderFeatures
from amoe_sdk.models.layers import standardise_taps
from amoe_sdk.models.routing import count_cost, expert_names, route_images, selected_sets, set_histogram


@dataclass
class FoldingReport:
    """What folding found and did. ``histogram``: the selected expert sets, most common first, with their share
    of the calibration images; ``fusion_weights``: the constant weight of each kept expert in the score, and
    ``map_fusion_weights`` in the map (``AnomalyMoE.map_level_weights``; empty in reports written before the map
    had its own shares, whose map was the score's); ``max_weight_shift``:
    the largest difference, over the agreeing images, between an image's own fusion weights and the constants
    (0 means folding is exact on them)."""

    images: int
    histogram: list[dict]
    agreement: float
    min_agreement: float
    forced: bool
    selected: list[str]
    kept: list[str]
    fusion_weights: dict[str, float]
    routing_weights: dict[str, float]
    max_weight_shift: float
    map_fusion_weights: dict[str, float] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    gflops_before: float = 0.0
    gflops_after: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class FoldedDetector(nn.Module):
    """An ``AnomalyMoE`` with the router removed and only the kept experts, fused with constant weights.

    ``forward(images_bgr [B, 3, S, S] float BGR in [0, 255])`` -> ``DetectorOutput`` whose ``routing_weights`` are
    the constant folded top-k weights [B, E] (zeros for dropped experts) and ``router_logits`` zeros.
    """

    def __init__(
        self, model: AnomalyMoE, kept: list[int], fusion_weights: torch.Tensor, routing_weights: torch.Tensor,
        map_fusion_weights: torch.Tensor,
    ):
        super().__init__()
        self.config = model.config
        self.encoder = model.encoder
        self.register_buffer("feature_mean", model.feature_mean.clone())
        self.register_buffer("feature_std", model.feature_std.clone())
        levels = [model.expert_levels[e] for e in kept]
        all_experts = list(model.patch_experts) + list(model.component_experts) + list(model.global_experts)
        self.experts = nn.ModuleList(all_experts[e] for e in kept)
        self.levels = levels
        self.assigner = model.assigner if "component" in levels else None
        self.patch_memory = model.patch_memory if model.uses_memory and "patch" in levels else None
        self.colour = model.colour if model.uses_colour and "patch" in levels else None
        self.grid_size = model.grid_size
        self.register_buffer("map_low", model.map_low[kept].clone())
        self.register_buffer("map_high", model.map_high[kept].clone())
        self.register_buffer("fusion", fusion_weights.clone())  # [K], the score's
        self.register_buffer("map_fusion", map_fusion_weights.clone())  # [K], the map's
        self.register_buffer("routing", routing_weights.clone())  # [E]
        self.blur = model.blur
        self.num_experts = model.num_experts

    # No router: the encoder stops after its last tap.
    needs_descriptor = False

    def forward(self, images_bgr: torch.Tensor, features: EncoderFeatures | None = None) -> DetectorOutput:
        """``features``: as ``AnomalyMoE.forward``'s."""
        if features is None:
            features = self.encoder(images_bgr, with_descriptor=self.needs_descriptor)
        tokens = standardise_taps(features.taps, self.feature_mean, self.feature_std)
        slots = self.assigner(tokens, features.components) if self.assigner is not None else None
        memory = self.patch_memory(tokens) if self.patch_memory is not None else None
        colour = self.colour(images_bgr) if self.colour is not None else None
        maps = []
        for level, expert in zip(self.levels, self.experts):
            if level == "patch":
                maps.append(expert(tokens, memory=memory, colour=colour).anomaly_map)
            elif level == "component":
                maps.append(expert(slots).anomaly_map)
            else:
                maps.append(expert(images_bgr).anomaly_map)
        expert_maps = torch.cat(maps, dim=1)  # [B, K, G, G]
        normed = normalise_expert_maps(expert_maps, self.map_low, self.map_high)
        score_grid = (self.fusion.view(1, -1, 1, 1) * normed).sum(dim=1, keepdim=True)
        map_grid = (self.map_fusion.view(1, -1, 1, 1) * normed).sum(dim=1, keepdim=True)
        full, score = upsample_score_and_map(
            score_grid, map_grid, self.blur, self.config.input_size, self.config.postprocess.top_percent
        )
        b = images_bgr.shape[0]
        routing = self.routing.view(1, -1).expand(b, -1)
        return DetectorOutput(full, score, routing, torch.zeros_like(routing), expert_maps)


def fold_routing(
    model: AnomalyMoE, images_bgr: torch.Tensor, min_agreement: float = 0.95, force: bool = False, product_set: list[str] | None = None,
) -> tuple[FoldedDetector, FoldingReport]:
    """Measure the router on calibration images (uint8 [N, 3, S, S]) and fold it; raises ConversionError with the
    histogram when the most common expert set covers less than ``min_agreement`` of the images and not ``force``.
    ``product_set``: for one product of a range, the expert names its held-out normals route to; the fold is to
    that set and the agreement is the share of the images that pick it (images of another product route
    elsewhere and are refused, never folded to their own set under this product's calibration)."""
    if len(images_bgr) == 0:
        raise ConversionError("folding needs calibration images and got none; pass --calib-data with normal images")
    names = expert_names(model)
    logits, weights = route_images(model, images_bgr)
    sets = selected_sets(weights)
    histogram = set_histogram(sets, names)
    best, best_count = Counter(sets).most_common(1)[0]
    if product_set is not None:
        best = tuple(sorted(names.index(name) for name in product_set))
        best_count = sum(s == best for s in sets)
    agreement = best_count / len(sets)
    report_notes = []
    if agreement < min_agreement:
        which = f"the product's expert set ({' + '.join(product_set)})" if product_set else "one expert set"
        message = (
            f"the router agrees on {which} for only {agreement:.1%} of the {len(sets)} calibration images "
            f"(--fold-min-agreement {min_agreement:.0%}):\n{histogram_lines(histogram)}\n"
        )
        if not force:
            raise ConversionError(message + "use --routing dense (exact), or --force to fold to the most common set anyway")
        report_notes.append("forced: " + message.strip())
    agreeing = torch.tensor([s == best for s in sets])
    fusion = model.fusion_weights(logits[agreeing], weights[agreeing])  # [A, E]
    constant = fusion.mean(dim=0)
    map_constant = model.fusion_weights(logits[agreeing], weights[agreeing], model.map_level_weights).mean(dim=0)
    shift = float((fusion - constant).abs().max())
    kept = [e for e in range(model.num_experts) if constant[e] > 0]
    routing = weights[agreeing].mean(dim=0)
    folded = FoldedDetector(model, kept, constant[kept], routing, map_constant[kept]).eval()
    report = FoldingReport(
        images=len(sets),
        histogram=histogram,
        agreement=agreement,
        min_agreement=min_agreement,
        forced=bool(force and agreement < min_agreement),
        selected=[names[e] for e in best],
        kept=[names[e] for e in kept],
        fusion_weights={names[e]: float(constant[e]) for e in kept},
        map_fusion_weights={names[e]: float(map_constant[e]) for e in kept},
        routing_weights={names[e]: float(routing[e]) for e in best},
        max_weight_shift=shift,
        notes=report_notes,
    )
    report.params_before, report.gflops_before = count_cost(model, model.config.input_size)
    report.params_after, report.gflops_after = count_cost(folded, model.config.input_size)
    return folded, report


def histogram_lines(histogram: list[dict]) -> str:
    return "\n".join(f"  {row['share']:6.1%}  {row['count']:4d}  {' + '.join(row['experts'])}" for row in histogram)


def folded_from_report(model: AnomalyMoE, report: dict) -> FoldedDetector:
    """Rebuild the folded detector a bundle was exported from, from its manifest's folding report."""
    names = expert_names(model)
    kept = [names.index(name) for name in report["kept"]]
    fusion = torch.tensor([report["fusion_weights"][name] for name in report["kept"]])
    routing = torch.tensor([report["routing_weights"].get(name, 0.0) for name in names])
    map_weights = report.get("map_fusion_weights") or report["fusion_weights"]
    map_fusion = torch.tensor([map_weights[name] for name in report["kept"]])
    return FoldedDetector(model, kept, fusion, routing, map_fusion).eval()
