"""The components' normal areas, measured after training, for the component experts' composition distance.

A missing, extra or oversized part changes how much of the image its component covers, while every position
still looks like a normal one: only the areas taken together give it away. After training, the square roots of
the slots' areas on the normal training images get their mean and covariance (a part's area trades against the
area around it, so the slots' areas move together), and each component expert adds each slot's term of the
Mahalanobis distance of an image's areas from them to that slot's score, scaled so that on normal images the
distance varies as much as the expert's own map does (``ComponentExpertConfig.composition_gain`` times that).
The measurements are in the README.
"""

from __future__ import annotations

import torch

from amoe_sdk.models.detector import AnomalyMoE
from amoe_sdk.models.encoders import EncoderFeatures

# Share of the slots' mean area variance added to the covariance's diagonal: a slot whose area never varies on
# the training images (or an unused one) must not make a distance out of rounding.
RIDGE = 0.01


@torch.no_grad()
def component_outputs(model: AnomalyMoE, features: EncoderFeatures, batch_size: int = 32) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The slots' areas [N, K] and each component expert's map [N, G, G] on cached encoder features."""
    areas, maps = [], []
    for start in range(0, len(features.taps), batch_size):
        chunk = features.select(slice(start, start + batch_size))
        slots = model.assigner(model.standardise(chunk.taps), chunk.components)
        areas.append(slots.areas)
        maps.append(torch.cat([expert(slots).anomaly_map for expert in model.component_experts], dim=1))
    maps = torch.cat(maps)
    return torch.cat(areas), [maps[:, e] for e in range(maps.shape[1])]


@torch.no_grad()
def fit_composition(model: AnomalyMoE, train: EncoderFeatures, gain: float) -> dict:
    """Fit ``model.assigner``'s normal areas and each component expert's ``composition_scale`` on the normal
    training features -> the record the checkpoint keeps."""
    assigner = model.assigner
    for expert in model.component_experts:
        expert.composition_scale.zero_()  # the experts' own maps, without a term fitted before
    areas, maps = component_outputs(model, train)
    roots = areas.double().sqrt()
    mean = roots.mean(dim=0)
    centred = roots - mean
    covariance = centred.t() @ centred / max(len(roots) - 1, 1)
    covariance += RIDGE * covariance.diagonal().mean().clamp_min(1e-12) * torch.eye(len(mean), dtype=covariance.dtype)
    assigner.area_mean.copy_(mean.float())
    assigner.area_precision.copy_(torch.linalg.inv(covariance).float())
    distances = assigner.composition(areas).sum(dim=1)
    spread = distances.std().clamp_min(1e-12)
    scales = [float(gain * expert_map.std() / spread) for expert_map in maps]
    for expert, scale in zip(model.component_experts, scales):
        expert.composition_scale.fill_(scale)
    return {
        "rule": "gain x (spread of the expert's map on normal training images) / (spread of the areas' Mahalanobis distance on them)",
        "gain": gain,
        "normal_area_share": areas.mean(dim=0).tolist(),
        "normal_distance": {"mean": float(distances.mean()), "max": float(distances.max())},
        "composition_scale": scales,
    }
