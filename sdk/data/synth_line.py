"""Three sample categories that do not saturate: what a line's harder products look like.

* ``leather`` (texture, subtle): a stochastic grain whose defects (the kinds of weave: scratch, dent,
  contamination, foreign material) are blended, thin and of the amplitude of the grain's own variation, so a
  detector must model the texture's statistics; no defect has an outlier colour.
* ``pins`` (object, count and size, in the spirit of MVTec LOCO's pushpins): a tray of six pockets with one pin
  each, anywhere in its pocket; anomalies are a missing pin, an extra pin touching or overlapping its twin, a pin
  of the wrong size and one head fused from two.
* ``vial`` (object, structural and logical together): a glass vial seen from the side, with its fill level,
  label and cap; anomalies are a low fill level, a shifted or tilted label, a loose cap (logical: every pixel
  is a normal one, only a place or an angle is wrong) and a hairline crack or a particle (structural).

Every normal image varies as parts on a line do: position, a small rotation, the lighting, and each part's own
placement. Each image is rendered with and without its defect from the same randomness, so its mask is exactly
the pixels the defect changed (``drawing.exact_defect_pair``).
"""

from __future__ import annotations

import cv2
import numpy as np

from amoe_sdk.data.drawing import IMAGE_SIZE, blob_mask, camera_pose, exact_defect_pair, lighting, noise_field, place, polyline

S = IMAGE_SIZE


# -------------------------------------------------------------------------------------------------- leather
def _grain(rng: np.random.Generator, size: int) -> np.ndarray:
    """Leather grain in [0, 1]: octaves of value noise from pores (3 px) to folds (24 px)."""
    octaves = ((96, 0.35), (48, 0.3), (24, 0.2), (12, 0.15))
    return sum(weight * noise_field(rng, size, cells) for cells, weight in octaves)


