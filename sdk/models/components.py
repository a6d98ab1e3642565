"""Component masks from inside the model: each position belongs to its nearest of K fixed prototypes.

The prototypes are fitted by k-means on normal training features and stored as a buffer, so the masks are
computed in the forward pass with a fixed number of slots (no offline segmentation, no variable mask count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from amoe_sdk.models.layers import standardise_taps

# The offset of a closed slot: far below any score a position has for an open one, and finite in FP16.
SLOT_CLOSED = -1e4


def group_slot_offsets(groups: int, slots_per_group: int) -> torch.Tensor:
    """[groups, groups * slots_per_group]: row g opens group g's slots (0) and closes the others (``SLOT_CLOSED``)."""
    own = torch.eye(groups).repeat_interleave(slots_per_group, dim=1)
    return (1.0 - own) * SLOT_CLOSED


@dataclass
class ComponentSlots:
    """``features``: [B, K, C] mean token per slot; ``areas``: [B, K] share of the image; ``centroids``: [B, K, 2]
    mean (x, y) in [-1, 1] (0 for an empty slot); ``masks``: [B, K, G, G] share of each grid cell the slot covers;
    ``composition``: [B, K] each slot's term of the Mahalanobis distance of the slots' square-root areas from those
    of normal images (they sum to the distance; 0 until fitted)."""

    features: torch.Tensor
    areas: torch.Tensor
    centroids: torch.Tensor
    masks: torch.Tensor
    composition: torch.Tensor


class ComponentAssigner(nn.Module):
    """``forward(tokens [B, N, C], components [B, Cc, A, A] or None)`` -> ``ComponentSlots``.

    Each position of the component grid (A x A, a whole multiple of the token grid G; the token grid itself when
    ``components`` is None) goes to its nearest prototype; a slot's feature is the mean of the tokens it covers,
    weighted by how much of each cell it covers. Centroids are kept because a component in the wrong place (two
    parts swapped) has normal features and a normal area: only its position gives it away. ``slot_offset`` [K]
    closes slots (``SLOT_CLOSED``): over a range of products, each product's positions go to its own slots only.
    """

    def __init__(self, num_slots: int, channels: int, grid_size: int, component_channels: int | None = None, component_grid: int | None = None):
        super().__init__()
        component_channels = component_channels or channels
        component_grid = component_grid or grid_size
        if component_grid % grid_size:
            raise ValueError(f"the component grid ({component_grid}) must be a whole multiple of the token grid ({grid_size})")
        self.grid_size = grid_size
        self.component_grid = component_grid
        self.register_buffer("prototypes", torch.zeros(num_slots, component_channels))
        # 0 for an open slot, SLOT_CLOSED for one no position may go to: a product's calibration.
        self.register_buffer("slot_offset", torch.zeros(num_slots))
        # Per-channel statistics of the component taps on normal training images (identity on the main tokens,
        # which are standardised already).
        self.register_buffer("component_mean", torch.zeros(component_channels))
        self.register_buffer("component_std", torch.ones(component_channels))
        # Normal square-root areas: mean [K] and inverse covariance [K, K]; zeros (no composition term) until fitted.
        self.register_buffer("area_mean", torch.zeros(num_slots))
        self.register_buffer("area_precision", torch.zeros(num_slots, num_slots))
        self.register_buffer("slot_ids", torch.arange(num_slots), persistent=False)
        axis = torch.linspace(-1.0, 1.0, component_grid)
        yy, xx = torch.meshgrid(axis, axis, indexing="ij")
        self.register_buffer("coords", torch.stack([xx.flatten(), yy.flatten()], dim=1), persistent=False)  # [A*A, 2]

    def assignment_tokens(self, tokens: torch.Tensor, components: torch.Tensor | None) -> torch.Tensor:
        """The tokens the prototypes are compared with: [B, A*A, Cc], standardised."""
        return tokens if components is None else standardise_taps(components, self.component_mean, self.component_std)

    def composition(self, areas: torch.Tensor) -> torch.Tensor:
        """[B, K] areas -> [B, K] each slot's term of the Mahalanobis distance of their square roots from the normal
        ones, deviation_k * (precision @ deviation)_k, so that the distance is their sum."""
        deviation = areas.sqrt() - self.area_mean
        return (deviation @ self.area_precision) * deviation

    def forward(self, tokens: torch.Tensor, components: torch.Tensor | None = None, slot_offset: torch.Tensor | None = None) -> ComponentSlots:
        """``slot_offset``: [B, K], each image's own (training over a range); by default the buffer's, [K]."""
        b = tokens.shape[0]
        assign = self.assignment_tokens(tokens, components)
        offset = (self.slot_offset if slot_offset is None else slot_offset).view(-1, 1, self.prototypes.shape[0])
        # Squared distance up to the per-token constant ||x||^2, which does not change the argmin.
        scores = assign @ self.prototypes.t() * 2.0 - (self.prototypes**2).sum(dim=1) + offset  # [B, M, K]
        nearest = scores.argmax(dim=-1, keepdim=True)  # [B, M, 1]
        onehot = (nearest == self.slot_ids).to(tokens.dtype).transpose(1, 2)  # [B, K, M]
        counts = onehot.sum(dim=2)  # [B, K]
        # clamp_min, not "+ 1e-8": an exporter may drop a tiny additive constant and turn 0/0 into NaN.
        centroids = (onehot @ self.coords) / counts.clamp_min(1.0).unsqueeze(-1)
        areas = counts / onehot.shape[2]
        ratio = self.component_grid // self.grid_size
        masks = onehot.view(b, -1, self.component_grid, self.component_grid)
        if ratio > 1:
            masks = F.avg_pool2d(masks, ratio)  # [B, K, G, G]: the share of each cell
        cover = masks.flatten(2)  # [B, K, N]
        # The smallest non-zero cover is one component-grid position, 1 / ratio^2 of a cell.
        slot_features = (cover @ tokens) / cover.sum(dim=2).clamp_min(1.0 / ratio**2).unsqueeze(-1)
        return ComponentSlots(slot_features, areas, centroids, masks, self.composition(areas))


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
