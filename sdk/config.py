"""Configuration as dataclasses, read from and written to YAML.

Every number that shapes the model or its training lives here, so that a checkpoint can carry the complete
config and a run can be reproduced from it. Unknown keys are errors, not silently ignored typos.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from amoe_sdk.errors import ConfigError
from amoe_sdk.outputs import atomic_write_text
from amoe_sdk.typed import describe_range, from_plain, in_range, to_plain


@dataclass
class EncoderConfig:
    """The frozen pretrained encoder and where its features are tapped.

    ``name``: ``lite0`` (EfficientNet-Lite0, ImageNet weights embedded in the package) or ``dinov2_vits14_reg`` /
    ``dinov2_vitb14_reg`` (timm DINOv2 with registers, from the local file ``weights``).
    ``taps``: stage indices (Lite0) or block indices (ViT) whose outputs are resampled to one ``grid_size`` grid.
    ``tap_resample``: how a tap finer than the grid reaches it: ``pool`` (average) or ``unshuffle`` (each cell's
    positions side by side as channels, keeping the detail a thin defect leaves; Lite0 only).
    ``component_taps``: Lite0 stages whose outputs, resampled to a grid ``component_grid_factor`` times finer than
    ``grid_size``, decide which component each position belongs to: at 16 px per cell a small part fills a cell or
    two, and a missing or extra one barely changes any component's area; the early stages see its outline
    (default ``[1, 2]``, 64 x 64 at 256 px; measured in the README). ``[]``: the main taps on the main grid, the
    only choice for DINOv2.
    ``random_weights``: skip loading weights; for tests only, never the default.
    """

    name: str = "lite0"
    weights: str | None = None
    taps: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    grid_size: int = 16
    tap_resample: str = "pool"
    component_taps: list[int] = field(default_factory=lambda: [1, 2])
    component_grid_factor: int = 4
    random_weights: bool = False


@dataclass
class PatchExpertConfig:
    """Patch experts: noisy MLP bottleneck then linear-attention blocks reconstructing the encoder taps.

    ``residual_whitening: auto`` fits, after training, the reconstruction residual's statistics at each position
    on the normal training images (mean and spread per channel, and the ``residual_subspace_dim`` principal
    directions the residual varies in) and adds one whitened form of it to the cosine map, diagonal or
    subspace, with the gain that best separates held-out normals from pseudo-anomalies, if that removes a tenth
    of the cosine map's error (a subtle texture defect changes a feature's size more than its direction; a
    shifted label or a fused part moves the residual out of the directions normal images vary in). ``off``: the
    cosine map alone. ``memory_size``: a memory of that many normal patches (3 x 3 neighbourhoods of the standardised
    taps, a k-centre coreset of the training positions); with ``residual_whitening: auto``, each position's
    distance to its nearest normal patch joins the maps (a part missing from its place, or a level that is wrong
    only in its context, looks locally normal and is reconstructed well) with the largest gain that lowers none of
    the patch level's pseudo-anomaly AUROCs by more than a point. 0: no memory. ``colour_deviation``: each grid
    cell's mean log colour less its image's, as a distance under the normal cells' covariance
    (``models/colour.py``), joins the maps by the same rule (a stain or a foreign fibre on a texture changes its
    colour, not its features). The measurements are in the README, "The detector".
    """

    num_experts: int = 2
    embed_dim: int = 160
    bottleneck_hidden: int = 320
    dropout: float = 0.2
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    residual_whitening: str = "auto"
    residual_subspace_dim: int = 32
    memory_size: int = 2048
    colour_deviation: bool = True


@dataclass
class ComponentExpertConfig:
    """Component experts: an MLP autoencoder over features mean-pooled inside each of ``num_slots`` components.

    The component of a position is its nearest of ``num_slots`` prototypes, fitted by k-means on normal
    training features (``encoder.component_taps``), so the masks come from inside the model with a fixed number of
    slots. ``composition_gain``: after training, the components' areas on the normal training images get their mean
    and covariance, and each expert adds to a slot's score that slot's positive term of the Mahalanobis distance of
    an image's areas from them, in units of the spread of the expert's own map on normal images times this gain (a
    missing, extra or oversized part changes how much of the image its component covers, and no single position
    shows it). Default 1; 0: off.

    ``slot_groups``: set by the trainer, not by hand: over a range of products, each product gets ``num_slots``
    prototypes of its own, fitted on its own images, and its images are assigned among those alone (the closed
    slots are part of the product's calibration), so the model has ``num_slots * slot_groups`` slots. Fitted over
    the mixed range, k-means spent the slots on what tells products apart, and a tray of pins shared its slots with
    the kit's and the washer's (the measurements are in the README).
    """

    num_experts: int = 2
    num_slots: int = 6
    slot_groups: int = 1
    hidden_dim: int = 256
    code_dim: int = 64
    area_weight: float = 4.0
    kmeans_iters: int = 30
    composition_gain: float = 1.0

    @property
    def total_slots(self) -> int:
        return self.num_slots * self.slot_groups


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

    ``level_weights`` (patch, component, global) weigh the per-level maps in the fused map. They are not routed:
    the router is trained on normal images only, so it cannot know which level will see a defect. With
    ``level_weighting: pseudo`` they are measured at the end of training instead: each level's weight is its
    ``level_weights`` share times (AUROC - 0.5)^2 of that level alone on the product's held-out normal images
    against pseudo-anomalies made from them, the lower of its AUROC on blatant ones (cut-paste, Perlin blemishes,
    region swaps) and on subtle ones (the same at the normals' own contrast), each less the spread an AUROC has by
    chance with that many images, divided by the spread of its score on those normal images, so that a level
    that cannot tell this product's normal images from anomalous ones does not add its noise to the map.
    ``fixed`` keeps ``level_weights``.
    """

    level_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    level_weighting: str = "pseudo"
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

    Trained on a range of products, the router also gets ``product_consistency_weight`` times the product
    consistency hinge (``training/losses.py``, ``product_consistency``): every training image's top-k logits on its
    product's expert set by ``product_margin``, so that a product's images route alike and its detector folds to
    one static set. One product has nothing to specialise on: its router balances as before.
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
    product_consistency_weight: float = 0.05
    product_margin: float = 1.0


SINGLE_PRODUCT_STEPS = 800
RANGE_STEPS = 1600


@dataclass
class TrainConfig:
    """The optimisation. ``val_fraction`` of the normal training images is held out to calibrate the maps.

    ``steps`` left unset: ``SINGLE_PRODUCT_STEPS`` for one product, ``RANGE_STEPS`` for a range of products, where
    each product fills only its share of the batches and the experts it shares must learn every product they serve
    (the measurements are in the README); the trainer writes the number it used into the checkpoint's config.
    """

    steps: int | None = None
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
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "config") -> "AmoeConfig":
        return from_plain(cls, data or {}, source, ConfigError)

    def save_yaml(self, path: str | Path) -> None:
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


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
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "config") -> "DistillConfig":
        return from_plain(cls, data or {}, source, ConfigError)

    def save_yaml(self, path: str | Path) -> None:
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

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


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, flags: dict[str, str] | None = None) -> AmoeConfig:
    """Read a YAML config (missing keys take their defaults) and apply ``overrides`` like ``{"train.steps": 10}``.
    ``flags`` names the command-line option behind an override (``{"train.steps": "--steps"}``), for messages."""
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
    validate_config(config, source, {k: v for k, v in (flags or {}).items() if k in (overrides or {})})
    return config


