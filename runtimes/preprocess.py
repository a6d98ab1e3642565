"""Frame checks, the resize to the bundle's input size, batch padding, and the map back to the frame's size.

The resize is ``amoe_sdk.data.images.resize_to_input`` (the lower layer), re-exported here, so that the pixels
the exported graph sees are the pixels the PyTorch model was trained and calibrated on (the graph itself does
colour order and normalisation).
"""

from __future__ import annotations

import cv2
import numpy as np

from amoe_sdk.data.images import resize_to_input
from amoe_sdk.errors import InputError

__all__ = ["check_frame", "heat_map_overlay", "map_to_frame", "pad_batch", "resize_to_input"]


def check_frame(image: object, where: str = "frame") -> np.ndarray:
    """A frame must be an H x W x 3 uint8 BGR array, as ``cv2.imread`` or ``VideoCapture.read`` delivers it."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"{where} is a {type(image).__name__}, not a numpy array; pass the array cv2.imread / cv2.VideoCapture gives")
    if image.size == 0:
        raise InputError(f"{where} is empty (shape {image.shape}); the camera or file gave no pixels, skip the frame")
    if image.dtype != np.uint8:
        raise InputError(
            f"{where} has dtype {image.dtype}; pass uint8 BGR (for float images in [0, 1]: (img * 255).astype(np.uint8))"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        channels = 1 if image.ndim == 2 else image.shape[2] if image.ndim == 3 else "?"
        raise InputError(
            f"{where} has shape {image.shape} ({channels} channel(s)); pass H x W x 3 BGR: convert grey with "
            "cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) and BGRA with cv2.COLOR_BGRA2BGR"
        )
    return image


def pad_batch(frames, batch_size: int) -> np.ndarray:
    """Up to ``batch_size`` uint8 S x S x 3 frames (a list or an [n, S, S, 3] array) -> the contiguous
    [batch_size, S, S, 3] batch a fixed-batch graph takes: a short chunk is padded with copies of its last frame,
    whose outputs the caller drops."""
    count = len(frames)
    if not 1 <= count <= batch_size:
        raise ValueError(f"a batch of {batch_size} takes 1 to {batch_size} frames, got {count}")
    stacked = np.stack(list(frames)) if not isinstance(frames, np.ndarray) else frames
    if count < batch_size:
        stacked = np.concatenate([stacked, np.repeat(stacked[-1:], batch_size - count, axis=0)])
    return np.ascontiguousarray(stacked)


def map_to_frame(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """S x S float map -> height x width float32, bilinear."""
    if anomaly_map.shape == (height, width):
        return anomaly_map.astype(np.float32, copy=False)
    return cv2.resize(anomaly_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def heat_map_overlay(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, alpha: float = 0.45) -> np.ndarray:
    """BGR frame with the anomaly map blended in as a JET colour map and the above-threshold region outlined.

    The colour scale runs from 0 (the median of normal pixels) to twice the threshold, so a frame's colours mean
    the same on every frame.
    """
    scaled = np.clip(anomaly_map / max(2.0 * threshold, 1e-6), 0.0, 1.0)
    heat = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(image, 1.0 - alpha, heat, alpha, 0.0)
    mask = (anomaly_map > threshold).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(blended, contours, -1, (255, 255, 255), 2)
    return blended
