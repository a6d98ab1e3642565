"""The edge student a teacher is distilled into: which experts it keeps, how narrow it is, what it costs.

The student is an ``AnomalyMoE`` like any other, so every tool (eval, convert, verify, bench) reads its checkpoint.
By default it keeps one narrow expert per level whose teacher experts the routing actually uses on this product,
the Lite0 encoder cut after stage 3, and static routing (no router, no descriptor: the routing its teacher would
fold away), at the teacher's input size and post-processing so that their maps are comparable pixel for pixel.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from amoe_sdk.calibration.pseudo_anomalies import check_kinds
from amoe_sdk.config import (
    ComponentExpertConfig, DistillConfig, EncoderConfig, GlobalExpertConfig, ModelConfig, PatchExpertConfig,
    RouterConfig, check_ranges, merge_dicts, read_yaml_mapping, validate_config,
)
from amoe_sdk.errors import ConfigError
from amoe_sdk.models.detector import LEVELS, AnomalyMoE
from amoe_sdk.models.encoders import EncoderFeatures
from amoe_sdk.models.routing import expert_names, selected_sets, set_histogram

# Stage 3 of Lite0 (80 channels at stride 16) is the last tap: stages 4-6 cost a third of the encoder and the
# student has no router that would need the descriptor at the end of stage 6.
STUDENT_TAPS = [1, 2, 3]


@dataclass
class TeacherUsage:
    """How the teacher's routing uses its experts on this product's normal training images.

    ``mean_weight``: each expert's mean fusion weight (what its map counts in the fused map); ``used``: the experts
    at or above the threshold, per level; ``expert_sets``: the selected top-k sets, most common first, with their
    share of the images (the folding analysis)."""

    names: list[str]
    mean_weight: list[float]
    used: dict[str, list[str]]
    expert_sets: list[dict[str, Any]]

    @classmethod
    def everything(cls, teacher: AnomalyMoE) -> "TeacherUsage":
        """Every expert counted as used: for checking a student config before the routing is measured."""
        names = expert_names(teacher)
        used = {level: [n for n, lvl in zip(names, teacher.expert_levels) if lvl == level] for level in LEVELS}
        return cls(names, [1.0] * len(names), used, [])

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "mean_weight": self.mean_weight, "used": self.used, "expert_sets": self.expert_sets}


@torch.no_grad()
def teacher_usage(teacher: AnomalyMoE, features: EncoderFeatures, min_weight: float) -> TeacherUsage:
    """The folding analysis of the teacher on encoder features of normal images ([N, ...] cached features)."""
    names = expert_names(teacher)
    logits, weights = teacher.route(features.descriptor, len(features.taps))
    mean_weight = teacher.fusion_weights(logits, weights).mean(dim=0)  # [E]
    used = {level: [names[e] for e, lvl in enumerate(teacher.expert_levels) if lvl == level and mean_weight[e] >= min_weight] for level in LEVELS}
    expert_sets = [{"experts": row["experts"], "share": row["share"]} for row in set_histogram(selected_sets(weights), names)]
    return TeacherUsage(names, mean_weight.tolist(), used, expert_sets)


def default_student_model(teacher: ModelConfig, usage: TeacherUsage) -> ModelConfig:
    """The default student for ``teacher``: one narrow expert per used level, Lite0 cut after stage 3, static
    routing, the teacher's grid and post-processing, its input size rounded up to a multiple of 32."""
    per_level = {level: min(1, len(usage.used[level])) for level in LEVELS}
    return ModelConfig(
        input_size=-(-teacher.input_size // 32) * 32,
        encoder=EncoderConfig(
            name="lite0", taps=list(STUDENT_TAPS), grid_size=teacher.encoder.grid_size,
            component_taps=[t for t in teacher.encoder.component_taps if t <= STUDENT_TAPS[-1]],
            component_grid_factor=teacher.encoder.component_grid_factor,
        ),
        # Residual whitening as the teacher's (auto): fitted on the student's own residuals after distillation.
        # Half the teacher's patch memory: with 2048 normal patches it would cost a third more FLOPs (pins' student:
        # 0.46 -> 0.61 G), above a quarter of the teacher's.
        patch=PatchExpertConfig(
            num_experts=per_level["patch"], embed_dim=64, bottleneck_hidden=128, depth=1, num_heads=2, memory_size=1024
        ),
        component=ComponentExpertConfig(
            num_experts=per_level["component"], num_slots=teacher.component.num_slots, hidden_dim=128, code_dim=32,
            area_weight=teacher.component.area_weight, composition_gain=teacher.component.composition_gain,
        ),
        # Leaky: with ReLU the student's global expert died under distillation (a constant map on every image),
        # and the global level is what sees a wrong layout.
        global_=GlobalExpertConfig(num_experts=per_level["global"], image_size=64, code_dim=32, width=32, activation="leaky_relu"),
        router=RouterConfig(static=True),
        postprocess=copy.deepcopy(teacher.postprocess),
    )


def load_distill_config(
    teacher: ModelConfig, usage: TeacherUsage, student_yaml=None, overrides: dict[str, Any] | None = None,
    flags: dict[str, str] | None = None,
) -> DistillConfig:
    """The distillation config: defaults derived from the teacher, then the ``--student`` YAML, then
    ``overrides`` like ``{"train.steps": 10}`` (``flags`` names the command-line option behind each, for
    messages). Unknown keys anywhere and values out of range are a ConfigError naming them."""
    data = DistillConfig(model=default_student_model(teacher, usage)).to_dict()
    source = "student defaults"
    if student_yaml is not None:
        data = merge_dicts(data, read_yaml_mapping(student_yaml, "student config"))
        source = str(student_yaml)
    for dotted, value in (overrides or {}).items():
        data = merge_dicts(data, _nest(dotted, value))
    config = DistillConfig.from_dict(data, source)
    check_ranges(config, source, flags)
    validate_config(config.as_training_config(), source, flags)
    if config.model.postprocess != teacher.postprocess:
        raise ConfigError(
            f"{source}: the student's postprocess differs from its teacher's ({config.model.postprocess} vs "
            f"{teacher.postprocess}); their maps and scores must be made the same way to be matched: remove model.postprocess"
        )
    if config.data.pseudo_per_image < 1 and config.data.anomaly_share > 0:
        raise ConfigError(f"{source}: data.anomaly_share > 0 needs data.pseudo_per_image of at least 1")
    try:
        check_kinds(config.data.pseudo_kinds)
    except ValueError as exc:
        raise ConfigError(f"{source}: data.pseudo_kinds: {exc}") from exc
    return config


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    *parents, leaf = dotted.split(".")
    node: dict[str, Any] = {leaf: value}
    for key in reversed(parents):
        node = {key: node}
    return node
