"""Calibration and gate data, fed through exactly the runtime's pre-processing.

Calibration images are normal images (a folder, or an MVTec category's ``train/good``); none is an error and
fewer than ``MIN_INT8_CALIBRATION_IMAGES`` a warning with the count. Random data is never substituted. The gate set
is held-out normal images plus either the user's real anomalies with masks or pseudo-anomalies made from the
normal images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from amoe_sdk.calibration.pseudo_anomalies import synthesise, synthesise_subtle
from amoe_sdk.data.images import list_images, read_image, read_mask, resize_to_input
from amoe_sdk.errors import DataError

# Below these counts a warning says so: INT8 ranges need more normal images than a threshold does (a threshold is
# one quantile of the scores; ranges are taken per layer, and a rare normal pattern missing from them is clipped).
LOG = logging.getLogger("amoe_sdk.calibration")
MIN_INT8_CALIBRATION_IMAGES = 32
MIN_THRESHOLD_IMAGES = 8


def normal_image_paths(source: str | Path) -> list[Path]:
    """A folder of images, or an MVTec category (its ``train/good``)."""
    source = Path(source)
    folder = source / "train" / "good" if (source / "train" / "good").is_dir() else source
    paths = list_images(folder)
    if not paths:
        raise DataError(f"no calibration images in {folder}; pass a folder of normal PNG/JPEG/BMP images (never random data)")
    if len(paths) < MIN_INT8_CALIBRATION_IMAGES:
        LOG.warning("only %d calibration images in %s; INT8 ranges are unreliable below %d", len(paths), folder, MIN_INT8_CALIBRATION_IMAGES)
    return paths


def load_frames(paths: list[Path], size: int) -> np.ndarray:
    """uint8 [N, size, size, 3] BGR, resized as the runtime resizes."""
    return np.stack([resize_to_input(read_image(p), size) for p in paths])


@dataclass
class GateSet:
    """Frames [N, S, S, 3] uint8, labels [N] (0 normal, 1 anomalous), masks [N, S, S] bool, ``groups`` [N] (the
    anomalies' kind: ``blatant`` / ``subtle`` pseudo-anomalies, or ``real``; ``normal`` for the normals, which
    every group is measured against), and where they came from."""

    frames: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    source: str
    groups: np.ndarray

    def group_indices(self) -> dict[str, np.ndarray]:
        """Each anomaly group with the normal images: the index sets the gate measures separately."""
        normal = self.labels == 0
        return {name: np.nonzero(normal | (self.groups == name))[0] for name in dict.fromkeys(self.groups[~normal])}


def gate_set(normal_frames: np.ndarray, size: int, val_data: str | Path | None = None, seed: int = 0) -> GateSet:
    """Held-out normal frames plus real anomalies from ``val_data`` (an MVTec category's test split) or, without
    it, as many blatant and as many subtle pseudo-anomalies as there are normal frames."""
    normal_masks = np.zeros(normal_frames.shape[:3], bool)
    if val_data is None:
        blatant, blatant_masks = synthesise(normal_frames, len(normal_frames), seed)
        subtle, subtle_masks, amplitude = synthesise_subtle(normal_frames, len(normal_frames), seed)
        anomalies, masks = np.concatenate([blatant, subtle]), np.concatenate([blatant_masks, subtle_masks])
        groups = ["blatant"] * len(blatant) + ["subtle"] * len(subtle)
        source = (f"{len(normal_frames)} held-out normal images + {len(blatant)} pseudo-anomalies (cut-paste, Perlin) + "
                  f"{len(subtle)} subtle ones ({amplitude:.1f} grey levels, the normal images' own variation)")
    else:
        from amoe_sdk.data.layouts import read_dataset

        dataset = read_dataset(val_data, require_test=True)
        defective = [s for s in dataset.test if s.label == 1]
        if not defective or not all(s.mask_paths for s in defective):
            raise DataError(f"--val-data {val_data} needs anomalous test images with ground-truth masks")
        anomalies, masks = [], []
        for sample in defective:
            image = read_image(sample.image_path)
            mask = np.zeros(image.shape[:2], bool)
            for path in sample.mask_paths:
                mask |= read_mask(path, image.shape[:2], sample.image_path)
            anomalies.append(resize_to_input(image, size))
            masks.append(cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0)
        anomalies, masks = np.stack(anomalies), np.stack(masks)
        groups = ["real"] * len(anomalies)
        source = f"{len(normal_frames)} held-out normal images + {len(anomalies)} anomalous images from {val_data}"
    frames = np.concatenate([normal_frames, anomalies])
    labels = np.concatenate([np.zeros(len(normal_frames), int), np.ones(len(anomalies), int)])
    return GateSet(frames, labels, np.concatenate([normal_masks, masks]), source, np.array(["normal"] * len(normal_frames) + groups))
