"""A memory of normal patches: how far each position's neighbourhood is from the nearest normal one.

A reconstruction expert reproduces whatever looks locally normal, so an empty pocket where a pin belongs, or a
fill line at a normal-looking height, leaves it no residual. The distance to the nearest normal neighbourhood
(PatchCore's score, on our standardised taps) does not generalise that way. It joins the patch experts' maps with
a gain measured per product after training (``training/whitening.py``), so where it does not help (a texture
whose subtle defects it misses) it stays out.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchMemory(nn.Module):
    """``forward(tokens [B, N, C])`` -> [B, N]: the Euclidean distance of each position's 3 x 3 neighbourhood mean
    to the nearest of the ``size`` normal ones in ``bank`` [M, C] (a greedy k-centre coreset of the training
    positions, ``fit``)."""

    def __init__(self, size: int, channels: int, grid_size: int):
        super().__init__()
        self.grid_size = grid_size
        self.register_buffer("bank", torch.zeros(size, channels))
        self.register_buffer("bank_sq_norm", torch.zeros(size))

    def neighbourhood(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N, C], each position the mean of its 3 x 3 neighbourhood (of the positions inside)."""
        b, n, c = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, c, self.grid_size, self.grid_size)
        pooled = F.avg_pool2d(grid, 3, stride=1, padding=1, count_include_pad=False)
        return pooled.flatten(2).transpose(1, 2)

    def fit(self, tokens: torch.Tensor, generator: torch.Generator) -> None:
        """Fill the bank from normal training tokens [M, N, C]."""
        points = self.neighbourhood(tokens).reshape(-1, tokens.shape[-1])
        self.bank.copy_(k_centre_coreset(points, len(self.bank), generator))
        self.bank_sq_norm.copy_((self.bank**2).sum(dim=1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.neighbourhood(tokens)
        # |x - m|^2 as |x|^2 - 2 x.m + |m|^2: one matmul, the form every exporter and TensorRT take.
        squared = (x**2).sum(dim=-1, keepdim=True) - 2.0 * (x @ self.bank.t()) + self.bank_sq_norm
        return squared.min(dim=-1).values.clamp_min(0.0).sqrt()


def k_centre_coreset(points: torch.Tensor, size: int, generator: torch.Generator, chunk: int = 8192) -> torch.Tensor:
    """Greedy k-centre selection (each new point the farthest from those chosen): points [P, C] -> [size, C], so
    that rare normal patches are kept as well as common ones. All points when there are no more than ``size``,
    repeated to fill the bank (a repeated point changes no nearest distance)."""
    p = len(points)
    if p <= size:
        return points[torch.arange(size) % p].clone()
    chosen = [int(torch.randint(p, (1,), generator=generator))]
    nearest = torch.full((p,), float("inf"))
    for _ in range(size - 1):
        centre = points[chosen[-1]]
        for start in range(0, p, chunk):
            part = points[start : start + chunk]
            nearest[start : start + chunk] = torch.minimum(nearest[start : start + chunk], ((part - centre) ** 2).sum(dim=1))
        chosen.append(int(nearest.argmax()))
    return points[torch.tensor(chosen)].clone()
