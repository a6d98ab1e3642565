"""Configuration as dataclasses, read from and written to YAML.

Every number that shapes the model or its training lives here, so that a checkpoint can carry the complete
config and a run can be reproduced from it. Unknown keys are errors, not silently ignored typos.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from amoe_sdk.errors import ConfigError


@dataclass
class EncoderConfig:
    """The frozen pretrained encoder and where its features are tapped.

    ``name``: ``lite0`` (EfficientNet-Lite0, ImageNet weights embedded in the package) or ``dinov2_vits14_reg`` /
    ``dinov2_vitb14_reg`` (timm DINOv2 with registers, from the local file ``weights``).
    ``taps``: stage indices (Lite0) or block indices (ViT) whose outputs are resampled to one ``grid_size`` grid.
    ``random_weights``: skip loading weights; for tests only, never the default.
    """

    name: str = "lite0"
    weights: str | None = None
    taps: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    grid_size: int = 16
    random_weights: bool = False


@dataclass
class PatchExpertConfig:
    """Patch experts: noisy MLP bottleneck then linear-attention blocks reconstructing the encoder taps."""

    num_experts: int = 2
    embed_dim: int = 160
    bottleneck_hidden: int = 320
    dropout: float = 0.2
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0


@dataclass
class ComponentExpertConfig:
    """Component experts: an MLP autoencoder over features mean-pooled inside each of ``num_slots`` components.

    The component of a grid cell is its nearest of ``num_slots`` prototypes, fitted by k-means on normal
    training features, so the masks come from inside the model with a fixed number of slots.
    """

    num_experts: int = 2
    num_slots: int = 6
    hidden_dim: int = 256
    code_dim: int = 64
    area_weight: float = 4.0
    kmeans_iters: int = 30


@dataclass
class GlobalExpertConfig:
    """Global experts: an image autoencoder squeezed to a 1x1 code, and a student CNN predicting its output."""

    num_experts: int = 2
    image_size: int = 64
    code_dim: int = 64
    width: int = 64
    activation: str = "relu"  # or "leaky_relu"


@dataclass
class RouterConfig:
    """The router: an MLP on the encoder's global descriptor choosing the ``top_k`` of all experts.

    ``static``: no router at all. Every expert counts, equally within its level, and the encoder stops after its
    last tap (no descriptor). A distilled student is static: it inherits the routing its teacher folded away.
    """

    top_k: int = 3
    hidden_dim: int = 256
    static: bool = False


@dataclass
class PostprocessConfig:
    """Anomaly-map post-processing.

    Each expert's map is normalised as (map - lo) / (hi - lo), with lo and hi the ``norm_low_quantile`` and
    ``norm_high_quantile`` of its values on normal validation images. The fused map is upsampled to the input
    size, Gaussian-blurred, and the image score is the mean of its top ``top_percent`` % pixels.

    ``level_weights`` (patch, component, global) weigh the per-level maps in the fused map. They are fixed, not
    routed: the router is trained on normal images only, so it cannot know which level will see a defect, and
    each level's map is already on the same normalised scale.
    """

    level_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    norm_low_quantile: float = 0.5
    norm_high_quantile: float = 0.999
    blur_kernel: int = 5
    blur_sigma: float = 4.0
    top_percent: float = 1.0


@dataclass
class ModelConfig:
    """The whole detector. ``input_size`` is the square size every image is resized to."""

    input_size: int = 256
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    patch: PatchExpertConfig = field(default_factory=PatchExpertConfig)
    component: ComponentExpertConfig = field(default_factory=ComponentExpertConfig)
    global_: GlobalExpertConfig = field(default_factory=GlobalExpertConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)


@dataclass
class LossConfig:
    """Loss weights: L = L_rec + eir_weight * L_EIR + esb_weight * L_ESB.

    L_rec is the routing-weighted sum of per-expert losses (global and component losses scaled by
    ``global_scale`` and ``component_scale``); the router learns from each expert's loss relative to its
    level's mean, so that the scales do not decide the routing, weighted by ``router_weight`` (of the order of
    ``esb_weight``, so that balancing is not drowned out). Patch experts use hard mining: the gradient of the easiest
    ``hard_mining_easy_fraction`` of positions is multiplied by ``hard_mining_easy_scale``. L_ESB is
    importance + ``capacity_weight`` * capacity + ``z_weight`` * z-loss.
    """

    eir_weight: float = 1e-4
    esb_weight: float = 0.01
    router_weight: float = 0.01
    global_scale: float = 0.1
    component_scale: float = 0.1
    hard_mining_easy_fraction: float = 0.9
    hard_mining_easy_scale: float = 0.1
    capacity_weight: float = 1.0
    z_weight: float = 0.1


@dataclass
class TrainConfig:
    """The optimisation. ``val_fraction`` of the normal training images is held out to calibrate the maps."""

    steps: int = 800
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    grad_clip: float = 0.1
    val_fraction: float = 0.15
    min_val_images: int = 8
    checkpoint_every: int = 200
    estimator_lr: float = 1e-3
    seed: int = 0


@dataclass
class AmoeConfig:
    """Everything a training run needs: the model, the losses and the optimisation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "config") -> "AmoeConfig":
        return _from_plain(cls, data or {}, source)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass
