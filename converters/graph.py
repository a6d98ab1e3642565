"""The graph every artifact is exported from: uint8 BGR frames in, the anomaly map and the image score out.

Pre-processing lives inside the graph (NHWC to NCHW, cast, the encoder's own normalisation) and so do the
per-expert normalisation constants, so the runtime only resizes with OpenCV and applies the threshold. That is
the whole contract, and it is the same for every backend.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from amoe_sdk.runtimes.preprocess import pad_batch

INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score", "routing_weights")


class EdgeGraph(nn.Module):
    """``forward(images uint8 [B, S, S, 3] BGR)`` -> (anomaly_map [B, 1, S, S], score [B], routing_weights [B, E]).

    ``detector`` is an ``AnomalyMoE`` (dense routing) or a ``FoldedDetector``.
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        out = self.detector(x)
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
