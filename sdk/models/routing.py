"""What the router does with a trained detector, and what a detector costs: the one place that names experts,
runs the router over images, counts the expert sets it selects and counts parameters and FLOPs.

Training records it in the checkpoint (``routing_usage``), distillation sizes the student from it
(``TeacherUsage``), and folding decides from it which experts a static bundle keeps.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from amoe_sdk.models.detector import AnomalyMoE
from amoe_sdk.models.encoders import EncoderFeatures


def expert_names(model: AnomalyMoE) -> list[str]:
    """``["patch0", "patch1", "component0", ...]``: each expert's level and its index within the level."""
    counts: Counter[str] = Counter()
    names = []
    for level in model.expert_levels:
        names.append(f"{level}{counts[level]}")
        counts[level] += 1
    return names


@torch.no_grad()
def route_images(model: AnomalyMoE, images_bgr: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits and top-k weights for uint8 images [N, 3, S, S] -> ([N, E], [N, E])."""
    logits, weights = [], []
    for start in range(0, len(images_bgr), batch_size):
        chunk = images_bgr[start : start + batch_size]
        chunk_logits, chunk_weights = model.route(model.encode(chunk.float()).descriptor, len(chunk))
        logits.append(chunk_logits)
        weights.append(chunk_weights)
    return torch.cat(logits), torch.cat(weights)


def selected_sets(weights: torch.Tensor) -> list[tuple[int, ...]]:
    """Top-k weights [N, E] -> each image's selected experts, as sorted index tuples."""
    return [tuple(int(e) for e in torch.nonzero(row > 0).flatten()) for row in weights]


def set_histogram(sets: list[tuple[int, ...]], names: list[str]) -> list[dict]:
    """The selected expert sets, most common first: ``{"experts": [names], "count": n, "share": n / N}``."""
    counts = Counter(sets)
    return [
        {"experts": [names[e] for e in experts], "count": count, "share": count / len(sets)}
        for experts, count in counts.most_common()
    ]


def product_routing(model: AnomalyMoE, features: EncoderFeatures) -> dict:
    """Where the router sends one product's images (their encoder features): ``{"images": N, "agreement": the
    share of the most common expert set, "expert_sets": set_histogram}``. The agreement is what folding to one
    static set keeps of the dense detector."""
    with torch.no_grad():
        sets = selected_sets(model.route(features.descriptor, len(features.taps))[1])
    histogram = set_histogram(sets, expert_names(model))
    return {"images": len(sets), "agreement": histogram[0]["share"], "expert_sets": histogram}


@torch.no_grad()
def selection_summary(model: AnomalyMoE, weights: torch.Tensor) -> dict:
    """How often each expert is among the top-k ([N, E] weights) and the mean weight it gets, by expert level."""
    return {
        "selected_share": (weights > 0).float().mean(dim=0).tolist(),
        "mean_weight": weights.mean(dim=0).tolist(),
        "experts": list(model.expert_levels),
    }


def count_cost(module: nn.Module, input_size: int) -> tuple[int, float]:
    """(parameters, GFLOPs per image at batch 1) of what a detector's inference forward pass actually runs:
    parameters of the modules that execute (an exporter drops the rest, such as encoder stages after the last
    tap of a detector without router), FLOPs as counted by torch."""
    executed: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, *_: executed.add(id(mod))) for m in module.modules()]
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            module(torch.zeros(1, 3, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
    params = sum(p.numel() for m in module.modules() if id(m) in executed for p in m.parameters(recurse=False))
    return params, counter.get_total_flops() / 1e9
