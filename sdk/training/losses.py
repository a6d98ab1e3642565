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


def product_sets(product_mean: torch.Tensor, top_k: int, level_of_expert: torch.Tensor) -> torch.Tensor:
    """Each product's expert set from its images' mean router logits [P, E] -> [P, E] 0 / 1.

    When ``top_k`` equals the number of levels (``level_of_expert`` [E]): one expert of each level per product,
    assigned greedily by mean logit with each expert taking at most ceil(P / its level's experts) products, so
    that the range uses every expert its product count allows (the products would otherwise all pick the experts
    that happened to lead early). One expert per level also makes folding exact: within a level the fused map
    weighs the selected experts by their routing weights renormalised over the level, which for a single expert
    is 1 on every image, where two experts of one level would share it by a ratio that moves from image to image.
    Otherwise: each product's top-k."""
    levels = torch.unique(level_of_expert)
    if top_k != len(levels):
        return torch.zeros_like(product_mean).scatter(1, product_mean.topk(top_k, dim=1).indices, 1.0)
    chosen = torch.zeros_like(product_mean)
    products = len(product_mean)
    for level in levels:
        members = torch.nonzero(level_of_expert == level).flatten()
        capacity = -(-products // len(members))
        load = [0] * len(members)
        assigned = [False] * products
        for flat in product_mean[:, members].flatten().argsort(descending=True).tolist():
            p, j = divmod(flat, len(members))
            if not assigned[p] and load[j] < capacity:
                chosen[p, members[j]] = 1.0
                assigned[p], load[j] = True, load[j] + 1
    return chosen


def product_consistency(
    logits: torch.Tensor, product: torch.Tensor, top_k: int, margin: float, level_of_expert: torch.Tensor
) -> torch.Tensor:
    """What makes the router specialise by product over a range of them: router logits [N, E] of training images,
    each image's product index [N], each expert's level index [E] -> a hinge loss, zero once every image's top-k
    logits are its product's expert set with ``margin`` to spare.

    A product's set is chosen from its images' mean logits (``product_sets``), held fixed in each step, so the
    products choose their sets through the routed reconstruction and the balancing, and this term only makes each
    product keep its choice; an image is penalised by how far its lowest logit in the set is from clearing its
    highest logit outside it by ``margin``. The product is never the router's input: it decides from the image
    alone, and the margin is what lets a product's held-out images route as its training images do.
    """
    one_hot = torch.nn.functional.one_hot(product).to(logits.dtype)  # [N, P]
    product_mean = (one_hot.T @ logits.detach()) / one_hot.sum(dim=0).unsqueeze(1)  # [P, E]
    chosen = product_sets(product_mean, top_k, level_of_expert)[product]  # [N, E]
    # 1e4 rather than inf: the masked logits drop out of the min and the max and stay finite.
    lowest_inside = (logits + (1.0 - chosen) * 1e4).min(dim=1).values
    highest_outside = (logits - chosen * 1e4).max(dim=1).values
    return torch.relu(margin - (lowest_inside - highest_outside)).mean()