# Allowed ranges of every numeric field, by dotted key: (low, high, low excluded). A list field's range applies to
# each element. tests/test_config.py checks that every numeric field of every config has an entry here.
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "model.input_size": (32, None, False),
    "model.encoder.taps": (0, None, False),
    "model.encoder.grid_size": (1, None, False),
    "model.encoder.component_taps": (0, None, False),
    "model.encoder.component_grid_factor": (1, None, False),
    "model.patch.num_experts": (0, None, False),
    "model.patch.embed_dim": (1, None, False),
    "model.patch.bottleneck_hidden": (1, None, False),
    "model.patch.dropout": (0, 0.95, False),
    "model.patch.depth": (1, None, False),
    "model.patch.num_heads": (1, None, False),
    "model.patch.mlp_ratio": (0, None, True),
    "model.patch.residual_subspace_dim": (1, None, False),
    "model.patch.memory_size": (0, None, False),
    "model.component.num_experts": (0, None, False),
    "model.component.num_slots": (1, None, False),
    "model.component.slot_groups": (1, None, False),
    "model.component.hidden_dim": (1, None, False),
    "model.component.code_dim": (1, None, False),
    "model.component.area_weight": (0, None, False),
    "model.component.kmeans_iters": (1, None, False),
    "model.component.composition_gain": (0, None, False),
    "model.global.num_experts": (0, None, False),
    "model.global.image_size": (16, None, False),
    "model.global.code_dim": (1, None, False),
    "model.global.width": (1, None, False),
    "model.router.top_k": (1, None, False),
    "model.router.hidden_dim": (1, None, False),
    "model.postprocess.level_weights": (0, None, False),
    "model.postprocess.norm_low_quantile": (0, 1, False),
    "model.postprocess.norm_high_quantile": (0, 1, False),
    "model.postprocess.blur_kernel": (1, None, False),
    "model.postprocess.blur_sigma": (0, None, True),
    "model.postprocess.top_percent": (0, 100, True),
    "loss.eir_weight": (0, None, False),
    "loss.esb_weight": (0, None, False),
    "loss.router_weight": (0, None, False),
    "loss.global_scale": (0, None, False),
    "loss.component_scale": (0, None, False),
    "loss.hard_mining_easy_fraction": (0, 1, False),
    "loss.hard_mining_easy_scale": (0, 1, False),
    "loss.capacity_weight": (0, None, False),
    "loss.z_weight": (0, None, False),
    "loss.product_consistency_weight": (0, None, False),
    "loss.product_margin": (0, None, False),
    "loss.map_weight": (0, None, False),
    "loss.score_weight": (0, None, False),
    "loss.reconstruction_weight": (0, None, False),
    "train.steps": (1, None, False),
    "train.batch_size": (1, None, False),
    "train.lr": (0, 1, True),
    "train.weight_decay": (0, None, False),
    "train.warmup_steps": (0, None, False),
    "train.grad_clip": (0, None, True),
    "train.val_fraction": (0, 0.9, True),
    "train.min_val_images": (1, None, False),
    "train.checkpoint_every": (1, None, False),
    "train.estimator_lr": (0, 1, True),
    "train.seed": (0, 2**63 - 1, False),
    "data.pseudo_per_image": (0, None, False),
    "data.anomaly_share": (0, 0.95, False),
    "data.min_expert_weight": (0, 1, False),
    "data.seed": (0, 2**63 - 1, False),
    "qat.fraction": (0, 1, True),
}


