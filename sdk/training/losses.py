"""Training losses: routed reconstruction, Expert Information Repulsion (CLUB) and Expert Selection Balancing."""

from __future__ import annotations

import torch
import torch.nn as nn

from amoe_sdk.models.layers import Mlp


def routed_reconstruction(
    expert_losses: torch.Tensor, weights: torch.Tensor, level_scales: torch.Tensor, level_of_expert: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed reconstruction loss, split into what trains the experts and what trains the router.

    expert_losses, weights: [B, E]; level_scales: [E] (1 for patch experts, the paper's 0.1 for the others);
    level_of_expert: [E] level index of each expert.

    -> (experts_term, router_term). ``experts_term`` = mean over images of sum_e w_e * scale_e * loss_e, with w
    held fixed: each expert learns from the images routed to it. ``router_term`` = mean of sum_e w_e * r_e with
    r_e the expert's loss over its level's batch mean, minus 1, held fixed: the router prefers experts that
    reconstruct an image better than their level does on average. Comparing raw losses instead would send every
    image to the level whose loss happens to be numerically smallest (the component level, in practice), and
    the other levels would stop learning.
    """
    experts_term = (weights.detach() * expert_losses * level_scales).sum(dim=1).mean()
    with torch.no_grad():
        one_hot = torch.nn.functional.one_hot(level_of_expert, int(level_of_expert.max()) + 1).to(expert_losses.dtype)
        level_mean = expert_losses.mean(dim=0) @ one_hot / one_hot.sum(dim=0).clamp_min(1.0)  # [L]
        relative = expert_losses / level_mean[level_of_expert].clamp_min(1e-8) - 1.0
    router_term = (weights * relative).sum(dim=1).mean()
    return experts_term, router_term


class ClubEstimator(nn.Module):
    """The variational network q(y | x) = N(mu(x), exp(logvar(x))) of the CLUB mutual-information bound.

    ``upper_bound(x, y)`` (x, y: [B, R]) estimates I(x; y) from above as E_p(x,y)[log q(y|x)] minus
    E_p(x)p(y)[log q(y|x)]; the experts minimise it. ``log_likelihood`` is what the estimator maximises, in
    alternation, on detached representations.
    """

    def __init__(self, dim: int, hidden_dim: int = 128):
        super().__init__()
        self.mu = Mlp(dim, hidden_dim, dim)
        self.logvar = nn.Sequential(Mlp(dim, hidden_dim, dim), nn.Tanh())

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.mu(x), self.logvar(x)
        return (-((mu - y) ** 2) / logvar.exp() - logvar).sum(dim=1).mean()

    def upper_bound(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.mu(x), self.logvar(x)
        inv_var = (-logvar).exp()
        positive = -((mu - y) ** 2) * inv_var / 2.0  # [B, R]
        # Every x against every y: [B, B, R] -> mean over the y axis.
        negative = -((mu.unsqueeze(1) - y.unsqueeze(0)) ** 2).mean(dim=1) * inv_var / 2.0
        return (positive.sum(dim=1) - negative.sum(dim=1)).mean()


def expert_selection_balancing(
    logits: torch.Tensor, weights: torch.Tensor, capacity_weight: float, z_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_ESB from router logits [B, E] and routing weights [B, E] (zero outside the top-k).

    importance: E * sum_j P_j^2 with P the mean router softmax (1 when uniform, E when collapsed);
    capacity: E * sum_j f_j P_j with f_j the share of top-k slots that went to expert j (differentiable via P);
    z-loss: mean squared router logits, which keeps them small.
    """
    num_experts = logits.shape[1]
    probs = logits.softmax(dim=1).mean(dim=0)  # [E]
    importance = num_experts * (probs**2).sum()
    selected = (weights > 0).to(logits.dtype)
    load = selected.sum(dim=0) / selected.sum().clamp_min(1.0)  # [E]
    capacity = num_experts * (load.detach() * probs).sum()
    z_loss = (logits**2).mean()
    total = importance + capacity_weight * capacity + z_weight * z_loss
    return total, {"importance": importance.item(), "capacity": capacity.item(), "z": z_loss.item()}
