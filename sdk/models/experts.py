"""The three levels of reconstruction experts.

Each expert gives, for a batch, its anomaly map on the G x G grid, its per-image training loss and a pooled
representation (what Expert Information Repulsion pushes apart between experts of one level).
Features arrive standardised (per-channel z-scores of the encoder taps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from amoe_sdk.config import ComponentExpertConfig, GlobalExpertConfig, PatchExpertConfig
from amoe_sdk.models.components import ComponentSlots
from amoe_sdk.models.encoders import resample_to_grid
from amoe_sdk.models.layers import FP16_SAFE_EPS, LinearAttentionBlock, Mlp

# The global experts' activation. ReLU is the original; a leaky one cannot die, which a small student's
# global expert does under distillation's learning rate (its map then goes flat and the level is lost).
ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1)}


@dataclass
class ExpertOutput:
    """``anomaly_map``: [B, 1, G, G]; ``loss``: [B] (training only, else None); ``representation``: [B, R]."""

    anomaly_map: torch.Tensor
    loss: torch.Tensor | None
    representation: torch.Tensor


def cosine_distance(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """1 - cos(a, b) along ``dim``, with an FP16-safe epsilon."""
    return 1.0 - F.cosine_similarity(a, b, dim=dim, eps=FP16_SAFE_EPS)


class PatchExpert(nn.Module):
    """Noisy MLP bottleneck, then linear-attention blocks, then a linear head back to the tap channels.

    ``forward(tokens [B, N, C])``: the reconstruction [B, N, C] is compared tap by tap (cosine distance per
    position); the map is the mean distance over taps. With ``residual_whitening`` on, the residual
    x = tokens - reconstruction - ``residual_mean`` [N, C] (its normal mean at each position) adds one of two
    whitened forms, whose gains are zero until ``training.whitening`` measures them (so training and an unfitted
    model use the cosine map alone):

    - diagonal: tap t's distance gets ``residual_gain[t]`` times the mean of (x / ``residual_std``)^2 over its
      channels (``residual_std`` [N, C], the normal spread at that position and channel);
    - subspace: the map gets ``residual_subspace_gain`` times a distance from the normal residuals' principal
      subspace at that position: (sum_k w_k (u_k . x)^2 + |x - sum_k (u_k . x) u_k|^2) / C with the orthonormal
      basis u_k (``residual_basis`` [N, C, K], zero columns where unfitted) and weights w_k = floor /
      (variance_k + floor) in [0, 1] (``residual_basis_weight`` [N, K]): a Mahalanobis distance, scaled by the
      floor, that sees a residual leaving the directions normal images vary in, whatever its size.

    With a ``memory`` [B, N] passed in (the detector's ``PatchMemory`` distances, shared by every patch expert), the
    map also gets ``memory_gain`` times it (zero until ``training.whitening`` measures it); likewise a ``colour``
    [B, N] (the detector's ``ColourDeviation``) with ``colour_gain``.
    """

    def __init__(self, config: PatchExpertConfig, tap_channels: list[int], grid_size: int):
        super().__init__()
        channels = sum(tap_channels)
        self.tap_channels = list(tap_channels)
        self.grid_size = grid_size
        self.input_drop = nn.Dropout(config.dropout)
        self.bottleneck = Mlp(channels, config.bottleneck_hidden, config.embed_dim, dropout=config.dropout)
        self.blocks = nn.ModuleList(
            LinearAttentionBlock(config.embed_dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-5)
        self.head = nn.Linear(config.embed_dim, channels)
        self.whitened = config.residual_whitening != "off"
        self.whitening_forms: tuple[str, ...] = ("diagonal", "subspace") if self.whitened else ()
        if self.whitened:
            self.register_buffer("residual_mean", torch.zeros(grid_size * grid_size, channels))
            self.register_buffer("residual_std", torch.ones(grid_size * grid_size, channels))
            self.register_buffer("residual_gain", torch.zeros(len(tap_channels)))
            k = config.residual_subspace_dim
            self.register_buffer("residual_basis", torch.zeros(grid_size * grid_size, channels, k))
            self.register_buffer("residual_basis_weight", torch.zeros(grid_size * grid_size, k))
            self.register_buffer("residual_subspace_gain", torch.zeros(1))
        self.register_buffer("memory_gain", torch.zeros(1))
        self.register_buffer("colour_gain", torch.zeros(1))

    def reconstruct(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, N, C] -> (reconstruction [B, N, C], representation [B, D])."""
        hidden = self.bottleneck(self.input_drop(tokens))  # [B, N, D]
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden)), hidden.mean(dim=1)

    def whitened_residuals(self, tokens: torch.Tensor, recon: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(per tap, the mean squared residual in units of its normal spread at each position, [B, N] each;
        the subspace distance [B, N]), both as the class docstring defines them."""
        x = tokens - recon - self.residual_mean  # [B, N, C]
        return self._diagonal_terms(x), self._subspace_distance(x)

    def _diagonal_terms(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = (x / self.residual_std) ** 2
        return [part.mean(dim=-1) for part in z.split(self.tap_channels, -1)]

    def _subspace_distance(self, x: torch.Tensor) -> torch.Tensor:
        # With an orthonormal basis, |x - sum_k c_k u_k|^2 = |x|^2 - |c|^2: one product with the basis, not two
        # (the second, with its transpose, doubled the bundle's size and the memory read per frame). A batched
        # matmul over positions rather than einsum: the form every exporter and TensorRT take.
        coords = (x.unsqueeze(-2) @ self.residual_basis).squeeze(-2)  # [B, N, K]
        inside_discount = ((1.0 - self.residual_basis_weight) * coords**2).sum(dim=-1)
        return ((x**2).sum(dim=-1) - inside_discount).clamp_min(0.0) / x.shape[-1]

    def drop_unused_whitening(self) -> None:
        """Leave out of ``forward`` each whitened form whose gain is zero (the same maps; an export then carries
        neither its computation nor its statistics: the subspace basis is 17 MB of a 39 MB teacher bundle). For
        exporting a finished model; training and calibration keep both."""
        if self.whitened:
            gains = {"diagonal": self.residual_gain, "subspace": self.residual_subspace_gain}
            self.whitening_forms = tuple(form for form in self.whitening_forms if bool(gains[form].any()))

    def forward(
        self, tokens: torch.Tensor, easy_fraction: float | None = None, easy_scale: float = 0.1,
        memory: torch.Tensor | None = None, colour: torch.Tensor | None = None,
    ) -> ExpertOutput:
        """tokens: [B, N, C]; memory, colour: [B, N] or None. With ``easy_fraction`` set (training), the loss uses hard
        mining: the gradient of the easiest ``easy_fraction`` of positions per tap is multiplied by ``easy_scale``."""
        recon, representation = self.reconstruct(tokens)
        distances, losses = [], []
        for target, pred in zip(tokens.split(self.tap_channels, -1), recon.split(self.tap_channels, -1)):
            distance = cosine_distance(target, pred, dim=-1)  # [B, N]
            distances.append(distance)
            if easy_fraction is not None:
                threshold = torch.quantile(distance.detach().flatten(), easy_fraction)
                easy = (distance.detach() < threshold).unsqueeze(-1)
                # Same value, scaled gradient on easy positions: hard mining without hooks.
                damped = pred * easy_scale + pred.detach() * (1.0 - easy_scale)
                losses.append(cosine_distance(target, torch.where(easy, damped, pred), dim=-1).mean(dim=1))
        b = tokens.shape[0]
        anomaly_map = torch.stack(distances, 0).mean(0)  # [B, N]
        if self.whitening_forms and easy_fraction is None:
            x = tokens - recon - self.residual_mean
            if "diagonal" in self.whitening_forms:
                # The mean over taps of each tap's distance plus its gain times its diagonal term.
                anomaly_map = anomaly_map + (torch.stack(self._diagonal_terms(x), -1) * self.residual_gain).mean(-1)
            if "subspace" in self.whitening_forms:
                anomaly_map = anomaly_map + self.residual_subspace_gain * self._subspace_distance(x)
        if memory is not None:
            anomaly_map = anomaly_map + self.memory_gain * memory
        if colour is not None:
            anomaly_map = anomaly_map + self.colour_gain * colour
        anomaly_map = anomaly_map.view(b, 1, self.grid_size, self.grid_size)
        loss = torch.stack(losses, 0).mean(0) if losses else None
        return ExpertOutput(anomaly_map, loss, representation)


class ComponentExpert(nn.Module):
    """An MLP autoencoder over component descriptors: per slot, its mean feature, area and centroid.

    ``forward(slots: ComponentSlots)``. A slot's score is the cosine distance of its feature plus
    ``area_weight`` times the squared errors of its sqrt(area) and of its centroid (feature and centroid only
    when the slot is present); the map paints each slot's score over its mask, and an absent part's score,
    which has no mask, over the whole grid. Each slot's term of the composition distance of the slots' areas,
    where positive, times ``composition_scale`` (measured after training; see ``ComponentExpertConfig``), joins its
    score: a missing or extra part lights its component, not the whole image.
    """

    def __init__(self, config: ComponentExpertConfig, channels: int):
        super().__init__()
        self.num_slots = config.total_slots
        self.area_weight = config.area_weight
        in_dim = channels + 3 + self.num_slots  # feature, sqrt(area), centroid, slot identity
        self.encoder = Mlp(in_dim, config.hidden_dim, config.code_dim)
        self.decoder = Mlp(config.code_dim, config.hidden_dim, channels + 3)
        self.register_buffer("slot_identity", torch.eye(self.num_slots), persistent=False)
        self.register_buffer("composition_scale", torch.zeros(()))

    def forward(self, slots: ComponentSlots, training: bool = False) -> ExpertOutput:
        b, k, c = slots.features.shape
        root_area = slots.areas.sqrt().unsqueeze(-1)  # [B, K, 1]
        identity = self.slot_identity.unsqueeze(0).expand(b, k, k)
        code = self.encoder(torch.cat([slots.features, root_area, slots.centroids, identity], dim=-1))  # [B, K, code]
        recon = self.decoder(code)
        feature_error = cosine_distance(slots.features, recon[..., :c], dim=-1)  # [B, K]
        present = (slots.areas > 0).to(feature_error.dtype)
        area_error = (root_area.squeeze(-1) - recon[..., c]) ** 2
        centroid_error = ((slots.centroids - recon[..., c + 1 :]) ** 2).sum(dim=-1)
        shape_error = self.area_weight * (area_error + present * centroid_error)
        slot_scores = present * feature_error + shape_error  # [B, K]
        composition = self.composition_scale * slots.composition.clamp_min(0.0)
        # An absent slot has no pixels to paint: its area error goes over the whole image instead.
        painted = ((slot_scores + composition).view(b, k, 1, 1) * slots.masks).sum(dim=1, keepdim=True)
        missing = ((1.0 - present) * shape_error).sum(dim=1).view(b, 1, 1, 1)
        loss = slot_scores.mean(dim=1) if training else None
        return ExpertOutput(painted + missing, loss, code.mean(dim=1))


class GlobalExpert(nn.Module):
    """An image autoencoder squeezed to a 1x1 code, and a student CNN predicting the autoencoder's output.

    The autoencoder learns to reproduce the encoder features from the whole image through a tiny code, so it can
    only reproduce normal layouts; the student sees local windows. The map is the mean over channels of
    (autoencoder - student)^2: large where the layout is not a normal one (logical anomalies).
    ``forward(images_bgr [B, 3, S, S], target [B, C, G, G])``.
    """

    def __init__(self, config: GlobalExpertConfig, channels: int, grid_size: int):
        super().__init__()
        w, s = config.width, config.image_size
        act = ACTIVATIONS[config.activation]
        if s % 16 != 0:
            raise ValueError(f"global.image_size must be a multiple of 16, got {s}")
        self.image_size = s
        self.grid_size = grid_size
        self.ae_encoder = nn.Sequential(
            nn.Conv2d(3, w // 2, 4, 2, 1), act(),
            nn.Conv2d(w // 2, w // 2, 4, 2, 1), act(),
            nn.Conv2d(w // 2, w, 4, 2, 1), act(),
            nn.Conv2d(w, w, 4, 2, 1), act(),
            nn.Conv2d(w, config.code_dim, s // 16),  # [B, code, 1, 1]
        )
        self.decoder_sizes = [4, 8, 16, grid_size]
        self.ae_decoder = nn.ModuleList(
            nn.Sequential(nn.Conv2d(config.code_dim if i == 0 else w, w, 3, 1, 1), act()) for i in range(4)
        )
        self.ae_head = nn.Conv2d(w, channels, 1)
        self.student = nn.Sequential(
            nn.Conv2d(3, w // 2, 4, 2, 1), act(),
            nn.Conv2d(w // 2, w, 4, 2, 1), act(),
            nn.Conv2d(w, 2 * w, 3, 1, 1), act(),
            nn.Conv2d(2 * w, channels, 1),
        )

    def forward(self, images_bgr: torch.Tensor, target: torch.Tensor | None = None) -> ExpertOutput:
        small = resample_to_grid(images_bgr, self.image_size) / 127.5 - 1.0  # [B, 3, s, s]
        code = self.ae_encoder(small)
        x = code
        for size, layer in zip(self.decoder_sizes, self.ae_decoder):
            x = layer(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False))
        reconstruction = self.ae_head(x)  # [B, C, G, G]
        prediction = resample_to_grid(self.student(small), self.grid_size)  # [B, C, G, G]
        anomaly_map = ((reconstruction - prediction) ** 2).mean(dim=1, keepdim=True)
        loss = None
        if target is not None:
            ae_loss = ((reconstruction - target) ** 2).mean(dim=(1, 2, 3))
            student_loss = ((prediction - reconstruction.detach()) ** 2).mean(dim=(1, 2, 3))
            loss = ae_loss + student_loss
        return ExpertOutput(anomaly_map, loss, code.flatten(1))
