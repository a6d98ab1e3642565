"""Turning image files into the tensors the detector eats, and the train / validation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from amoe_sdk.data.images import read_image, resize_to_input
from amoe_sdk.errors import DataError


def load_images(paths: list[Path], size: int, progress=None) -> torch.Tensor:
    """Read, resize (as the runtime does) and stack: -> uint8 [N, 3, size, size] BGR."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, path in enumerate(progress(paths) if progress else paths):
        out[i] = torch.from_numpy(resize_to_input(read_image(path), size)).permute(2, 0, 1)
    return out


def split_train_val(paths: list[Path], val_fraction: float, min_val: int, seed: int) -> tuple[list[Path], list[Path]]:
    """A seeded split of the normal images; the validation part calibrates the maps and is never trained on."""
    n_val = max(min_val, int(round(len(paths) * val_fraction)))
    if len(paths) - n_val < 2:
        raise DataError(
            f"{len(paths)} normal images are too few: {n_val} go to validation and training needs at least 2 more; "
            "add normal images or lower train.val_fraction / train.min_val_images"
        )
    order = np.random.default_rng(seed).permutation(len(paths))
    val = sorted(paths[i] for i in order[:n_val])
    train = sorted(paths[i] for i in order[n_val:])
    return train, val
