"""Quantization-aware fine-tuning: INT8 rounding simulated in the student's expert layers while it learns.

Weights are fake-quantized per output channel, symmetric (what ONNX Runtime, NNCF and TensorRT do to weights);
inputs per tensor, asymmetric over the batch's range. Gradients pass straight through the rounding. The float
weights stay the trained parameters, so the checkpoint is an ordinary float checkpoint that the converters then
quantize for real. The frozen encoder is not simulated: its features are computed once, before training.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

QUANTIZED_TYPES = (nn.Linear, nn.Conv2d)


class PerChannelWeightFakeQuant(nn.Module):
    """Parametrization: weight [O, ...] -> the same rounded to INT8 with one symmetric scale per output channel."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        amax = weight.detach().abs().amax(dim=tuple(range(1, weight.dim()))).clamp_min(1e-8)
        scale = (amax / 127.0).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -127, 127)


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """[...] float -> the same rounded to UINT8 over [min(x, 0), max(x, 0)] (one scale and zero point)."""
    low = x.detach().min().clamp(max=0.0)
    high = x.detach().max().clamp(min=0.0)
    scale = ((high - low) / 255.0).clamp_min(1e-8).reshape(1).float()
    zero = torch.round(-low / scale).clamp(0, 255).to(torch.int32).reshape(1)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (fake_quantize_activation(args[0]), *args[1:])


class FakeQuantization:
    """Context for QAT on ``modules`` (the student's experts): ``enable()`` adds the simulation to every Linear
    and Conv2d inside them, ``disable()`` removes it and leaves the float weights as they were trained."""

    def __init__(self, modules: list[nn.Module]):
        self.layers = [m for root in modules for m in root.modules() if isinstance(m, QUANTIZED_TYPES)]
        self.hooks: list = []

    @property
    def enabled(self) -> bool:
        return bool(self.hooks)

    def enable(self) -> None:
        if self.enabled:
            return
        for layer in self.layers:
            parametrize.register_parametrization(layer, "weight", PerChannelWeightFakeQuant())
            self.hooks.append(layer.register_forward_pre_hook(_quantize_input))

    def disable(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        for layer in self.layers:
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with parametrized weights under their plain names (``x.weight``, the float
    parameter), whether or not the simulation is on: what a checkpoint stores."""
    state = {}
    for key, value in model.state_dict().items():
        state[key.replace("parametrizations.weight.original", "weight")] = value
    return state
