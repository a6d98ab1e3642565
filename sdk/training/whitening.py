"""Whitened reconstruction residuals for the patch experts, fitted and chosen per product after training.

A patch expert's cosine map sees a feature that turns away from its reconstruction, but not one that keeps its
direction and changes its size or its balance of channels, which is what a subtle dent or scratch on a texture
does. So each position's and channel's residual gets its normal mean and spread from the training images, and
the whitened squared residual joins the cosine map, with a gain measured like the level shares: only where it
separates held-out normals from pseudo-anomalies better than the cosine map alone (the measurements are in the
README, "The detector"). Statistics per position suit a texture or an aligned tray and not an object whose pose
varies; the choice keeps the gain at zero there.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from amoe_sdk.evaluation.metrics import auroc
from amoe_sdk.models.detector import LEVELS, AnomalyMoE
from amoe_sdk.models.encoders import EncoderFeatures
from amoe_sdk.models.experts import cosine_distance
from amoe_sdk.training.fusion import level_scores, pseudo_anomaly_sets

# The whitened map's weight, in units of the cosine map's normal spread per tap, tried in order.
CANDIDATE_GAINS = (0.0, 0.5, 1.0)
# A gain is kept only if it raises the patch level's pseudo-anomaly AUROC by this much over the cosine map alone:
# a smaller gain is within the noise of 15 to 30 held-out images and would make every product pay for the maps.
MIN_GAIN_IN_AUROC = 0.01
MIN_RESIDUAL_STD = 1e-3


@torch.no_grad()
def fit_residual_statistics(model: AnomalyMoE, train: EncoderFeatures, batch_size: int = 16) -> list[torch.Tensor]:
    """Set every whitened patch expert's ``residual_mean`` / ``residual_std`` [N, C] from the normal training
    features, and return per expert the ratio of each tap's cosine-map spread to its whitened-map spread [T]:
    the scale at which a gain of 1 gives both maps equal normal spread."""
    model.eval()
    ratios = []
    for expert in model.patch_experts:
        if not expert.whitened:
            ratios.append(torch.zeros(len(expert.tap_channels)))
            continue
        residuals, cosines = [], []
        for start in range(0, len(train.taps), batch_size):
            tokens = model.standardise(train.taps[start : start + batch_size])
            recon, _ = expert.reconstruct(tokens)
            residuals.append(tokens - recon)
            cosines.append(
                torch.stack([cosine_distance(t, r, dim=-1) for t, r in zip(tokens.split(expert.tap_channels, -1), recon.split(expert.tap_channels, -1))], -1)
            )
        residual = torch.cat(residuals)  # [B, N, C]
        expert.residual_mean.copy_(residual.mean(dim=0))
        expert.residual_std.copy_(residual.std(dim=0).clamp_min(MIN_RESIDUAL_STD))
        whitened = ((residual - expert.residual_mean) / expert.residual_std) ** 2
        whitened = torch.stack([part.mean(dim=-1) for part in whitened.split(expert.tap_channels, -1)], -1)  # [B, N, T]
        cosine = torch.cat(cosines)  # [B, N, T]
        ratios.append(cosine.flatten(0, 1).std(dim=0) / whitened.flatten(0, 1).std(dim=0).clamp_min(1e-12))
    return ratios


def _set_gains(model: AnomalyMoE, ratios: list[torch.Tensor], gain: float) -> None:
    for expert, ratio in zip(model.patch_experts, ratios):
        if expert.whitened:
            expert.residual_gain.copy_(gain * ratio)


@torch.no_grad()
def choose_residual_gain(
    model: AnomalyMoE, ratios: list[torch.Tensor], val_images: torch.Tensor, renormalise: Callable[[], None], seed: int
) -> dict:
    """Try each of ``CANDIDATE_GAINS`` (renormalising the maps with ``renormalise`` each time) and keep the one
    whose patch level best separates the held-out normals (uint8 [N, 3, S, S]) from blatant and from subtle
    pseudo-anomalies (the mean of the two AUROCs), if it beats the cosine map alone by ``MIN_GAIN_IN_AUROC``.
    -> the record the checkpoint keeps."""
    patch = LEVELS.index("patch")
    sets = pseudo_anomaly_sets(val_images, seed)
    separation = {}
    for gain in CANDIDATE_GAINS:
        _set_gains(model, ratios, gain)
        renormalise()
        normal = level_scores(model, val_images)[:, patch]
        per_set = {}
        for name, images in sets.items():
            anomalous = level_scores(model, images)[:, patch]
            per_set[name] = auroc(np.r_[np.zeros(len(normal)), np.ones(len(anomalous))], np.r_[normal, anomalous])
        separation[gain] = {**per_set, "mean": float(np.mean(list(per_set.values())))}
    best = max(CANDIDATE_GAINS, key=lambda g: separation[g]["mean"])
    chosen = best if separation[best]["mean"] - separation[0.0]["mean"] >= MIN_GAIN_IN_AUROC else 0.0
    _set_gains(model, ratios, chosen)
    renormalise()
    return {
        "rule": f"gain with the best patch-level AUROC on held-out normals vs pseudo-anomalies, if at least {MIN_GAIN_IN_AUROC} above the cosine map alone",
        "patch_auroc_by_gain": {str(g): separation[g] for g in CANDIDATE_GAINS},
        "gain": chosen,
    }
