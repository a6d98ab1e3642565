"""Anomaly-detection metrics in plain numpy: AUROC, AUPRO (up to a false-positive rate) and F1-max.

Ties are handled the way scikit-learn handles them, which the tests check on the same arrays.
"""

from __future__ import annotations

import cv2
import numpy as np

# NumPy 2 renamed trapz to trapezoid; pyproject allows NumPy 1.24+, which JetPack images ship.
_trapezoid = getattr(np, "trapezoid", None) or np.trapz


def _roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest threshold first."""
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order].astype(np.float64)
    distinct = np.where(np.diff(scores))[0]
    ends = np.r_[distinct, labels.size - 1]
    tps = np.cumsum(labels)[ends]
    fps = (ends + 1) - tps
    tpr = np.r_[0.0, tps / max(tps[-1], 1)]
    fpr = np.r_[0.0, fps / max(fps[-1], 1)]
    return fpr, tpr, scores[ends]


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; labels are 0 (normal) / 1 (anomalous). NaN when only one class is present."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.all() or not labels.any():
        return float("nan")
    fpr, tpr, _ = _roc_curve(labels, scores)
    return float(_trapezoid(tpr, fpr))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1 over all thresholds, the threshold that reaches it); predictions are score >= threshold."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not labels.any():
        return float("nan"), float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, l = scores[order], labels[order]
    ends = np.r_[np.where(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(l)[ends].astype(np.float64)
    predicted = ends + 1.0
    precision = tp / predicted
    recall = tp / l.sum()
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(s[ends[best]])


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3, num_thresholds: int = 1000) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr``, normalised to [0, 1].

    masks: bool [N, H, W]; maps: float [N, H, W]. Each connected defect region counts equally, whatever its
    size. Thresholds are ``num_thresholds`` evenly spaced steps over the score range.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    if not masks.any():
        return float("nan")
    lo, hi = maps.min(), maps.max()
    edges = np.linspace(lo, hi, num_thresholds + 1)
    bins = np.clip(np.searchsorted(edges, maps, side="right") - 1, 0, num_thresholds)
    # Normal pixels: count per bin, then "how many score at or above each edge".
    normal_counts = np.bincount(bins[~masks], minlength=num_thresholds + 1)
    fpr = np.cumsum(normal_counts[::-1])[::-1] / max((~masks).sum(), 1)
    overlaps = []
    for mask, bin_map in zip(masks, bins):
        if not mask.any():
            continue
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        for region in range(1, count):
            region_bins = bin_map[labels == region]
            hist = np.bincount(region_bins, minlength=num_thresholds + 1)
            overlaps.append(np.cumsum(hist[::-1])[::-1] / region_bins.size)
    pro = np.mean(overlaps, axis=0)
    # Both curves fall as the threshold rises; integrate PRO over FPR from 0 to max_fpr.
    fpr, pro = fpr[::-1], pro[::-1]
    fpr = np.r_[0.0, fpr]
    pro = np.r_[0.0, pro]
    keep = fpr <= max_fpr
    x, y = fpr[keep], pro[keep]
    if x[-1] < max_fpr:
        nxt = np.searchsorted(fpr, max_fpr)
        if nxt < fpr.size:
            y_end = np.interp(max_fpr, fpr[nxt - 1 : nxt + 1], pro[nxt - 1 : nxt + 1])
            x, y = np.r_[x, max_fpr], np.r_[y, y_end]
    return float(_trapezoid(y, x) / max_fpr)
