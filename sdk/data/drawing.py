"""Drawing helpers the procedural sample categories share: seeded generators, smooth noise, blobs, strokes,
camera pose and lighting, sensor noise, and defect masks that are exactly the pixels a defect changed."""

from __future__ import annotations

import hashlib
from typing import Callable

import cv2
import numpy as np

IMAGE_SIZE = 288
SENSOR_NOISE = 3.0


def rng_for(seed: int, *keys: object) -> np.random.Generator:
    """A generator of its own for every (seed, keys): any one image can be regenerated alone, on any machine."""
    digest = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def noise_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1], shape (size, size)."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def blob_mask(rng: np.random.Generator, size: int, center: tuple[int, int], radius: float) -> np.ndarray:
    """An irregular filled blob as a bool mask."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    radii = radius * rng.uniform(0.6, 1.2, 9)
    pts = np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], axis=1)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [pts.astype(np.int32)], 1)
    return mask.astype(bool)


def polyline(rng: np.random.Generator, start: np.ndarray, length: float, wiggle: float, steps: int = 8) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    pts = [start]
    for _ in range(steps):
        angle += rng.normal(0, wiggle)
        pts.append(pts[-1] + (length / steps) * np.array([np.cos(angle), np.sin(angle)]))
    return np.array(pts, np.int32)


def finish(image: np.ndarray, rng: np.random.Generator, noise: float = SENSOR_NOISE) -> np.ndarray:
    """Sensor noise and clipping: every image, normal or not, goes through this."""
    image = image + rng.normal(0, noise, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def camera_pose(rng: np.random.Generator, shift: float, degrees: float) -> np.ndarray:
    """A 2 x 3 affine matrix: the part placed up to ``shift`` px off centre and turned up to ``degrees``, as parts
    arrive on a line."""
    angle = rng.uniform(-degrees, degrees)
    dx, dy = rng.uniform(-shift, shift, 2)
    matrix = cv2.getRotationMatrix2D((IMAGE_SIZE / 2, IMAGE_SIZE / 2), angle, 1.0)
    matrix[:, 2] += (dx, dy)
    return matrix


def place(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``image`` (float, H x W x 3) seen through the pose ``matrix``; borders repeat the edge (a wider background)."""
    return cv2.warpAffine(image, matrix, (IMAGE_SIZE, IMAGE_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def lighting(rng: np.random.Generator, gain: float, gradient: float) -> np.ndarray:
    """H x W x 1 illumination: a global gain within 1 +- ``gain`` and a linear fall-off of up to ``gradient``
    across the frame in a random direction."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / IMAGE_SIZE - 0.5
    direction = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(direction) * xx + np.sin(direction) * yy
    return ((1.0 + rng.uniform(-gain, gain)) * (1.0 + gradient * rng.uniform(0, 1) * ramp))[..., None]


Scene = Callable[[np.random.Generator, np.random.Generator, str], np.ndarray]


def exact_defect_pair(scene: Scene, rng: np.random.Generator, defect: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``scene`` with and without ``defect`` from the same randomness and the same sensor noise -> (image,
    mask, the same image without the defect); the mask is exactly the pixels the defect changed.

    ``scene(scene_rng, defect_rng, defect)`` -> float BGR image before noise; it must draw everything the normal
    image needs from ``scene_rng`` in the same order whatever the defect, and the defect's own choices from
    ``defect_rng``."""
    seeds = rng.integers(0, 2**63 - 1, 3)
    clean = scene(np.random.default_rng(seeds[0]), np.random.default_rng(seeds[1]), "good")
    noise = np.random.default_rng(seeds[2]).normal(0, SENSOR_NOISE, clean.shape)
    reference = np.clip(clean + noise, 0, 255).astype(np.uint8)
    if defect == "good":
        return reference, np.zeros(reference.shape[:2], bool), reference
    image = np.clip(scene(np.random.default_rng(seeds[0]), np.random.default_rng(seeds[1]), defect) + noise, 0, 255).astype(np.uint8)
    return image, (image != reference).any(axis=2), reference
