"""Frozen pretrained encoders that turn an image batch into tapped features on one token grid.

Every encoder takes the image as OpenCV delivers it (float BGR in [0, 255], shape [B, 3, S, S]) and does colour
order and normalisation itself, so training, evaluation and exported graphs share one pre-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from amoe_sdk.config import EncoderConfig
from amoe_sdk.errors import ConfigError, WeightsError
from amoe_sdk.models.lite0_weights import load_lite0_state_dict

DINOV2_MODELS = {"dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2", "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EncoderFeatures:
    """``taps``: [B, C, G, G], the tapped features side by side on the G x G grid (C = sum of ``tap_channels``).
    ``descriptor``: [B, D], the global image descriptor the router reads (None when not asked for: a detector
    without a router stops the encoder after its last tap). ``components``: [B, Cc, A, A], the
    ``encoder.component_taps`` on the finer component grid (None when they are the main taps)."""

    taps: torch.Tensor
    descriptor: torch.Tensor | None
    components: torch.Tensor | None = None

    def select(self, index) -> "EncoderFeatures":
        """The rows ``index`` (a slice or index tensor) of every tensor."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return EncoderFeatures(self.taps[index], pick(self.descriptor), pick(self.components))

    @staticmethod
    def concat(parts: list["EncoderFeatures"]) -> "EncoderFeatures":
        """The features of several batches, one after the other."""
        join = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
        return EncoderFeatures(
            torch.cat([p.taps for p in parts]), join([p.descriptor for p in parts]), join([p.components for p in parts])
        )


