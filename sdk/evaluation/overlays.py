"""Heat-map overlays a person can look at: image | ground truth | anomaly heat map over the image."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def heatmap_overlay(image_bgr: np.ndarray, anomaly_map: np.ndarray, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Blend a JET heat map of ``anomaly_map`` (scaled to [0, vmax]) over a uint8 BGR image of the same size."""
    scaled = np.clip(anomaly_map / max(vmax, 1e-12), 0.0, 1.0)
    colour = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(image_bgr, 1.0 - alpha, colour, alpha, 0.0)


def side_by_side(image_bgr: np.ndarray, mask: np.ndarray | None, anomaly_map: np.ndarray, vmax: float, caption: str) -> np.ndarray:
    """One panel: the image, its ground truth outlined in green, and the heat-map overlay with a caption."""
    truth = image_bgr.copy()
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(truth, contours, -1, (0, 255, 0), 1)
    panel = np.hstack([image_bgr, truth, heatmap_overlay(image_bgr, anomaly_map, vmax)])
    bar = np.full((22, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, caption, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, panel])


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(data.tobytes())
