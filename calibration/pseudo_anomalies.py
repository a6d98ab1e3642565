"""Pseudo-anomalies synthesised from normal images, each with its pixel mask.

They stand in for real defects when the accuracy of a quantized model must be checked and the user has no
anomalous images: cut-paste (a patch of one normal image, flipped or rotated, pasted elsewhere; structural
anomalies look like that to a reconstruction model), Perlin-noise blemishes (an irregular smooth region
blended towards another colour or texture: stains, contamination) and region swaps (two parts of one image
trade places: every pixel is a normal one and only the layout is wrong, as in a logical anomaly such as
components in each other's compartments). Deterministic for a seed.

``synthesise_subtle`` makes the same cut-paste and Perlin kinds at the contrast of the normal images' own
variation (``normal_variation``): the blatant ones stay separated however noisy a quantized model gets, and
would hide a loss that a subtle real defect suffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def perlin_noise(shape: tuple[int, int], cells: int, rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise in about [-1, 1], shape (H, W), with ``cells`` lattice cells across."""
    h, w = shape
    angles = rng.uniform(0, 2 * np.pi, (cells + 1, cells + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    ys, xs = np.linspace(0, cells, h, endpoint=False), np.linspace(0, cells, w, endpoint=False)
    y, x = np.meshgrid(ys, xs, indexing="ij")
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = y - y0, x - x0

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[y0 + dy, x0 + dx]
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    top = corner(0, 0) + fade(fx) * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + fade(fx) * (corner(1, 1) - corner(1, 0))
    return (top + fade(fy) * (bottom - top)) * np.sqrt(2)


def cut_paste(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste a rotated patch of ``donor`` into ``image`` (both H x W x 3 uint8) -> (image, bool mask)."""
    h, w = image.shape[:2]
    ph, pw = (int(rng.uniform(0.08, 0.25) * h) for _ in range(2))
    sy, sx = rng.integers(0, h - ph), rng.integers(0, w - pw)
    patch = donor[sy : sy + ph, sx : sx + pw]
    rotation = cv2.getRotationMatrix2D((pw / 2, ph / 2), float(rng.uniform(-45, 45)), 1.0)
    patch = cv2.warpAffine(patch, rotation, (pw, ph), borderMode=cv2.BORDER_REFLECT)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = np.clip(patch.astype(np.float32) * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8)
    ty, tx = rng.integers(0, h - ph), rng.integers(0, w - pw)
    out = image.copy()
    out[ty : ty + ph, tx : tx + pw] = patch
    mask = np.zeros((h, w), bool)
    mask[ty : ty + ph, tx : tx + pw] = True
    return out, mask


def perlin_region(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An irregular Perlin-noise region covering 0.5-15 % of an h x w image (the last of 20 draws if none does)
    -> (bool mask [h, w], its feathered weight [h, w, 1]: blurred inside the mask and zero outside it, so that the
    mask is exactly what a blend by that weight changes)."""
    for _ in range(20):
        noise = perlin_noise((h, w), int(rng.integers(2, 6)), rng)
        mask = noise > rng.uniform(0.35, 0.55)
        if 0.005 * h * w < mask.sum() < 0.15 * h * w:
            break
    return mask, (cv2.GaussianBlur(mask.astype(np.float32), (5, 5), 1.5) * mask)[..., None]


def perlin_blemish(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blend an irregular Perlin-noise region towards a random colour -> (image, bool mask)."""
    mask, feathered = perlin_region(*image.shape[:2], rng)
    colour = rng.integers(0, 256, 3).astype(np.float32)
    opacity = rng.uniform(0.5, 0.9)
    soft = feathered * opacity
    out = image.astype(np.float32) * (1 - soft) + colour * soft
    return np.clip(out, 0, 255).astype(np.uint8), mask


def region_swap(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Exchange two non-overlapping squares of ``image`` (H x W x 3 uint8) -> (image, bool mask of changed pixels)."""
    h, w = image.shape[:2]
    side = int(rng.uniform(0.2, 0.4) * min(h, w))
    first = (int(rng.integers(0, h - side)), int(rng.integers(0, w - side)))
    for _ in range(50):
        second = (int(rng.integers(0, h - side)), int(rng.integers(0, w - side)))
        if abs(second[0] - first[0]) >= side or abs(second[1] - first[1]) >= side:
            break
    else:  # the first square sits too central to leave room for a second: swap the top-left and top-right squares
        side = min(h, w // 2)
        first, second = (0, 0), (0, w // 2)
    (ay, ax), (by, bx) = first, second
    out = image.copy()
    out[ay : ay + side, ax : ax + side] = image[by : by + side, bx : bx + side]
    out[by : by + side, bx : bx + side] = image[ay : ay + side, ax : ax + side]
    # A swap of two alike regions changes nothing there: the mask is exactly what changed.
    mask = np.any(out != image, axis=-1)
    return out, mask


def normal_variation(normals: np.ndarray) -> float:
    """The contrast of the normal images' own texture: the median over images of the std of each image minus its
    own blur (sigma 3 px), in grey levels. Subtle pseudo-anomalies change their region by about this much."""
    values = []
    for image in normals:
        grey = image.astype(np.float32).mean(axis=2)
        values.append(float(np.std(grey - cv2.GaussianBlur(grey, (0, 0), 3.0))))
    return float(np.median(values))


# Subtle pseudo-anomalies change their region by at least this many grey levels: below it they drown in sensor
# noise (about 3 levels), and no detector could see them.
MIN_SUBTLE_AMPLITUDE = 6.0


def subtle_cut_paste(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator, amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """A patch of another normal image, unrotated and at its own brightness, blended in so that the region changes
    by about ``amplitude`` grey levels on average -> (image, bool mask of the changed pixels)."""
    h, w = image.shape[:2]
    ph, pw = (int(rng.uniform(0.08, 0.2) * h) for _ in range(2))
    sy, sx = rng.integers(0, h - ph), rng.integers(0, w - pw)
    ty, tx = rng.integers(0, h - ph), rng.integers(0, w - pw)
    target = image[ty : ty + ph, tx : tx + pw].astype(np.float32)
    patch = donor[sy : sy + ph, sx : sx + pw].astype(np.float32)
    full = float(np.abs(patch - target).mean())
    alpha = float(np.clip(amplitude / max(full, 1e-6), 0.15, 1.0))
    out = image.copy()
    out[ty : ty + ph, tx : tx + pw] = np.clip(np.rint(target * (1 - alpha) + patch * alpha), 0, 255).astype(np.uint8)
    return out, np.any(out != image, axis=-1)


def subtle_blemish(image: np.ndarray, rng: np.random.Generator, amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """An irregular Perlin region whose colour shifts by about ``amplitude`` grey levels per channel (a random
    direction: darker, lighter, tinted) -> (image, bool mask of the changed pixels)."""
    _, soft = perlin_region(*image.shape[:2], rng)
    shift = amplitude * rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.4, 3)
    out = np.clip(np.rint(image.astype(np.float32) + soft * shift), 0, 255).astype(np.uint8)
    return out, np.any(out != image, axis=-1)


PSEUDO_KINDS = ("cut_paste", "perlin", "region_swap")


def check_kinds(kinds: Sequence[str]) -> None:
    """ValueError unless ``kinds`` is a non-empty choice of ``PSEUDO_KINDS``."""
    if not kinds or set(kinds) - set(PSEUDO_KINDS):
        raise ValueError(f"pseudo-anomaly kinds must be a non-empty choice of {list(PSEUDO_KINDS)}, got {list(kinds)}")


def synthesise(
    normals: np.ndarray, count: int, seed: int = 0, kinds: Sequence[str] = ("cut_paste", "perlin"),
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` pseudo-anomalies from normal images [N, H, W, 3] uint8 -> (images [count, H, W, 3], masks [count, H, W]).

    The ``kinds`` (of ``PSEUDO_KINDS``) take turns, each from a different normal image where there are enough.
    """
    if len(normals) == 0:
        raise ValueError("pseudo-anomalies need at least one normal image")
    check_kinds(kinds)
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(count):
        base = normals[i % len(normals)]
        kind = kinds[i % len(kinds)]
        if kind == "cut_paste":
            image, mask = cut_paste(base, normals[rng.integers(len(normals))], rng)
        elif kind == "perlin":
            image, mask = perlin_blemish(base, rng)
        else:
            image, mask = region_swap(base, rng)
        images.append(image)
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def synthesise_subtle(normals: np.ndarray, count: int, seed: int = 0, amplitude: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """``count`` subtle cut-paste and Perlin pseudo-anomalies, taking turns -> (images, masks, the amplitude used:
    ``normal_variation`` of ``normals`` unless given, at least ``MIN_SUBTLE_AMPLITUDE``)."""
    if len(normals) == 0:
        raise ValueError("pseudo-anomalies need at least one normal image")
    amplitude = max(normal_variation(normals) if amplitude is None else amplitude, MIN_SUBTLE_AMPLITUDE)
    rng = np.random.default_rng(seed + 7919)  # not the blatant set's draws
    images, masks = [], []
    for i in range(count):
        base = normals[i % len(normals)]
        if i % 2 == 0:
            image, mask = subtle_cut_paste(base, normals[rng.integers(len(normals))], rng, amplitude)
        else:
            image, mask = subtle_blemish(base, rng, amplitude)
        images.append(image)
        masks.append(mask)
    return np.stack(images), np.stack(masks), amplitude