class Preprocess(nn.Module):
    """[B, 3, S, S] float BGR in [0, 255] -> normalised RGB, (x / 255 - mean) / std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images_bgr: torch.Tensor) -> torch.Tensor:
        rgb = images_bgr.flip(1)
        return (rgb - self.mean) / self.std


def unshuffle_to_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C * r * r, grid, grid] with r = H / grid: the r x r positions of each cell side by side
    as channels (space to depth), so a cell keeps its fine detail instead of averaging it away; bilinear when H is
    not a whole multiple of the grid."""
    h = int(x.shape[-2])
    if h > grid and h % grid == 0:
        return F.pixel_unshuffle(x, h // grid)
    return resample_to_grid(x, grid)


def unshuffle_factor(input_size: int, stride: int, grid: int) -> int:
    """r of ``unshuffle_to_grid`` for a feature map at ``stride`` of an ``input_size`` image."""
    size = input_size // stride
    return size // grid if size > grid and size % grid == 0 else 1


def resample_to_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, grid, grid]: average pooling to shrink by a whole factor, bilinear otherwise."""
    # int(): static sizes, so that an exporter records constants (pooling kernels must be constant in ONNX).
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (h, w) == (grid, grid):
        return x
    if h > grid and h % grid == 0 and w % grid == 0:
        return F.avg_pool2d(x, kernel_size=(h // grid, w // grid))
    return F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)


class StaticSamePadConv(nn.Module):
    """A TF-"same" convolution with its padding fixed for one input size: a constant zero pad then a plain conv.

    Bit-identical to timm's dynamic ``Conv2dSame`` at that size, and it exports to a much smaller static graph.
    """

    def __init__(self, conv: nn.Conv2d, input_hw: tuple[int, int]):
        super().__init__()
        pads = []
        for size, k, s, d in zip(input_hw, conv.kernel_size, conv.stride, conv.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        self.pad = nn.ZeroPad2d((pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
        self.conv = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation, conv.groups,
            conv.bias is not None,
        )
        self.conv.load_state_dict(conv.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


def freeze_same_padding(model: nn.Module, example: torch.Tensor) -> None:
    """Replace every timm ``Conv2dSame`` in ``model`` by a ``StaticSamePadConv`` for the size of ``example``."""
    from timm.layers import Conv2dSame

    shapes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, Conv2dSame):
            hooks.append(module.register_forward_pre_hook(lambda m, args, n=name: shapes.__setitem__(n, tuple(args[0].shape[-2:]))))
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    for name, hw in shapes.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, StaticSamePadConv(getattr(parent, child), hw))


class Lite0Encoder(nn.Module):
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) with taps after the stages in ``config.taps``.

    Stage outputs at 256 px: 0: 16 ch /2, 1: 24 ch /4, 2: 40 ch /8, 3: 80 ch /16, 4: 112 ch /16, 5: 192 ch /32,
    6: 320 ch /32. The descriptor is the global average of stage 6. ``config.tap_resample``: ``pool`` averages a
    fine stage down to the grid; ``unshuffle`` keeps each cell's r x r positions as channels.
    """

    STAGE_CHANNELS = (16, 24, 40, 80, 112, 192, 320)
    STAGE_STRIDES = (2, 4, 8, 16, 16, 32, 32)

    def __init__(self, config: EncoderConfig, input_size: int):
        super().__init__()
        import timm

        if not config.taps or any(t < 0 or t > 6 for t in config.taps):
            raise ConfigError(f"encoder.taps={config.taps}: Lite0 taps are stage indices 0-6")
        net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if not config.random_weights:
            state = load_lite0_state_dict(config.weights)
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise WeightsError(f"encoder weights do not match tf_efficientnet_lite0: {exc}") from exc
        net.eval()
        freeze_same_padding(net, torch.zeros(1, 3, input_size, input_size))
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.stages = net.blocks
        self.taps = sorted(config.taps)
        self.grid_size = config.grid_size
        self.preprocess = Preprocess((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.unshuffle = config.tap_resample == "unshuffle"
        factors = [unshuffle_factor(input_size, self.STAGE_STRIDES[t], self.grid_size) if self.unshuffle else 1 for t in self.taps]
        self.tap_channels = [self.STAGE_CHANNELS[t] * r * r for t, r in zip(self.taps, factors)]
        self.descriptor_dim = self.STAGE_CHANNELS[-1]
        if any(t < 0 or t > 6 for t in config.component_taps):
            raise ConfigError(f"encoder.component_taps={config.component_taps}: Lite0 taps are stage indices 0-6")
        self.component_taps = sorted(config.component_taps)
        self.component_grid = config.grid_size * config.component_grid_factor if self.component_taps else config.grid_size
        self.component_channels = sum(self.STAGE_CHANNELS[t] for t in self.component_taps) if self.component_taps else sum(self.tap_channels)

    def forward(self, images_bgr: torch.Tensor, with_descriptor: bool = True) -> EncoderFeatures:
        x = self.stem(self.preprocess(images_bgr))
        taps, components = [], []
        last = len(self.stages) - 1 if with_descriptor else max(self.taps + self.component_taps)
        for index, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if index in self.taps:
                taps.append(unshuffle_to_grid(x, self.grid_size) if self.unshuffle else resample_to_grid(x, self.grid_size))
            if index in self.component_taps:
                components.append(resample_to_grid(x, self.component_grid))
        return EncoderFeatures(
            torch.cat(taps, dim=1), x.mean(dim=(2, 3)) if with_descriptor else None,
            torch.cat(components, dim=1) if components else None,
        )


class DinoV2Encoder(nn.Module):
    """timm DINOv2 ViT-S/14 or ViT-B/14 with 4 registers, from a local weights file.

    Taps are block outputs (patch tokens only), averaged in ``tap_groups`` consecutive groups like Dinomaly;
    the descriptor is the final normalised CLS token.
    """

    def __init__(self, config: EncoderConfig, input_size: int, tap_groups: int = 2):
        super().__init__()
        import timm

        if input_size % 14 != 0:
            raise ConfigError(f"DINOv2 needs an input_size divisible by 14 (the patch size), got {input_size}")
        net = timm.create_model(DINOV2_MODELS[config.name], pretrained=False, img_size=input_size)
        if not config.random_weights:
            net.load_state_dict(_read_vit_weights(config, net), strict=True)
        net.eval()
        self.net = net
        self.taps = sorted(config.taps)
        if not self.taps or self.taps[-1] >= len(net.blocks) or len(self.taps) % tap_groups:
            raise ConfigError(f"encoder.taps={config.taps}: need block indices < {len(net.blocks)}, a multiple of {tap_groups}")
        self.tap_groups = tap_groups
        self.grid_size = config.grid_size
        self.token_grid = input_size // 14
        self.preprocess = Preprocess(IMAGENET_MEAN, IMAGENET_STD)
        self.tap_channels = [net.embed_dim] * tap_groups
        self.descriptor_dim = net.embed_dim
        if config.component_taps:
            raise ConfigError(
                f"encoder.component_taps={config.component_taps}: a ViT has no finer stages to assign components on; "
                "set model.encoder.component_taps: [] with a DINOv2 encoder (components then use the main taps)"
            )
        self.component_grid = config.grid_size
        self.component_channels = sum(self.tap_channels)

    def forward(self, images_bgr: torch.Tensor, with_descriptor: bool = True) -> EncoderFeatures:
        net = self.net
        x = net._pos_embed(net.patch_embed(self.preprocess(images_bgr)))
        outputs = []
        last = len(net.blocks) - 1 if with_descriptor else self.taps[-1]
        for block in net.blocks[: last + 1]:
            x = block(x)
            outputs.append(x)
        prefix = net.num_prefix_tokens
        per_group = len(self.taps) // self.tap_groups
        groups = []
        for g in range(self.tap_groups):
            members = [outputs[i][:, prefix:] for i in self.taps[g * per_group : (g + 1) * per_group]]
            tokens = torch.stack(members).mean(0)  # [B, N, D]
            b, n, d = tokens.shape
            grid = tokens.transpose(1, 2).reshape(b, d, self.token_grid, self.token_grid)
            groups.append(resample_to_grid(grid, self.grid_size))
        return EncoderFeatures(torch.cat(groups, dim=1), net.norm(x)[:, 0] if with_descriptor else None)


def _read_vit_weights(config: EncoderConfig, net: nn.Module) -> dict:
    if not config.weights:
        raise WeightsError(
            f"encoder {config.name} needs a local weights file: set encoder.weights to the path of timm's "
            f"{DINOV2_MODELS[config.name]} weights (.safetensors or .pth); no hub is contacted"
        )
    path = Path(config.weights)
    if not path.is_file():
        raise WeightsError(f"encoder weights file {path} does not exist; fix encoder.weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"encoder weights file {path} cannot be read: {exc}") from exc
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(state, net)  # resamples the position embedding to this input size
    missing, unexpected = set(net.state_dict()) - set(state), set(state) - set(net.state_dict())
    if missing or unexpected:
        raise WeightsError(
            f"encoder weights file {path} does not match {DINOV2_MODELS[config.name]}: "
            f"{len(missing)} missing keys (e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})"
        )
    return state


def build_encoder(config: EncoderConfig, input_size: int) -> nn.Module:
    """The frozen encoder named by ``config.name``; its parameters never receive gradients."""
    if config.name == "lite0":
        encoder = Lite0Encoder(config, input_size)
    elif config.name in DINOV2_MODELS:
        encoder = DinoV2Encoder(config, input_size)
    else:
        raise ConfigError(f"unknown encoder {config.name!r}; choose lite0, {', '.join(DINOV2_MODELS)}")
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval()
