"""AnomalyMoE: a frozen encoder, three levels of reconstruction experts and a top-k router.

Inference (``forward``) is one static graph: every expert runs, the router's top-k softmax weights re-weight
their maps, and there is no data-dependent Python control flow, so the converters can export it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from amoe_sdk.config import ModelConfig
from amoe_sdk.models.colour import ColourDeviation
from amoe_sdk.models.components import ComponentAssigner
from amoe_sdk.models.encoders import EncoderFeatures, build_encoder
from amoe_sdk.models.experts import ComponentExpert, ExpertOutput, GlobalExpert, PatchExpert
from amoe_sdk.models.layers import FP16_SAFE_EPS, GaussianBlur, standardise_taps, top_percent_mean
from amoe_sdk.models.memory import PatchMemory
from amoe_sdk.models.router import TopKRouter

LEVELS = ("patch", "component", "global")


@dataclass
class ProductBuffers:
    """The buffers each product of a range has of its own, one row per product [P, ...] (or per image, [B, ...]):
    ``feature_mean`` and ``feature_std`` [., C], the taps' statistics on its images, and ``slot_offset`` [., K],
    its own group of component slots open and the others closed (``ComponentAssigner``). Over a range, each
    training image is standardised and assigned as its product (``rows``), and each product's calibration starts
    from its own (``apply``), so its detector sees its images as a detector of that product alone would."""

    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    slot_offset: torch.Tensor

    def rows(self, index: torch.Tensor) -> "ProductBuffers":
        """Indices [B] -> those rows, e.g. each image's product's."""
        return ProductBuffers(self.feature_mean[index], self.feature_std[index], self.slot_offset[index])

    def apply(self, model: "AnomalyMoE", row: int) -> None:
        """Lay row ``row`` over ``model``'s own buffers."""
        model.feature_mean.copy_(self.feature_mean[row])
        model.feature_std.copy_(self.feature_std[row])
        model.assigner.slot_offset.copy_(self.slot_offset[row])


@dataclass
class DetectorOutput:
    """``anomaly_map``: [B, 1, S, S] normalised map at the input size (fused with ``map_level_weights``);
    ``score``: [B] image scores (the top-percent mean of the map fused with ``level_weights``);
    ``routing_weights``: [B, E]; ``router_logits``: [B, E]; ``expert_maps``: [B, E, G, G] raw (un-normalised)
    per-expert maps."""

    anomaly_map: torch.Tensor
    score: torch.Tensor
    routing_weights: torch.Tensor
    router_logits: torch.Tensor
    expert_maps: torch.Tensor


