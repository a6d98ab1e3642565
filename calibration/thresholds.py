"""The threshold rule every artifact ships with: mean + sigma * std of its own scores on normal images."""

from __future__ import annotations

import numpy as np


def normal_threshold(scores: np.ndarray, sigma: float) -> tuple[float, float, float]:
    """Normal scores [N] -> (threshold, mean, std); the std is the sample std (0 for a single image)."""
    mean = float(scores.mean())
    std = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
    return mean + sigma * std, mean, std