def _leather_scene(scene: np.random.Generator, defect_rng: np.random.Generator, defect: str) -> np.ndarray:
    big = int(S * 1.3)  # drawn larger, then turned and cropped, so rotation never shows an edge
    grain = _grain(scene, big)
    base = np.array([62, 92, 132], np.float32) + scene.normal(0, 4, 3)
    texture = base[None, None, :] * (0.72 + 0.56 * grain[..., None])
    matrix = camera_pose(scene, shift=12, degrees=6)
    matrix[:, 2] -= (big - S) / 2
    image = cv2.warpAffine(texture, matrix, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    light = lighting(scene, gain=0.08, gradient=0.15)
    if defect != "good":
        image = _leather_defect(image, defect_rng, defect)
    return image * light


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A 0/1 mask blurred into an alpha in [0, 1] (a blended edge instead of a cut-out)."""
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)[..., None]


def _leather_defect(image: np.ndarray, rng: np.random.Generator, defect: str) -> np.ndarray:
    centre = rng.integers(60, S - 60, 2)
    if defect == "scratch":
        line = np.zeros((S, S), np.uint8)
        cv2.polylines(line, [polyline(rng, centre.astype(float), rng.uniform(60, 100), 0.12)], False, 1, 1, cv2.LINE_AA)
        alpha = _soft(line > 0, 0.7)
        return image * (1 + rng.uniform(0.16, 0.22) * alpha / max(alpha.max(), 1e-6))
    if defect == "dent":
        layer = np.zeros((S, S), np.float32)
        axes = (int(rng.integers(12, 20)), int(rng.integers(8, 13)))
        cv2.ellipse(layer, tuple(int(c) for c in centre), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        depth = cv2.GaussianBlur(layer, (0, 0), 4)
        slope = np.roll(depth, 3, axis=0) - depth  # the lit and the shaded rim of a shallow depression
        return image * (1 - 0.1 * depth[..., None] + 0.7 * slope[..., None])
    if defect == "contamination":
        alpha = _soft(blob_mask(rng, S, tuple(int(c) for c in centre), rng.uniform(9, 15)), 2.0) * rng.uniform(0.55, 0.65)
        # Darker and warmer, and it fills the pores: the grain flattens under it (its own statistics change, its
        # brightness stays within the grain's range).
        stain = cv2.GaussianBlur(image, (0, 0), 2.0) * np.array([0.8, 0.88, 0.86], np.float32)
        return image * (1 - alpha) + stain * alpha
    if defect == "foreign_material":
        fibre = np.zeros((S, S), np.uint8)
        cv2.polylines(fibre, [polyline(rng, centre.astype(float), rng.uniform(45, 80), 0.45)], False, 1, 2, cv2.LINE_AA)
        alpha = _soft(fibre > 0, 0.8) * rng.uniform(0.55, 0.65)
        colour = image.mean(axis=(0, 1)) * np.array([1.25, 1.05, 0.8], np.float32)  # a faded, bluer fibre
        return image * (1 - alpha) + colour * alpha
    raise ValueError(defect)


# ----------------------------------------------------------------------------------------------------- pins
_PIN_RADIUS = 10
_PIN_COLOUR = np.array([48, 52, 196], np.float32)  # red heads, BGR
_TRAY = (30, 58, 258, 230)  # x0, y0, x1, y1 before the pose
_POCKET_ROWS, _POCKET_COLS, _WALL = 2, 3, 8


def _pockets() -> list[tuple[int, int, int, int]]:
    x0, y0, x1, y1 = _TRAY
    w = (x1 - x0 - (_POCKET_COLS + 1) * _WALL) // _POCKET_COLS
    h = (y1 - y0 - (_POCKET_ROWS + 1) * _WALL) // _POCKET_ROWS
    return [
        (x0 + _WALL + c * (w + _WALL), y0 + _WALL + r * (h + _WALL), x0 + _WALL + c * (w + _WALL) + w, y0 + _WALL + r * (h + _WALL) + h)
        for r in range(_POCKET_ROWS) for c in range(_POCKET_COLS)
    ]


def _inside(pocket, point, radius: float) -> bool:
    px0, py0, px1, py1 = pocket
    margin = radius + 3
    return px0 + margin <= point[0] <= px1 - margin and py0 + margin <= point[1] <= py1 - margin


def _draw_pin(canvas: np.ndarray, centres: list, radius: float, needle_angle: float, tone: float) -> None:
    """A pushpin seen from above: its shadow, the needle's stub, the round head and its highlight. Two ``centres``
    draw one head fused from two (a single shape, one highlight, one needle)."""
    cx, cy = (float(v) for v in np.mean(centres, axis=0))
    shape = np.zeros(canvas.shape[:2], np.uint8)
    for x, y in centres:
        cv2.circle(shape, (int(round(x)), int(round(y))), int(round(radius)), 1, -1, cv2.LINE_AA)
    shadow = cv2.GaussianBlur(np.roll(shape, (3, 3), axis=(0, 1)).astype(np.float32), (0, 0), 2)
    canvas *= 1 - 0.35 * shadow[..., None]
    reach = radius + 7 + (np.hypot(*np.subtract(centres[0], centres[-1])) / 2)
    tip = (int(round(cx + reach * np.cos(needle_angle))), int(round(cy + reach * np.sin(needle_angle))))
    cv2.line(canvas, (int(round(cx)), int(round(cy))), tip, (170, 170, 175), 2, cv2.LINE_AA)
    head = cv2.GaussianBlur(shape.astype(np.float32), (3, 3), 0.7)
    yy, xx = np.mgrid[0 : canvas.shape[0], 0 : canvas.shape[1]].astype(np.float32)
    spot = np.exp(-(((xx - cx + radius * 0.35) ** 2 + (yy - cy + radius * 0.35) ** 2) / (2 * (radius * 0.35) ** 2)))
    edge = np.clip(1 - np.hypot(xx - cx, yy - cy) / max(radius * 1.6, 1), 0, 1)
    colour = _PIN_COLOUR[None, None, :] * tone * (0.8 + 0.2 * edge[..., None]) + 90 * spot[..., None]
    canvas[:] = canvas * (1 - head[..., None]) + colour * head[..., None]


def _pins_scene(scene: np.random.Generator, defect_rng: np.random.Generator, defect: str) -> np.ndarray:
    canvas = np.full((S, S, 3), 52, np.float32) + 10 * noise_field(scene, S, 5)[..., None]
    x0, y0, x1, y1 = _TRAY
    cv2.rectangle(canvas, (x0, y0), (x1, y1), (196, 200, 204), -1)
    pockets = _pockets()
    for px0, py0, px1, py1 in pockets:
        cv2.rectangle(canvas, (px0, py0), (px1, py1), (168, 172, 176), -1)
        cv2.rectangle(canvas, (px0, py0), (px1, py1), (140, 142, 146), 1)
    # Every pin's own placement first, whatever the defect: the same scene with and without it. A pin lies anywhere
    # in its pocket, so a head at any place is normal there: only the count per pocket tells a twin or a gap.
    pins = []
    for pocket in pockets:
        px0, py0, px1, py1 = pocket
        margin = _PIN_RADIUS + 3
        centre = np.array([scene.uniform(px0 + margin, px1 - margin), scene.uniform(py0 + margin, py1 - margin)])
        pins.append({"centres": [centre], "angle": scene.uniform(0, 2 * np.pi), "tone": scene.uniform(0.93, 1.05), "radius": float(_PIN_RADIUS)})
    pose = camera_pose(scene, shift=8, degrees=3)
    light = lighting(scene, gain=0.08, gradient=0.12)
    extra = None
    if defect != "good":
        target = int(defect_rng.integers(0, len(pins)))
        first = pins[target]["centres"][0]
        if defect == "missing":
            pins[target] = None
        elif defect == "wrong_size":
            pins[target]["radius"] *= defect_rng.choice([0.7, 1.35])
        elif defect in ("extra", "fused"):
            # Its twin in the same pocket: touching or overlapping it (extra), or one head fused from two (fused).
            reach = (1.6, 2.1) if defect == "extra" else (0.9, 1.3)
            for _ in range(100):
                angle = defect_rng.uniform(0, 2 * np.pi)
                twin = first + defect_rng.uniform(*reach) * _PIN_RADIUS * np.array([np.cos(angle), np.sin(angle)])
                if _inside(pockets[target], twin, _PIN_RADIUS):
                    break
            if defect == "extra":
                extra = {"centres": [twin], "angle": defect_rng.uniform(0, 2 * np.pi), "tone": pins[target]["tone"], "radius": float(_PIN_RADIUS)}
            else:
                pins[target]["centres"] = [first, twin]
        else:
            raise ValueError(defect)
    for pin in [p for p in pins if p is not None] + ([extra] if extra else []):
        _draw_pin(canvas, pin["centres"], pin["radius"], pin["angle"], pin["tone"])
    return place(canvas, pose) * light


# ----------------------------------------------------------------------------------------------------- vial
_BODY = (99, 72, 189, 252)  # x0, y0, x1, y1 of the glass body before the pose
_FILL_Y = 140
_LABEL = (168, 206)  # top and bottom of the label band


def _vial_scene(scene: np.random.Generator, defect_rng: np.random.Generator, defect: str) -> np.ndarray:
    # One scene drawn back to front, long by nature: every draw's order fixes the seeded renders (and the
    # results measured on them), so the parts stay where their random draws happen.
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    canvas = (np.array([70, 52, 40], np.float32) + 25 * (yy / S)[..., None]) + 6 * noise_field(scene, S, 4)[..., None]
    bx0, by0, bx1, by1 = _BODY
    fill_y = _FILL_Y + scene.uniform(-3, 3)
    label_top, label_bottom = _LABEL
    label_shift, label_tilt = scene.uniform(-2, 2), scene.uniform(-1, 1)
    liquid_tone = scene.uniform(0.95, 1.05)
    pose = camera_pose(scene, shift=16, degrees=4)
    light = lighting(scene, gain=0.08, gradient=0.12)
    cap_lift, cap_tilt = 0.0, scene.uniform(-1, 1)
    crack = particle = None
    if defect == "low_fill":
        fill_y += defect_rng.uniform(14, 22)
    elif defect == "label_shifted":
        if defect_rng.random() < 0.5:
            label_shift += defect_rng.choice([-1, 1]) * defect_rng.uniform(8, 12)
        else:
            label_tilt += defect_rng.choice([-1, 1]) * defect_rng.uniform(4, 6)
    elif defect == "loose_cap":
        cap_lift, cap_tilt = defect_rng.uniform(4, 7), cap_tilt + defect_rng.choice([-1, 1]) * defect_rng.uniform(5, 9)
    elif defect == "crack":
        start = np.array([defect_rng.uniform(bx0 + 12, bx1 - 12), defect_rng.uniform(by0 + 10, fill_y - 6)])
        crack = polyline(defect_rng, start, defect_rng.uniform(18, 30), 0.7, steps=6)
    elif defect == "contamination":
        # A particle in the liquid, above or below the label (behind it, it would not be seen).
        above = (fill_y + 8, label_top - 8)
        below = (label_bottom + 8, by1 - 20)
        low, high = above if defect_rng.random() < 0.5 else below
        particle = (int(defect_rng.uniform(bx0 + 14, bx1 - 14)), int(defect_rng.uniform(low, high)), defect_rng.uniform(2.5, 4.0))
    elif defect != "good":
        raise ValueError(defect)

    body = np.zeros((S, S), np.uint8)
    cv2.rectangle(body, (bx0, by0), (bx1, by1 - 14), 1, -1)
    cv2.ellipse(body, ((bx0 + bx1) // 2, by1 - 14), ((bx1 - bx0) // 2, 14), 0, 0, 180, 1, -1)
    glass = body.astype(bool)
    canvas[glass] = canvas[glass] * 0.55 + 95  # the background seen through clear glass
    liquid = glass & (yy >= fill_y)
    amber = np.array([40, 118, 188], np.float32) * liquid_tone
    canvas[liquid] = canvas[liquid] * 0.3 + amber * 0.7
    meniscus = glass & (np.abs(yy - fill_y) < 1.5)
    canvas[meniscus] = canvas[meniscus] * 0.6 + 200 * 0.4
    if particle is not None:
        cv2.circle(canvas, particle[:2], int(round(particle[2])), (22, 62, 100), -1, cv2.LINE_AA)  # darker amber
    label = np.zeros((S, S), np.float32)
    centre = ((bx0 + bx1) / 2, (label_top + label_bottom) / 2 + label_shift)
    corners = cv2.boxPoints((centre, (bx1 - bx0 - 4, label_bottom - label_top), label_tilt))
    cv2.fillPoly(label, [np.round(corners).astype(np.int32)], 1.0)
    paper = label > 0
    canvas[paper] = np.array([228, 232, 234], np.float32)
    stripe = np.zeros((S, S), np.uint8)
    stripe_corners = cv2.boxPoints((centre, (bx1 - bx0 - 20, 8), label_tilt))
    cv2.fillPoly(stripe, [np.round(stripe_corners).astype(np.int32)], 1)
    canvas[stripe.astype(bool) & paper] = np.array([150, 60, 30], np.float32)  # a printed band
    if crack is not None:
        line = np.zeros((S, S), np.uint8)
        cv2.polylines(line, [crack], False, 1, 1, cv2.LINE_AA)
        cracked = (line > 0) & glass
        canvas[cracked] = canvas[cracked] * 0.65 + 235 * 0.35
    for wall in (bx0, bx1):  # the glass walls catch the light
        cv2.line(canvas, (wall, by0), (wall, by1 - 14), (205, 210, 214), 2, cv2.LINE_AA)
    neck = (bx0 + 18, by0 - 14, bx1 - 18, by0)
    cv2.rectangle(canvas, neck[:2], neck[2:], (185, 188, 192), -1)
    cap = np.zeros((S, S, 3), np.float32)
    cap_mask = np.zeros((S, S), np.float32)
    cv2.rectangle(cap, (bx0 + 12, by0 - 44), (bx1 - 12, by0 - 12), (120, 60, 40), -1)
    cv2.rectangle(cap_mask, (bx0 + 12, by0 - 44), (bx1 - 12, by0 - 12), 1.0, -1)
    for x in range(bx0 + 18, bx1 - 14, 7):  # the cap's grip ridges
        cv2.line(cap, (x, by0 - 42), (x, by0 - 14), (90, 42, 28), 2)
    turn = cv2.getRotationMatrix2D(((bx0 + bx1) / 2, by0 - 12), cap_tilt, 1.0)
    turn[1, 2] -= cap_lift  # a loose cap sits higher and askew on the neck
    cap = cv2.warpAffine(cap, turn, (S, S), flags=cv2.INTER_LINEAR)
    cap_mask = cv2.warpAffine(cap_mask, turn, (S, S), flags=cv2.INTER_LINEAR)[..., None]
    canvas = canvas * (1 - cap_mask) + cap * cap_mask
    return place(canvas, pose) * light


LINE_CATEGORIES = {
    "leather": (_leather_scene, ("scratch", "dent", "contamination", "foreign_material")),
    "pins": (_pins_scene, ("missing", "extra", "wrong_size", "fused")),
    "vial": (_vial_scene, ("low_fill", "label_shifted", "loose_cap", "crack", "contamination")),
}


def line_category(scene):
    """A renderer ``draw(rng, defect) -> (image, mask)`` for ``synth.CATEGORIES`` from a two-generator scene."""
    return lambda rng, defect: exact_defect_pair(scene, rng, defect)[:2]