def normalise_expert_maps(expert_maps: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """[B, E, G, G] raw maps, per-expert [E] validation quantiles -> (map - low) / (high - low)."""
    span = (high - low).clamp_min(FP16_SAFE_EPS)
    return (expert_maps - low.view(1, -1, 1, 1)) / span.view(1, -1, 1, 1)


def upsample_and_score(grid_map: torch.Tensor, blur: nn.Module, size: int, top_percent: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 1, G, G] fused map -> (map [B, 1, S, S] upsampled and blurred, score [B] = mean of its top pixels)."""
    full = blur(F.interpolate(grid_map, size=(size, size), mode="bilinear", align_corners=False))
    return full, top_percent_mean(full, top_percent)


def upsample_score_and_map(
    score_grid: torch.Tensor, map_grid: torch.Tensor, blur: nn.Module, size: int, top_percent: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The score's and the map's fused grids [B, 1, G, G] -> (map [B, 1, S, S], score [B]): both upsampled and
    blurred in one pass (``upsample_and_score``), the score the top-percent mean of its own map."""
    batch = len(score_grid)
    full, scores = upsample_and_score(torch.cat([score_grid, map_grid]), blur, size, top_percent)
    return full[batch:], scores[:batch]


class AnomalyMoE(nn.Module):
    """The mixture-of-experts anomaly detector.

    ``forward(images_bgr [B, 3, S, S] float BGR in [0, 255])`` -> ``DetectorOutput``. Experts are ordered by
    level: patch experts first, then component, then global; ``expert_levels`` names each one's level.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.encoder, config.input_size)
        channels = sum(self.encoder.tap_channels)
        grid = config.encoder.grid_size
        self.grid_size = grid
        # Per-channel statistics of the taps on normal training images, filled in before training.
        self.register_buffer("feature_mean", torch.zeros(channels))
        self.register_buffer("feature_std", torch.ones(channels))
        self.patch_experts = nn.ModuleList(
            PatchExpert(config.patch, self.encoder.tap_channels, grid) for _ in range(config.patch.num_experts)
        )
        self.patch_memory = PatchMemory(config.patch.memory_size, channels, grid) if config.patch.memory_size else None
        self.colour = ColourDeviation(grid) if config.patch.colour_deviation else None
        # Whether forward computes the memory distances and the colour deviations; ``drop_unused_map_terms`` clears
        # each where no gain uses it.
        self.uses_memory = self.patch_memory is not None
        self.uses_colour = self.colour is not None
        self.assigner = ComponentAssigner(
            config.component.total_slots, channels, grid, self.encoder.component_channels, self.encoder.component_grid
        )
        self.component_experts = nn.ModuleList(
            ComponentExpert(config.component, channels) for _ in range(config.component.num_experts)
        )
        self.global_experts = nn.ModuleList(
            GlobalExpert(config.global_, channels, grid) for _ in range(config.global_.num_experts)
        )
        self.expert_levels = (
            ["patch"] * config.patch.num_experts
            + ["component"] * config.component.num_experts
            + ["global"] * config.global_.num_experts
        )
        num_experts = len(self.expert_levels)
        self.router = (
            None if config.router.static
            else TopKRouter(self.encoder.descriptor_dim, config.router.hidden_dim, num_experts, config.router.top_k)
        )
        level_matrix = torch.zeros(len(LEVELS), num_experts)
        for e, level in enumerate(self.expert_levels):
            level_matrix[LEVELS.index(level), e] = 1.0
        self.register_buffer("level_matrix", level_matrix, persistent=False)  # [L, E]
        present = level_matrix.sum(dim=1) > 0
        level_weights = torch.tensor(config.postprocess.level_weights, dtype=torch.float32) * present
        # The levels' shares of the fused map [L]: the config's, or measured per product at the end of training
        # (``postprocess.level_weighting``), so they travel in the state dict.
        self.register_buffer("level_weights", level_weights / level_weights.sum().clamp_min(FP16_SAFE_EPS))
        # The levels' shares of the map a person reads [L]: the same, or, where a level that tells images apart
        # paints where it cannot locate (a missing pin lights every other pin), those of the levels that locate
        # (``sdk/training/fusion.py``, ``choose_map_levels``). The score still fuses every level.
        self.register_buffer("map_level_weights", self.level_weights.clone())
        # Per-expert map normalisation, measured on normal validation images after training.
        self.register_buffer("map_low", torch.zeros(num_experts))
        self.register_buffer("map_high", torch.ones(num_experts))
        post = config.postprocess
        self.blur = GaussianBlur(post.blur_kernel, post.blur_sigma)

    @property
    def num_experts(self) -> int:
        return len(self.expert_levels)

    def trainable_parameters(self):
        """Everything but the frozen encoder."""
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.")]

    def train(self, mode: bool = True) -> "AnomalyMoE":
        super().train(mode)
        self.encoder.eval()  # frozen: its batch norms never update
        return self

    def drop_unused_map_terms(self) -> None:
        """Leave the memory and the colour deviation out of ``forward`` where every patch expert's gain for them
        is zero (the same maps; an export then carries neither the bank nor its matmul). For exporting a finished
        model."""
        self.uses_memory = self.patch_memory is not None and any(bool(e.memory_gain.any()) for e in self.patch_experts)
        self.uses_colour = self.colour is not None and any(bool(e.colour_gain.any()) for e in self.patch_experts)

    def memory_distances(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """[B, N, C] standardised tokens -> [B, N] distances to the nearest normal patch, or None without one."""
        return self.patch_memory(tokens) if self.uses_memory else None

    def colour_deviations(self, images_bgr: torch.Tensor) -> torch.Tensor | None:
        """[B, 3, S, S] float BGR -> [B, N] colour deviations (``ColourDeviation``), or None without them."""
        return self.colour(images_bgr) if self.uses_colour else None

    @property
    def static_routing(self) -> bool:
        return self.router is None

    @torch.no_grad()
    def encode(self, images_bgr: torch.Tensor) -> EncoderFeatures:
        return self.encoder(images_bgr, with_descriptor=self.needs_descriptor)

    def route(self, descriptor: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits and top-k weights, [B, E] each. Without a router (static routing): zero logits and equal
        weights for every expert, so each expert counts equally within its level."""
        if self.router is None:
            logits = torch.zeros(batch, self.num_experts, device=self.map_low.device)
            return logits, logits + 1.0 / self.num_experts
        return self.router(descriptor)

    def standardise(self, taps: torch.Tensor) -> torch.Tensor:
        """[B, C, G, G] raw taps -> [B, N, C] standardised tokens."""
        return standardise_taps(taps, self.feature_mean, self.feature_std)

    def run_experts(
        self,
        features: EncoderFeatures,
        images_bgr: torch.Tensor,
        with_loss: bool = False,
        easy_fraction: float = 0.9,
        easy_scale: float = 0.1,
        product_buffers: ProductBuffers | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[ExpertOutput]]:
        """All experts on one batch -> (router logits [B, E], routing weights [B, E], outputs in expert order).
        ``product_buffers``: each image's product's statistics and component slots, for training over a range; by
        default the model's own."""
        if product_buffers is None:
            tokens, slot_offset = self.standardise(features.taps), None
        else:
            tokens = standardise_taps(features.taps, product_buffers.feature_mean, product_buffers.feature_std)
            slot_offset = product_buffers.slot_offset
        logits, weights = self.route(features.descriptor, tokens.shape[0])
        # Training needs neither: their distances join the maps only, never the losses.
        memory = None if with_loss else self.memory_distances(tokens)
        colour = None if with_loss else self.colour_deviations(images_bgr)
        outputs = [
            expert(tokens, easy_fraction if with_loss else None, easy_scale, memory, colour) for expert in self.patch_experts
        ]
        if len(self.component_experts):
            slots = self.assigner(tokens, features.components, slot_offset)
            outputs += [expert(slots, training=with_loss) for expert in self.component_experts]
        if len(self.global_experts):
            b, n, c = tokens.shape
            target = tokens.transpose(1, 2).reshape(b, c, self.grid_size, self.grid_size) if with_loss else None
            outputs += [expert(images_bgr, target) for expert in self.global_experts]
        return logits, weights, outputs

    def level_fusion(self, logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """How much each expert counts within its level: [B, E] logits and weights -> [B, L, E], rows summing to 1
        over a level's experts.

        The selected experts count by their routing weights (renormalised over the level); a level none of whose
        experts made the top-k uses the softmax of its own logits, so no level drops out of the map.
        """
        in_level = self.level_matrix.unsqueeze(0)  # [1, L, E]
        per_level = weights.unsqueeze(1) * in_level  # [B, L, E]
        level_total = per_level.sum(dim=2, keepdim=True)
        # -1e4 rather than -inf: stays finite in FP16 and in every exporter.
        level_softmax = (logits.unsqueeze(1) + (in_level - 1.0) * 1e4).softmax(dim=2) * in_level
        return torch.where(level_total > 0, per_level / level_total.clamp_min(FP16_SAFE_EPS), level_softmax)

    def fusion_weights(self, logits: torch.Tensor, weights: torch.Tensor, shares: torch.Tensor | None = None) -> torch.Tensor:
        """How much each expert's normalised map counts in the fused map: [B, E] logits and weights -> [B, E]:
        its weight within its level (``level_fusion``) times the level's share (``shares`` [L], by default
        ``level_weights``, those of the score)."""
        return self._weigh_levels(self.level_fusion(logits, weights), shares)

    def _weigh_levels(self, within_level: torch.Tensor, shares: torch.Tensor | None) -> torch.Tensor:
        """[B, L, E] weights within each level (``level_fusion``), [L] shares (None: ``level_weights``) -> [B, E]."""
        shares = self.level_weights if shares is None else shares
        return (shares.view(1, -1, 1) * within_level).sum(dim=1)

    def level_maps(self, normalised_maps: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routed map of each level: [B, E, G, G] normalised expert maps -> [B, L, G, G]. The fused map is
        their sum weighted by ``level_weights``; a level without experts is all zeros."""
        return torch.einsum("ble,begh->blgh", self.level_fusion(logits, weights), normalised_maps)

    def level_outputs(self, out: DetectorOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Each level alone, made as the fused map is made (normalised, routed within the level, upsampled,
        blurred, top-percent) from one forward pass's ``out`` -> (maps [B, L, S, S], scores [B, L])."""
        per_level = self.level_maps(self.normalise_maps(out.expert_maps), out.router_logits, out.routing_weights)
        full, score = self.postprocess(per_level.flatten(0, 1).unsqueeze(1))
        batch = len(per_level)
        return full.view(batch, -1, *full.shape[-2:]), score.view(batch, -1)

    def normalise_maps(self, expert_maps: torch.Tensor) -> torch.Tensor:
        """[B, E, G, G] raw maps -> the same, normalised with each expert's validation statistics."""
        return normalise_expert_maps(expert_maps, self.map_low, self.map_high)

    def fuse(self, expert_maps: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, shares: torch.Tensor | None = None) -> torch.Tensor:
        """Routed fusion on the grid: [B, E, G, G] raw maps, [B, E] router logits and weights -> [B, 1, G, G],
        with the score's level shares unless ``shares`` [L] are given."""
        return self._fuse_normalised(self.normalise_maps(expert_maps), self.level_fusion(logits, weights), shares)

    def _fuse_normalised(self, normalised_maps: torch.Tensor, within_level: torch.Tensor, shares: torch.Tensor | None) -> torch.Tensor:
        """``fuse`` from its two parts, so that a forward pass makes them once for the score and the map."""
        fusion = self._weigh_levels(within_level, shares)
        return (fusion.view(*fusion.shape, 1, 1) * normalised_maps).sum(dim=1, keepdim=True)

    def postprocess(self, grid_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 1, G, G] -> (map [B, 1, S, S] upsampled and blurred, score [B])."""
        return upsample_and_score(grid_map, self.blur, self.config.input_size, self.config.postprocess.top_percent)

    def forward_features(self, features: EncoderFeatures, images_bgr: torch.Tensor) -> DetectorOutput:
        logits, weights, outputs = self.run_experts(features, images_bgr)
        expert_maps = torch.cat([o.anomaly_map for o in outputs], dim=1)  # [B, E, G, G]
        normalised, within_level = self.normalise_maps(expert_maps), self.level_fusion(logits, weights)
        anomaly_map, score = upsample_score_and_map(
            self._fuse_normalised(normalised, within_level, None),
            self._fuse_normalised(normalised, within_level, self.map_level_weights),
            self.blur, self.config.input_size, self.config.postprocess.top_percent,
        )
        return DetectorOutput(anomaly_map, score, weights, logits, expert_maps)

    @property
    def needs_descriptor(self) -> bool:
        """Whether ``forward`` reads the encoder's descriptor (only the router does)."""
        return not self.static_routing

    def forward(self, images_bgr: torch.Tensor, features: EncoderFeatures | None = None) -> DetectorOutput:
        """``features``: the encoder's output on ``images_bgr`` where the caller already has it (the converters
        export the encoder and the rest as two graphs, so that a range's products share one encoder export)."""
        if features is None:
            features = self.encoder(images_bgr, with_descriptor=self.needs_descriptor)
        return self.forward_features(features, images_bgr)
