"""A small procedural dataset in the MVTec AD layout, rendered with OpenCV from a seed.

Six categories, each with pixel masks for every defect. The first three (unchanged since they were written, so
results on them stay comparable) are easy; the three of ``synth_line`` are not:

* ``weave`` (texture): a woven surface with scratches, dents, contamination and foreign fibres.
* ``washer`` (object, structural): a metal ring with cracks, chipped edges and stains.
* ``kit`` (object, logical, in the spirit of MVTec LOCO): a tray of four compartments, each holding its own
  part; anomalies are a missing, an extra, a swapped or a wrong-coloured part, all made of normal-looking pixels.
* ``leather`` (texture, subtle), ``pins`` (count and size), ``vial`` (structural and logical): see ``synth_line``.

Every image is drawn from its own generator seeded by (seed, category, split, index), so the output is the same
on every machine and any one image can be regenerated alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from amoe_sdk.data.drawing import IMAGE_SIZE, blob_mask, finish, noise_field, polyline, rng_for
from amoe_sdk.data.synth_line import LINE_CATEGORIES, line_category
from amoe_sdk.errors import DataError


@dataclass(frozen=True)
class SampleSpec:
    """How many images of each kind to write per category."""

    train_good: int = 100
    test_good: int = 24
    test_per_defect: int = 10


# ---------------------------------------------------------------------------------------------------- weave
def _weave_base(rng: np.random.Generator) -> np.ndarray:
    s = IMAGE_SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    period = rng.uniform(11.5, 12.5)
    px, py = rng.uniform(0, 2 * np.pi, 2)
    warp = 2.0 * (noise_field(rng, s, 5) - 0.5)
    threads_x = 0.5 + 0.5 * np.sin(2 * np.pi * xx / period + px + warp)
    threads_y = 0.5 + 0.5 * np.sin(2 * np.pi * yy / period + py - warp)
    checker = (np.sin(np.pi * xx / period + px) * np.sin(np.pi * yy / period + py)) > 0
    weave = np.where(checker, threads_x, threads_y)
    light = 0.9 + 0.2 * noise_field(rng, s, 3)
    base_colour = np.array([120, 150, 170], np.float32) + rng.normal(0, 4, 3)
    image = base_colour[None, None, :] * (0.65 + 0.35 * weave[..., None]) * light[..., None]
    return image.astype(np.float32)


def _weave(rng: np.random.Generator, defect: str) -> tuple[np.ndarray, np.ndarray]:
    s = IMAGE_SIZE
    image = _weave_base(rng)
    mask = np.zeros((s, s), bool)
    centre = rng.integers(60, s - 60, 2)
    if defect == "scratch":
        line = np.zeros((s, s), np.uint8)
        cv2.polylines(line, [polyline(rng, centre.astype(float), rng.uniform(70, 120), 0.15)], False, 1, 2)
        mask = line.astype(bool)
        image[mask] = image[mask] * 0.4 + np.array([235, 240, 245]) * 0.6
    elif defect == "dent":
        axes = (int(rng.integers(10, 18)), int(rng.integers(7, 12)))
        layer = np.zeros((s, s), np.float32)
        cv2.ellipse(layer, tuple(int(c) for c in centre), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        mask = layer > 0
        shade = cv2.GaussianBlur(layer, (0, 0), 3) * 0.55
        grad = np.roll(layer, 3, axis=0) - layer
        image = image * (1 - shade[..., None]) + 60 * grad[..., None]
    elif defect == "contamination":
        mask = blob_mask(rng, s, tuple(int(c) for c in centre), rng.uniform(9, 15))
        colour = np.array([40, 70, 95], np.float32) + rng.normal(0, 5, 3)
        image[mask] = image[mask] * 0.25 + colour * 0.75
    elif defect == "foreign_material":
        fibre = np.zeros((s, s), np.uint8)
        cv2.polylines(fibre, [polyline(rng, centre.astype(float), rng.uniform(50, 90), 0.5)], False, 1, 3)
        mask = fibre.astype(bool)
        image[mask] = np.array([60, 40, 200], np.float32) + rng.normal(0, 8, (int(mask.sum()), 3))
    return finish(image, rng), mask


# --------------------------------------------------------------------------------------------------- washer
def _washer(rng: np.random.Generator, defect: str) -> tuple[np.ndarray, np.ndarray]:
    s = IMAGE_SIZE
    image = np.full((s, s, 3), 35, np.float32) + 10 * noise_field(rng, s, 4)[..., None]
    cx, cy = (s // 2 + rng.integers(-6, 7, 2)).tolist()
    outer, inner = int(rng.integers(96, 101)), int(rng.integers(44, 48))
    ring = np.zeros((s, s), np.uint8)
    cv2.circle(ring, (cx, cy), outer, 1, -1)
    cv2.circle(ring, (cx, cy), inner, 0, -1)
    ring_mask = ring.astype(bool)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 2 * np.pi)
    brushed = 0.8 + 0.2 * np.cos(2 * theta) + 0.05 * np.sin(40 * np.hypot(yy - cy, xx - cx) / outer)
    metal = np.array([165, 168, 172], np.float32)[None, None, :] * brushed[..., None]
    image[ring_mask] = metal[ring_mask]
    mask = np.zeros((s, s), bool)
    angle = rng.uniform(0, 2 * np.pi)
    r_mid = (outer + inner) / 2
    on_ring = np.array([cx + r_mid * np.cos(angle), cy + r_mid * np.sin(angle)])
    if defect == "crack":
        crack = np.zeros((s, s), np.uint8)
        cv2.polylines(crack, [polyline(rng, on_ring, rng.uniform(30, 45), 0.6, steps=6)], False, 1, 2)
        mask = crack.astype(bool) & ring_mask
        image[mask] = 25
    elif defect == "chip":
        edge = np.array([cx + outer * np.cos(angle), cy + outer * np.sin(angle)])
        bite = blob_mask(rng, s, tuple(int(c) for c in edge), rng.uniform(12, 18))
        mask = bite & ring_mask
        image[mask] = 35 + 10 * noise_field(rng, s, 4)[mask][:, None]
    elif defect == "stain":
        blob = blob_mask(rng, s, tuple(int(c) for c in on_ring), rng.uniform(9, 14))
        mask = blob & ring_mask
        image[mask] = image[mask] * 0.45 + np.array([30, 90, 150], np.float32) * 0.55
    return finish(image, rng), mask


# ------------------------------------------------------------------------------------------------------ kit
# Compartment -> (part shape, BGR colour). Compartments: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.
_KIT_LAYOUT = {0: ("nut", (40, 40, 210)), 1: ("block", (200, 90, 30)), 2: ("balls", (30, 200, 230)), 3: ("bar", (60, 170, 60))}
_KIT_WRONG_COLOURS = {0: (40, 200, 40), 1: (30, 30, 200), 2: (200, 60, 200), 3: (40, 150, 230)}


def _kit_compartments() -> list[tuple[int, int, int, int]]:
    s, margin, gap = IMAGE_SIZE, 24, 12
    cell = (s - 2 * margin - gap) // 2
    boxes = []
    for row in range(2):
        for col in range(2):
            x0, y0 = margin + col * (cell + gap), margin + row * (cell + gap)
            boxes.append((x0, y0, x0 + cell, y0 + cell))
    return boxes


def _draw_part(canvas: np.ndarray, footprint: np.ndarray, shape: str, colour, centre, rng: np.random.Generator) -> None:
    cx, cy = int(centre[0]), int(centre[1])
    layer = np.zeros(footprint.shape, np.uint8)
    if shape == "nut":
        cv2.circle(layer, (cx, cy), 24, 1, -1)
        cv2.circle(layer, (cx, cy), 9, 0, -1)
    elif shape == "block":
        rect = ((cx, cy), (44, 44), float(rng.uniform(-8, 8)))
        cv2.fillPoly(layer, [cv2.boxPoints(rect).astype(np.int32)], 1)
    elif shape == "balls":
        cv2.circle(layer, (cx - 17, cy), 12, 1, -1)
        cv2.circle(layer, (cx + 17, cy), 12, 1, -1)
    elif shape == "bar":
        rect = ((cx, cy), (70, 18), float(rng.uniform(-12, 12)))
        cv2.fillPoly(layer, [cv2.boxPoints(rect).astype(np.int32)], 1)
    part = layer.astype(bool)
    shading = 0.85 + 0.15 * noise_field(rng, footprint.shape[0], 6)
    canvas[part] = np.array(colour, np.float32) * shading[part][:, None]
    footprint |= part


def _kit(rng: np.random.Generator, defect: str) -> tuple[np.ndarray, np.ndarray]:
    s = IMAGE_SIZE
    image = np.full((s, s, 3), 60, np.float32) + 8 * noise_field(rng, s, 4)[..., None]
    boxes = _kit_compartments()
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(image, (x0, y0), (x1, y1), (200, 200, 196), -1)
        cv2.rectangle(image, (x0, y0), (x1, y1), (150, 150, 150), 2)
    layout = dict(_KIT_LAYOUT)
    target = int(rng.integers(0, 4))
    if defect == "swapped":
        other = (target + 1 + int(rng.integers(0, 3))) % 4
        layout[target], layout[other] = layout[other], layout[target]
    elif defect == "wrong_colour":
        layout[target] = (layout[target][0], _KIT_WRONG_COLOURS[target])
    mask = np.zeros((s, s), bool)
    for index, (x0, y0, x1, y1) in enumerate(boxes):
        footprint = np.zeros((s, s), bool)
        centre = ((x0 + x1) / 2 + rng.integers(-5, 6), (y0 + y1) / 2 + rng.integers(-5, 6))
        if defect == "missing" and index == target:
            # The anomaly is an absence: mark where the part should have been.
            _draw_part(np.zeros_like(image), footprint, *layout[index], centre, rng)
            mask |= footprint
            continue
        shape, colour = layout[index]
        _draw_part(image, footprint, shape, colour, centre, rng)
        if defect in ("swapped", "wrong_colour") and layout[index] != _KIT_LAYOUT[index]:
            mask |= footprint
    if defect == "extra":
        x0, y0, x1, y1 = boxes[target]
        extra_shape, extra_colour = _KIT_LAYOUT[(target + 2) % 4]
        corner = (x0 + 26 + rng.integers(0, 4), y1 - 26 - rng.integers(0, 4))
        footprint = np.zeros((s, s), bool)
        if extra_shape in ("bar", "balls"):
            extra_shape = "nut"  # only a compact part fits in a corner
        _draw_part(image, footprint, extra_shape, extra_colour, corner, rng)
        mask |= footprint
    return finish(image, rng), mask


CATEGORIES: dict[str, tuple[Callable[[np.random.Generator, str], tuple[np.ndarray, np.ndarray]], tuple[str, ...]]] = {
    "weave": (_weave, ("scratch", "dent", "contamination", "foreign_material")),
    "washer": (_washer, ("crack", "chip", "stain")),
    "kit": (_kit, ("missing", "extra", "swapped", "wrong_colour")),
    **{name: (line_category(scene), defects) for name, (scene, defects) in LINE_CATEGORIES.items()},
}


def render(category: str, defect: str, seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 BGR, IMAGE_SIZE square) and its bool mask; ``defect`` is ``good`` or a defect type."""
    draw, defects = CATEGORIES[category]
    if defect != "good" and defect not in defects:
        raise DataError(f"category {category} has no defect type {defect}; known: {', '.join(defects)}")
    image, mask = draw(rng_for(seed, category, split, defect, index), defect)
    if defect != "good" and not mask.any():
        raise AssertionError(f"renderer produced an empty mask for {category}/{defect}/{index}")
    return image, mask


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise DataError(f"could not encode {path}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encoded.tobytes())
    tmp.replace(path)


def write_sample_dataset(
    out: str | Path, categories: list[str] | None = None, seed: int = 0, spec: SampleSpec = SampleSpec(), progress=None
) -> list[Path]:
    """Write the sample categories under ``out`` in the MVTec AD layout; returns the category folders."""
    out = Path(out)
    categories = categories or list(CATEGORIES)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise DataError(f"unknown sample categories {unknown}; known: {', '.join(CATEGORIES)}")
    jobs: list[tuple[str, str, str, int]] = []
    for category in categories:
        jobs += [(category, "train", "good", i) for i in range(spec.train_good)]
        jobs += [(category, "test", "good", i) for i in range(spec.test_good)]
        for defect in CATEGORIES[category][1]:
            jobs += [(category, "test", defect, i) for i in range(spec.test_per_defect)]
    for category, split, defect, index in progress(jobs) if progress else jobs:
        image, mask = render(category, defect, seed, split, index)
        folder = out / category / split / defect
        folder.mkdir(parents=True, exist_ok=True)
        _write_png(folder / f"{index:03d}.png", image)
        if defect != "good":
            gt = out / category / "ground_truth" / defect
            gt.mkdir(parents=True, exist_ok=True)
            _write_png(gt / f"{index:03d}_mask.png", mask.astype(np.uint8) * 255)
    return [out / c for c in categories]