class DistillLossConfig:
    """Distillation loss: L = map_weight * L_map + score_weight * L_score + reconstruction_weight * L_rec.

    L_map: the student's routed per-level maps against the teacher's, on normal images and pseudo-anomalies,
    compared after asinh (linear near the normal range, logarithmic on strong anomalies, so that neither
    dominates). L_score: the same for the image scores. L_rec: the student's own reconstruction objective on the
    normal images only (component and global experts' losses scaled by ``component_scale`` / ``global_scale`` as
    in training), so that it stays a reconstruction model and does not learn the pseudo-anomalies by heart.
    """

    map_weight: float = 1.0
    score_weight: float = 0.1
    reconstruction_weight: float = 1.0
    component_scale: float = 0.1
    global_scale: float = 0.1


@dataclass
class DistillDataConfig:
    """What the student learns from. ``pseudo_per_image`` pseudo-anomalies of the ``pseudo_kinds`` (cut-paste,
    Perlin blemishes and region swaps, the last for the teacher's response to a wrong layout) are made from each
    normal training image once; ``anomaly_share`` of every batch is drawn from them. A teacher
    expert counts as used on this product when its mean fusion weight on the training images is at least
    ``min_expert_weight``; a level with no used expert gets no student expert."""

    pseudo_per_image: int = 3
    pseudo_kinds: list[str] = field(default_factory=lambda: ["cut_paste", "perlin", "region_swap"])
    anomaly_share: float = 0.5
    min_expert_weight: float = 0.02
    seed: int = 0


@dataclass
class QatConfig:
    """Quantization-aware fine-tuning (``amoe distill --qat``): for the last ``fraction`` of the steps, the
    student's expert layers see INT8 rounding (per-channel symmetric weights, per-tensor activations over the
    batch's range), as the converters' INT8 will quantize them."""

    enabled: bool = False
    fraction: float = 0.3


@dataclass
class DistillConfig:
    """A distillation run: the student model, the losses, the data and the optimisation.

    The defaults of ``model`` are not fixed: ``amoe distill`` derives them from the teacher (its input size and
    post-processing; one narrow expert per used level; the Lite0 encoder cut after stage 3; static routing), and a
    ``--student`` YAML overrides any of them.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    qat: QatConfig = field(default_factory=QatConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2400, lr=3e-3))

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "config") -> "DistillConfig":
        return _from_plain(cls, data or {}, source)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def as_training_config(self) -> AmoeConfig:
        """The student as an ordinary training config: what its checkpoint carries, so every tool reads it."""
        return AmoeConfig(model=self.model, train=self.train)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping -> dict; ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; pass the path of a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def merge_dicts(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` laid over ``base``, nested mappings merged key by key (neither input is changed)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> AmoeConfig:
    """Read a YAML config (missing keys take their defaults) and apply ``overrides`` like ``{"train.steps": 10}``."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = read_yaml_mapping(path, "config file")
        source = str(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    config = AmoeConfig.from_dict(data, source)
    validate_config(config)
    return config


def validate_config(config: AmoeConfig) -> None:
    """Reject values that would only fail later, deep inside training."""
    model = config.model
    total = model.patch.num_experts + model.component.num_experts + model.global_.num_experts
    if total < 1:
        raise ConfigError("the model needs at least one expert; raise num_experts of a level")
    if not model.router.static and not 1 <= model.router.top_k <= total:
        raise ConfigError(f"router.top_k={model.router.top_k} must lie between 1 and the number of experts ({total})")
    if model.input_size % 32 != 0:
        raise ConfigError(f"input_size={model.input_size} must be a multiple of 32")
    if model.patch.embed_dim % model.patch.num_heads != 0:
        raise ConfigError("patch.embed_dim must be divisible by patch.num_heads")
    if not 0.0 < config.train.val_fraction < 1.0:
        raise ConfigError("train.val_fraction must lie strictly between 0 and 1")
    if config.train.steps < 1 or config.train.batch_size < 1:
        raise ConfigError("train.steps and train.batch_size must be positive")
    if not 0.0 <= model.postprocess.norm_low_quantile < model.postprocess.norm_high_quantile <= 1.0:
        raise ConfigError("postprocess quantiles must satisfy 0 <= norm_low_quantile < norm_high_quantile <= 1")
    if model.global_.activation not in ("relu", "leaky_relu"):
        raise ConfigError(f"global.activation={model.global_.activation!r} must be 'relu' or 'leaky_relu'")
    level_weights = model.postprocess.level_weights
    if len(level_weights) != 3 or min(level_weights) < 0 or sum(level_weights) <= 0:
        raise ConfigError(
            f"postprocess.level_weights={level_weights} must be three non-negative numbers (patch, component, global) "
            "with a positive sum"
        )


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_yaml_key(f.name): _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _yaml_key(name: str) -> str:
    # ``global`` is a Python keyword, so the field is ``global_``; YAML files say ``global``.
    return name.rstrip("_")


def _from_plain(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {_yaml_key(f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} in {cls.__name__}; known keys: {sorted(fields)}")
    kwargs = {}
    for key, value in data.items():
        f = fields[key]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _from_plain(hint, value, f"{where}.{key}")
        else:
            kwargs[f.name] = _coerce(value, hint, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if args and type(None) in args:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value
