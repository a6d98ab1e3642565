"""The router: one decision per image, the top-k of all experts, softmax over the chosen logits."""

from __future__ import annotations

import torch
import torch.nn as nn

from amoe_sdk.models.layers import Mlp


class TopKRouter(nn.Module):
    """``forward(descriptor [B, D])`` -> (logits [B, E], weights [B, E]).

    ``weights`` is zero outside the top ``top_k`` logits and a softmax over them inside; static shapes only
    (TopK, Softmax, ScatterElements), so it exports as it is.
    """

    def __init__(self, descriptor_dim: int, hidden_dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.norm = nn.LayerNorm(descriptor_dim, eps=1e-5)
        self.mlp = Mlp(descriptor_dim, hidden_dim, num_experts)
        self.top_k = top_k

    def forward(self, descriptor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.mlp(self.norm(descriptor))
        values, indices = logits.topk(self.top_k, dim=1)
        weights = torch.zeros_like(logits).scatter(1, indices, values.softmax(dim=1))
        return logits, weights
