"""Distillation losses: the student's routed per-level maps and image scores against its teacher's, and its own
reconstruction objective on normal images."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compress(x: torch.Tensor) -> torch.Tensor:
    """asinh: about x on the normal range (|x| <~ 1), about log(2x) on strong anomalies (tens of normal spans), so
    that matching neither ignores the fine normal structure nor is swamped by the largest anomalies."""
    return torch.asinh(x)


def map_matching_loss(student_maps: torch.Tensor, teacher_maps: torch.Tensor, level_weights: torch.Tensor) -> torch.Tensor:
    """Per-level map matching.

    student_maps, teacher_maps: [B, L, G, G] routed, normalised per-level maps (the teacher's resampled to the
    student's grid); level_weights: [L], the levels' shares of the fused map. -> scalar: the level-weighted mean
    squared difference of the compressed maps.
    """
    if teacher_maps.shape[-1] != student_maps.shape[-1]:
        teacher_maps = F.interpolate(teacher_maps, size=student_maps.shape[-2:], mode="bilinear", align_corners=False)
    per_level = ((compress(student_maps) - compress(teacher_maps)) ** 2).mean(dim=(0, 2, 3))  # [L]
    weights = level_weights / level_weights.sum()
    return (weights * per_level).sum()


def score_matching_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """[B] image scores of each -> scalar mean squared difference of the compressed scores."""
    return ((compress(student_scores) - compress(teacher_scores)) ** 2).mean()


def normal_reconstruction_loss(expert_losses: torch.Tensor, is_normal: torch.Tensor, level_scales: torch.Tensor) -> torch.Tensor:
    """The student's own reconstruction objective on the normal images of a batch only.

    expert_losses: [B, E] per-image losses of each expert; is_normal: [B] bool; level_scales: [E]. A pseudo-anomaly
    must not be reconstructed (its error is the signal), so its rows count zero. -> scalar: the mean over normal
    images of the scaled expert losses averaged over experts.
    """
    normal = is_normal.to(expert_losses.dtype)
    per_image = (expert_losses * level_scales).mean(dim=1)  # [B]
    return (per_image * normal).sum() / normal.sum().clamp_min(1.0)