def check_ranges(config: Any, source: str, flags: dict[str, str] | None = None) -> None:
    """Every numeric field of ``config`` (an ``AmoeConfig`` or ``DistillConfig``) within ``RANGES``; ConfigError
    naming the file (or the command-line option that set it), the key, the value and the allowed range."""
    for key, value in numeric_fields(config):
        low, high, low_open = RANGES[key]
        values = value if isinstance(value, list) else [value]
        if not all(in_range(v, low, high, low_open) for v in values):
            where = f"{flags[key]} on the command line" if flags and key in flags else source
            raise ConfigError(f"{where}: {key}={value!r} is out of range: allowed {describe_range(low, high, low_open)}"
                              + (" for each element" if isinstance(value, list) else ""))


def numeric_fields(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every int, float or list-of-numbers field of a config dataclass, nested ones included."""
    found = []
    for f in dataclasses.fields(config):
        key = f"{prefix}{f.name.rstrip('_')}"
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            found += numeric_fields(value, key + ".")
        elif (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
            isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            found.append((key, value))
    return found


# The allowed values of every choice field of the model, by key under ``model.``.
MODEL_CHOICES: dict[str, tuple[str, ...]] = {
    "patch.residual_whitening": ("auto", "off"),
    "postprocess.level_weighting": ("pseudo", "fixed"),
    "encoder.tap_resample": ("pool", "unshuffle"),
    "global.activation": ("relu", "leaky_relu"),
}


def validate_config(config: AmoeConfig, source: str = "config", flags: dict[str, str] | None = None) -> None:
    """Reject values that would only fail later, deep inside training: every numeric range (``RANGES``), then the
    relations between fields. Messages name ``source`` (the file) and the key."""
    check_ranges(config, source, flags)
    model = config.model
    total = model.patch.num_experts + model.component.num_experts + model.global_.num_experts
    if total < 1:
        raise ConfigError(f"{source}: the model needs at least one expert; raise model.<level>.num_experts of a level")
    if not model.router.static and not 1 <= model.router.top_k <= total:
        raise ConfigError(f"{source}: model.router.top_k={model.router.top_k} must lie between 1 and the number of experts ({total})")
    if model.input_size % 32 != 0:
        raise ConfigError(f"{source}: model.input_size={model.input_size} must be a multiple of 32")
    if model.global_.image_size % 16 != 0:
        raise ConfigError(f"{source}: model.global.image_size={model.global_.image_size} must be a multiple of 16")
    if model.patch.embed_dim % model.patch.num_heads != 0:
        raise ConfigError(f"{source}: model.patch.embed_dim must be divisible by model.patch.num_heads")
    if model.postprocess.blur_kernel % 2 == 0:
        raise ConfigError(f"{source}: model.postprocess.blur_kernel={model.postprocess.blur_kernel} must be odd")
    if not model.postprocess.norm_low_quantile < model.postprocess.norm_high_quantile:
        raise ConfigError(f"{source}: model.postprocess.norm_low_quantile must be below norm_high_quantile")
    for key, allowed in MODEL_CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(model, "global_" if section == "global" else section), name)
        if value not in allowed:
            raise ConfigError(f"{source}: model.{key}={value!r} must be " + " or ".join(repr(a) for a in allowed))
    level_weights = model.postprocess.level_weights
    if len(level_weights) != 3 or sum(level_weights) <= 0:
        raise ConfigError(
            f"{source}: model.postprocess.level_weights={level_weights} must be three non-negative numbers (patch, "
            "component, global) with a positive sum"
        )
