"""Building blocks shared by the experts: MLPs, ELU+1 linear attention, transformer blocks, Gaussian blur.

Everything here exports to a static ONNX graph: matmuls instead of einsum, epsilons that survive FP16.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Smallest epsilon we use: a normal FP16 number, so an FP16 engine keeps it.
FP16_SAFE_EPS = 1e-4


def standardise_taps(taps: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[B, C, G, G] raw taps, per-channel statistics [C] (or each image's own, [B, C]) -> [B, N, C] standardised
    tokens."""
    channels = taps.shape[1]
    x = (taps - mean.view(-1, channels, 1, 1)) / std.view(-1, channels, 1, 1)
    return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """[..., in_dim] -> [..., out_dim] through one hidden layer with GELU and optional dropout."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class LinearAttention(nn.Module):
    """Multi-head attention with the ELU+1 kernel: cost linear in the number of tokens N.

    out_n = phi(q_n) (sum_m phi(k_m)^T v_m) / (phi(q_n) . sum_m phi(k_m) + eps), phi(x) = elu(x) + 1.
    Written as matmuls (a 3-operand einsum is risky for TensorRT) and with an epsilon in the denominator.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D]."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = F.elu(qkv[0]) + 1.0, F.elu(qkv[1]) + 1.0, qkv[2]  # each [B, H, N, Dh]
        # Scale keys and values by 1/N so the sums stay in FP16 range; the ratio below is unchanged.
        k = k / n
        kv = k.transpose(-2, -1) @ v  # [B, H, Dh, Dh]
        normaliser = q @ k.sum(dim=2, keepdim=True).transpose(-2, -1)  # [B, H, N, 1]
        out = (q @ kv) / (normaliser + FP16_SAFE_EPS)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class LinearAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = LinearAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian of ``size`` taps: [size]."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return kernel / kernel.sum()


class GaussianBlur(nn.Module):
    """Separable Gaussian blur with reflected borders: [B, 1, H, W] -> [B, 1, H, W]."""

    def __init__(self, size: int, sigma: float):
        super().__init__()
        if size % 2 == 0 or size < 1:
            raise ValueError(f"blur kernel size must be odd and positive, got {size}")
        kernel = gaussian_kernel(size, sigma)
        self.register_buffer("kernel_h", kernel.view(1, 1, 1, size), persistent=False)
        self.register_buffer("kernel_v", kernel.view(1, 1, size, 1), persistent=False)
        self.pad = size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad == 0:
            return x
        x = F.pad(x, (self.pad, self.pad, self.pad, self.pad), mode="reflect")
        return F.conv2d(F.conv2d(x, self.kernel_h), self.kernel_v)


def top_percent_mean(maps: torch.Tensor, percent: float) -> torch.Tensor:
    """Mean of the top ``percent`` % values of each map: [B, 1, H, W] -> [B]."""
    flat = maps.flatten(1)
    k = max(1, int(math.ceil(flat.shape[1] * percent / 100.0)))
    return flat.topk(k, dim=1).values.mean(dim=1)
