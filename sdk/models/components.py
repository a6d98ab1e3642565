"""Component masks from inside the model: each grid cell belongs to its nearest of K fixed prototypes.

The prototypes are fitted by k-means on normal training features and stored as a buffer, so the masks are
computed in the forward pass with a fixed number of slots (no offline segmentation, no variable mask count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ComponentSlots:
    """``features``: [B, K, C] mean token per slot; ``areas``: [B, K] share of the grid; ``centroids``: [B, K, 2]
    mean (x, y) in [-1, 1] (0 for an empty slot); ``masks``: [B, K, G, G] one-hot assignment."""

    features: torch.Tensor
    areas: torch.Tensor
    centroids: torch.Tensor
    masks: torch.Tensor


class ComponentAssigner(nn.Module):
    """``forward(tokens [B, N, C])`` -> ``ComponentSlots``.

    Centroids are kept because a component in the wrong place (two parts swapped) has normal features and a
    normal area: only its position gives it away.
    """

    def __init__(self, num_slots: int, channels: int, grid_size: int):
        super().__init__()
        self.grid_size = grid_size
        self.register_buffer("prototypes", torch.zeros(num_slots, channels))
        self.register_buffer("slot_ids", torch.arange(num_slots), persistent=False)
        axis = torch.linspace(-1.0, 1.0, grid_size)
        yy, xx = torch.meshgrid(axis, axis, indexing="ij")
        self.register_buffer("coords", torch.stack([xx.flatten(), yy.flatten()], dim=1), persistent=False)  # [N, 2]

    def forward(self, tokens: torch.Tensor) -> ComponentSlots:
        b, n, _ = tokens.shape
        # Squared distance up to the per-token constant ||x||^2, which does not change the argmin.
        scores = tokens @ self.prototypes.t() * 2.0 - (self.prototypes**2).sum(dim=1)  # [B, N, K]
        nearest = scores.argmax(dim=-1, keepdim=True)  # [B, N, 1]
        onehot = (nearest == self.slot_ids).to(tokens.dtype).transpose(1, 2)  # [B, K, N]
        counts = onehot.sum(dim=2)  # [B, K]
        # clamp_min, not "+ 1e-8": an exporter may drop a tiny additive constant and turn 0/0 into NaN.
        denominator = counts.clamp_min(1.0).unsqueeze(-1)
        slot_features = (onehot @ tokens) / denominator
        centroids = (onehot @ self.coords) / denominator
        masks = onehot.view(b, -1, self.grid_size, self.grid_size)
        return ComponentSlots(slot_features, counts / n, centroids, masks)


def kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding: points [P, C] -> centres [k, C]. Empty clusters are reseeded."""
    p = points.shape[0]
    if p < k:
        raise ValueError(f"k-means needs at least {k} points, got {p}")
    centres = points[torch.randint(p, (1,), generator=generator)]
    for _ in range(1, k):
        d2 = torch.cdist(points, centres).min(dim=1).values ** 2
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / p)
        centres = torch.cat([centres, points[torch.multinomial(probs, 1, generator=generator)]])
    for _ in range(iters):
        assign = torch.cdist(points, centres).argmin(dim=1)
        for j in range(k):
            members = points[assign == j]
            centres[j] = members.mean(0) if len(members) else points[torch.randint(p, (1,), generator=generator)][0]
    return centres
