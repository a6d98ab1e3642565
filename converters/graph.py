"""The graph every artifact is exported from: uint8 BGR frames in, the anomaly map and the image score out.

Pre-processing lives inside the graph (NHWC to NCHW, cast, the encoder's own normalisation) and so do the
per-expert normalisation constants, so the runtime only resizes with OpenCV and applies the threshold. That is
the whole contract, and it is the same for every backend.

It is exported in two parts joined into one graph (``onnx_export.export_onnx``): ``EncoderGraph``, the frozen
encoder, which every product of a range shares, and ``HeadGraph``, the rest of one product's detector. Both keep
the module paths of the detector (``/detector/encoder/...``, ``/detector/patch_experts.0/...``), which the INT8
layer groups are named by.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from amoe_sdk.models.encoders import EncoderFeatures
from amoe_sdk.runtimes.preprocess import pad_batch

INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score", "routing_weights")
# The encoder graph's outputs: the frame as the detector reads it, then the fields of ``EncoderFeatures`` it has.
IMAGE_NAME = "images_bgr"
FEATURE_NAMES = ("taps", "descriptor", "components")


class _Encode(nn.Module):
    """The encoder under the module path ``detector.encoder``, as in the detector itself."""

    def __init__(self, encoder: nn.Module, with_descriptor: bool):
        super().__init__()
        self.encoder = encoder
        self.with_descriptor = with_descriptor

    def forward(self, images_bgr: torch.Tensor) -> EncoderFeatures:
        return self.encoder(images_bgr, with_descriptor=self.with_descriptor)


class EncoderGraph(nn.Module):
    """``forward(images uint8 [B, S, S, 3] BGR)`` -> (images_bgr float [B, 3, S, S], then the ``EncoderFeatures``
    fields the encoder gives, in ``FEATURE_NAMES`` order: taps [B, C, G, G], descriptor [B, D] where
    ``with_descriptor``, components [B, Cc, A, A] where the encoder has component taps). ``output_names`` names
    them, measured on construction."""

    def __init__(self, encoder: nn.Module, with_descriptor: bool, input_size: int):
        super().__init__()
        self.detector = _Encode(encoder, with_descriptor)
        with torch.no_grad():
            features = self.detector(torch.zeros(1, 3, input_size, input_size))
        self.output_names = (IMAGE_NAME,) + tuple(n for n in FEATURE_NAMES if getattr(features, n) is not None)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images_bgr = images.permute(0, 3, 1, 2).to(torch.float32)
        features = self.detector(images_bgr)
        return (images_bgr,) + tuple(getattr(features, n) for n in self.output_names[1:])


class HeadGraph(nn.Module):
    """``forward(images_bgr [B, 3, S, S], *features)`` (``EncoderGraph``'s outputs, named ``feature_names``) ->
    (anomaly_map [B, 1, S, S], score [B], routing_weights [B, E]).

    ``detector`` is an ``AnomalyMoE`` (dense routing) or a ``FoldedDetector``.
    """

    def __init__(self, detector: nn.Module, feature_names: tuple[str, ...]):
        super().__init__()
        self.detector = detector
        self.feature_names = feature_names

    def forward(self, images_bgr: torch.Tensor, *features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        named = dict(zip(self.feature_names, features))
        out = self.detector(images_bgr, EncoderFeatures(named["taps"], named.get("descriptor"), named.get("components")))
        return out.anomaly_map, out.score, out.routing_weights


def infer_in_batches(infer: Callable[[np.ndarray], dict[str, np.ndarray]], frames: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Run uint8 frames [N, S, S, 3] through a fixed-batch ``infer`` -> each output concatenated over the N frames.

    A short last chunk is padded with copies of its last frame, and the padding's outputs are dropped.
    """
    outputs: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        for name, value in infer(pad_batch(chunk, batch_size)).items():
            outputs.setdefault(name, []).append(value[: len(chunk)])
    return {name: np.concatenate(values) for name, values in outputs.items()}
