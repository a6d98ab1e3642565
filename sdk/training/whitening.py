"""Whitened reconstruction residuals for the patch experts, fitted and chosen per product after training.

A patch expert's cosine map sees a feature that turns away from its reconstruction, but not one that keeps its
direction and changes its size or its balance of channels (a subtle dent or scratch on a texture), nor a part
that is reconstructed well because it is a normal part, only in the wrong place (a shifted label, two parts
fused). So each position's residual gets its normal statistics from the training images, in two forms
(``PatchExpert``): a mean and spread per channel (diagonal), and the principal directions the residual varies
in (subspace). One form joins the cosine map, with a gain measured like the level shares: only where it
separates held-out normals from pseudo-anomalies better than the cosine map alone (the measurements are in the
README, "The detector").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from amoe_sdk.evaluation.metrics import auroc
from amoe_sdk.models.detector import LEVELS, AnomalyMoE
from amoe_sdk.models.encoders import EncoderFeatures
from amoe_sdk.models.experts import cosine_distance
from amoe_sdk.training.fusion import (
    MIN_ERROR_REDUCTION, Encoded, PseudoAnomalies, best_removing_enough_error, level_outputs, pseudo_anomaly_sets,
)

# (form, gain) tried in order; a gain is in units of the cosine map's normal spread.
CANDIDATES = (("cosine", 0.0), ("diagonal", 0.5), ("diagonal", 1.0), ("subspace", 0.5), ("subspace", 1.0), ("subspace", 2.0), ("subspace", 4.0))
# The gains tried for the patch memory and the colour deviation, in units of the patch map's normal spread (0,
# without the term, is always tried), and how far a term may lower any pseudo-anomaly AUROC (``choose_memory``
# says why it is kept unless it costs): one point, the resolution the accuracy goals are stated in.
TERM_GAINS = (0.5, 1.0, 2.0)
MAX_TERM_AUROC_DROP = 0.01
# The colour deviation's gains: finer at the low end, where on leather the subtle pseudo-anomalies gained most of
# what they gain and the blatant ones' pixel AUROC lost least.
COLOUR_GAINS = (0.125, 0.25, 0.5, 1.0)
MIN_RESIDUAL_STD = 1e-3
# The subspace form's floor, as a share of the residual's variance over all positions and channels: the variance
# given to every direction outside the principal ones. Measured flat from 0.003 to 0.1 on vial, pins and leather.
SUBSPACE_FLOOR = 0.01


@dataclass
class SpreadRatios:
    """Per patch expert, the ratio of the cosine map's normal spread to each whitened form's: ``diagonal`` [T]
    per tap, ``subspace`` a scalar; the scale at which a gain of 1 gives both maps equal normal spread."""

    diagonal: list[torch.Tensor]
    subspace: list[float]


def _principal_subspace(centred: torch.Tensor, dim: int, floor: float, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """centred residuals [M, N, C] of M normal images -> (basis [N, C, K], weights floor / (variance + floor)
    [N, K]) with K = ``dim``; directions beyond the M - 1 the images span get weight 1 (variance 0)."""
    m, n, c = centred.shape
    basis = torch.zeros(n, c, dim)
    weights = torch.ones(n, dim)
    rank = min(dim, m - 1, c)
    x = centred.transpose(0, 1).double()  # [N, M, C]
    for start in range(0, n, chunk):  # chunks keep the batched eigensolver's memory small
        part = x[start : start + chunk]
        variance, vectors = torch.linalg.eigh(part.transpose(1, 2) @ part / max(m - 1, 1))  # ascending
        top = slice(c - rank, c)
        basis[start : start + chunk, :, :rank] = vectors[..., top].flip(-1).float()
        weights[start : start + chunk, :rank] = (floor / (variance[..., top].flip(-1).clamp_min(0) + floor)).float()
    return basis, weights


@torch.no_grad()
def fit_residual_statistics(model: AnomalyMoE, train: EncoderFeatures, batch_size: int = 16) -> SpreadRatios:
    """Set every whitened patch expert's residual statistics (``residual_mean`` / ``residual_std`` [N, C],
    ``residual_basis`` / ``residual_basis_weight``) from the normal training features -> the spread ratios."""
    model.eval()
    diagonal, subspace = [], []
    for expert in model.patch_experts:
        if not expert.whitened:
            diagonal.append(torch.zeros(len(expert.tap_channels)))
            subspace.append(0.0)
            continue
        residuals, cosines = [], []
        for start in range(0, len(train.taps), batch_size):
            tokens = model.standardise(train.taps[start : start + batch_size])
            recon, _ = expert.reconstruct(tokens)
            residuals.append(tokens - recon)
            pairs = zip(tokens.split(expert.tap_channels, -1), recon.split(expert.tap_channels, -1))
            cosines.append(torch.stack([cosine_distance(t, r, dim=-1) for t, r in pairs], -1))
        residual = torch.cat(residuals)  # [M, N, C]
        expert.residual_mean.copy_(residual.mean(dim=0))
        expert.residual_std.copy_(residual.std(dim=0).clamp_min(MIN_RESIDUAL_STD))
        centred = residual - expert.residual_mean
        floor = SUBSPACE_FLOOR * float(residual.flatten(0, 1).var(dim=0).mean())
        basis, weights = _principal_subspace(centred, expert.residual_basis.shape[-1], floor)
        expert.residual_basis.copy_(basis)
        expert.residual_basis_weight.copy_(weights)
        per_tap, distance = expert.whitened_residuals(residual, torch.zeros_like(residual))
        cosine = torch.cat(cosines)  # [M, N, T]
        spread = cosine.flatten(0, 1).std(dim=0)  # [T]
        diagonal.append(spread / torch.stack(per_tap, -1).flatten(0, 1).std(dim=0).clamp_min(1e-12))
        subspace.append(float(cosine.mean(dim=-1).std() / distance.std().clamp_min(1e-12)))
    return SpreadRatios(diagonal, subspace)


def _set_form(model: AnomalyMoE, ratios: SpreadRatios, form: str, gain: float) -> None:
    for expert, diagonal, subspace in zip(model.patch_experts, ratios.diagonal, ratios.subspace):
        if expert.whitened:
            expert.residual_gain.copy_(gain * diagonal if form == "diagonal" else torch.zeros_like(diagonal))
            expert.residual_subspace_gain.fill_(gain * subspace if form == "subspace" else 0.0)


def patch_separation(
    model: AnomalyMoE, val_images: torch.Tensor, sets: dict[str, PseudoAnomalies], encoded: Encoded | None = None,
) -> dict[str, float]:
    """How well the patch level alone separates the held-out normals (uint8 [N, 3, S, S]) from each pseudo-anomaly
    set: its image and pixel AUROC on each, and their mean. The pixel AUROC counts too: on an object whose
    pseudo-anomalies all score above its normals (vial), it still tells a map that finds them from one that only
    flags their images. ``encoded``: their encoder features (``encode_calibration_images``), so only the experts run."""
    patch = LEVELS.index("patch")
    encoded = encoded or {}
    normal_scores, normal_maps = level_outputs(model, val_images, patch, features=encoded.get("normal"))
    per_set = {}
    for name, pseudo in sets.items():
        scores, maps = level_outputs(model, pseudo.images, patch, features=encoded.get(name))
        image_labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(scores))]
        per_set[f"{name} image"] = auroc(image_labels, np.r_[normal_scores[:, patch], scores[:, patch]])
        pixel_labels = np.concatenate([np.zeros(normal_maps.shape, bool), pseudo.masks])
        per_set[f"{name} pixel"] = auroc(pixel_labels.ravel(), np.concatenate([normal_maps, maps]).ravel())
    return {**per_set, "mean": float(np.mean(list(per_set.values())))}


@torch.no_grad()
def choose_whitening(
    model: AnomalyMoE, ratios: SpreadRatios, val_images: torch.Tensor, renormalise: Callable[[], None], seed: int,
    sets: dict[str, PseudoAnomalies] | None = None, encoded: Encoded | None = None,
) -> dict:
    """Try each of ``CANDIDATES`` (renormalising the maps with ``renormalise`` each time) and keep the one whose
    patch level best separates the held-out normals (uint8 [N, 3, S, S]) from blatant and from subtle
    pseudo-anomalies (``patch_separation``), if it removes ``MIN_ERROR_REDUCTION`` of the cosine map's error.
    -> the record the checkpoint keeps."""
    sets = pseudo_anomaly_sets(val_images, seed) if sets is None else sets
    separation = {}
    for form, gain in CANDIDATES:
        _set_form(model, ratios, form, gain)
        renormalise()
        separation[(form, gain)] = patch_separation(model, val_images, sets, encoded)
    best = best_removing_enough_error(separation, CANDIDATES, baseline=CANDIDATES[0])
    _set_form(model, ratios, *best)
    renormalise()
    return {
        "rule": f"form and gain with the best patch-level AUROC (image and pixel) on held-out normals vs pseudo-anomalies, if it removes {MIN_ERROR_REDUCTION:.0%} of the cosine map's error",
        "patch_auroc_by_candidate": {f"{form} {gain}": separation[(form, gain)] for form, gain in CANDIDATES},
        "form": best[0],
        "gain": best[1],
    }


@torch.no_grad()
def choose_memory(
    model: AnomalyMoE, train: EncoderFeatures, val: EncoderFeatures, val_images: torch.Tensor,
    renormalise: Callable[[], None], seed: int, sets: dict[str, PseudoAnomalies] | None = None, encoded: Encoded | None = None,
) -> dict:
    """Fill ``model.patch_memory`` from the normal training features, then keep the largest of ``TERM_GAINS``
    the pseudo-anomalies tolerate (``_choose_term_gain``).

    The largest tolerated, not the best: what the memory sees (a part missing from its place, a fill line at the
    wrong height) no pseudo-anomaly shows, so the pseudo-anomalies can only tell where it costs (leather, whose
    blatant pseudo-anomalies' pixel AUROC it lowered by 2.4 points at the smallest gain), not where it helps.
    -> the record the checkpoint keeps."""
    for expert in model.patch_experts:
        expert.memory_gain.zero_()
    model.patch_memory.fit(model.standardise(train.taps), torch.Generator().manual_seed(seed))
    tokens = model.standardise(val.taps)
    sets = pseudo_anomaly_sets(val_images, seed) if sets is None else sets
    return _choose_term_gain(model, "memory", tokens, model.memory_distances(tokens), val_images, renormalise, sets, encoded)


@torch.no_grad()
def choose_colour(
    model: AnomalyMoE, train_images: torch.Tensor, val: EncoderFeatures, val_images: torch.Tensor,
    renormalise: Callable[[], None], seed: int, sets: dict[str, PseudoAnomalies] | None = None, encoded: Encoded | None = None,
) -> dict:
    """Fit ``model.colour`` on the normal training images (uint8 [M, 3, S, S]), then keep the one of
    ``COLOUR_GAINS`` with the best mean patch-level AUROC on the pseudo-anomalies (``_choose_term_gain``), if it
    removes ``MIN_ERROR_REDUCTION`` of the error without it, as for the whitened forms. Unlike the memory's, what
    the colour sees the subtle pseudo-anomalies show (a blended foreign texture tints its patch): on leather they
    rose from 0.65 to 0.97 image AUROC at gain 0.5 while the blatant ones' pixel AUROC fell 8.6 points, which the
    memory's rule would refuse. -> the record the checkpoint keeps."""
    for expert in model.patch_experts:
        expert.colour_gain.zero_()
    model.colour.fit(train_images)
    sets = pseudo_anomaly_sets(val_images, seed) if sets is None else sets
    deviations = torch.cat([model.colour(val_images[i : i + 32].float()) for i in range(0, len(val_images), 32)])
    return _choose_term_gain(
        model, "colour", model.standardise(val.taps), deviations, val_images, renormalise, sets, encoded, COLOUR_GAINS, "best"
    )


def _choose_term_gain(
    model: AnomalyMoE, term: str, val_tokens: torch.Tensor, values: torch.Tensor, val_images: torch.Tensor,
    renormalise: Callable[[], None], sets: dict[str, PseudoAnomalies], encoded: Encoded | None = None,
    candidates: tuple[float, ...] = TERM_GAINS, rule: str = "tolerated",
) -> dict:
    """Try each of ``candidates`` for the map term ``term`` (``memory`` or ``colour``: each patch expert's
    ``<term>_gain``), in units of the expert's normal map spread over the term's ``values`` [M, N] (both on the
    held-out normals), and keep, by ``rule``: ``tolerated``, the largest under which none of the patch level's
    AUROCs on the pseudo-anomalies (``patch_separation``: image and pixel, blatant and subtle) falls more than
    ``MAX_TERM_AUROC_DROP`` below its value without the term; ``best``, the one with the best mean of them if it
    removes ``MIN_ERROR_REDUCTION`` of the error without the term. -> the record the checkpoint keeps."""
    spread = float(values.std().clamp_min(1e-12))
    gains = [getattr(expert, f"{term}_gain") for expert in model.patch_experts]
    ratios = [float(expert(val_tokens).anomaly_map.std()) / spread for expert in model.patch_experts]
    separation = {}
    for gain in (0.0, *candidates):
        for buffer, ratio in zip(gains, ratios):
            buffer.fill_(gain * ratio)
        renormalise()
        separation[gain] = patch_separation(model, val_images, sets, encoded)
    without = separation[0.0]
    if rule == "tolerated":
        tolerated = [
            gain for gain in candidates
            if all(separation[gain][key] >= value - MAX_TERM_AUROC_DROP for key, value in without.items() if key != "mean")
        ]
        best = max(tolerated, default=0.0)
        described = f"the largest gain under which no patch-level AUROC (image and pixel, blatant and subtle) on held-out normals vs pseudo-anomalies falls more than {MAX_TERM_AUROC_DROP} below its value without the {term} term"
    else:
        best = best_removing_enough_error(separation, candidates, baseline=0.0)
        described = f"the gain with the best mean patch-level AUROC (image and pixel, blatant and subtle) on held-out normals vs pseudo-anomalies, if it removes {MIN_ERROR_REDUCTION:.0%} of the error without the {term} term"
    for buffer, ratio in zip(gains, ratios):
        buffer.fill_(best * ratio)
    renormalise()
    return {
        "rule": described,
        "patch_auroc_by_gain": {str(gain): value for gain, value in separation.items()},
        "gain": best,
        f"{term}_gain": [best * ratio for ratio in ratios],
    }
