"""How far each cell's colour strays from its own image's colour: a texture's stains and foreign fibres.

A stain that darkens and warms a patch of leather, or a faded fibre across it, keeps the grain's shape and its
brightness within the grain's range, so the encoder's features, which ImageNet made indifferent to a slight
colour cast, barely move. The colour itself does: measured against the image's own mean colour (the product's
shade and the lighting's gain differ from image to image), under the spread normal cells show around it. Logs of
the colour make the lighting's gain and a stain's tint additive.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from amoe_sdk.models.encoders import resample_to_grid

# Added to the [0, 1] colour before the log: keeps black pixels finite and near-black noise from dominating.
LOG_OFFSET = 1.0 / 64.0


class ColourDeviation(nn.Module):
    """``forward(images_bgr [B, 3, S, S] float in [0, 255])`` -> [B, N]: the Mahalanobis distance of each grid
    cell's mean log colour, less the image's mean log colour, from the normal cells' (``fit``). One covariance for
    every position (``whitener`` [3, 3], its inverse's Cholesky factor): a texture varies alike everywhere, and
    where a product's colours depend on the place (an object), the gain measured after training keeps it out."""

    def __init__(self, grid_size: int):
        super().__init__()
        self.grid_size = grid_size
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("whitener", torch.eye(3))

    def deviations(self, images_bgr: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, N, 3]: each cell's mean log colour less its image's."""
        cells = resample_to_grid(torch.log(images_bgr / 255.0 + LOG_OFFSET), self.grid_size)  # [B, 3, G, G]
        cells = cells - cells.mean(dim=(2, 3), keepdim=True)
        return cells.flatten(2).transpose(1, 2)

    def fit(self, images_bgr: torch.Tensor, batch_size: int = 32) -> None:
        """The mean and covariance of the deviations of normal images (uint8 or float [M, 3, S, S])."""
        parts = [self.deviations(images_bgr[i : i + batch_size].float()) for i in range(0, len(images_bgr), batch_size)]
        points = torch.cat(parts).reshape(-1, 3).double()
        covariance = torch.cov(points.T)
        # A floor of a thousandth of the mean variance: a grey product (no chroma at all) stays invertible.
        covariance = covariance + 1e-3 * covariance.diagonal().mean().clamp_min(1e-12) * torch.eye(3, dtype=torch.double)
        self.mean.copy_(points.mean(dim=0).float())
        self.whitener.copy_(torch.linalg.cholesky(torch.linalg.inv(covariance)).float())

    def forward(self, images_bgr: torch.Tensor) -> torch.Tensor:
        z = (self.deviations(images_bgr) - self.mean) @ self.whitener  # |z|^2 = d^T C^-1 d
        return (z**2).sum(dim=-1).clamp_min(0.0).sqrt()
