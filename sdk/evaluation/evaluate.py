"""Evaluating a trained detector on labelled test images: image and pixel metrics, per defect type.

Maps are compared with the ground truth at the model's input size (masks resized with nearest neighbour).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from amoe_sdk.data.images import read_image, read_mask, resize_to_input
from amoe_sdk.data.layouts import Dataset
from amoe_sdk.evaluation.metrics import aupro, auroc, f1_max
from amoe_sdk.evaluation.overlays import side_by_side, write_png
from amoe_sdk.models.detector import LEVELS
from amoe_sdk.outputs import atomic_write_text


@dataclass
class Predictions:
    """A detector on the test samples: ``scores`` [N], ``maps`` [N, S, S], the resized ``images``, routing
    ``weights`` [N, E], and each level's own map and score (``level_maps`` [N, L, S, S], ``level_scores`` [N, L]),
    made as the fused map is made (normalised, routed within the level, upsampled, blurred, top-percent)."""

    scores: np.ndarray
    maps: np.ndarray
    images: list[np.ndarray]
    weights: np.ndarray
    level_scores: np.ndarray
    level_maps: np.ndarray


@torch.no_grad()
def predict(model, samples, batch_size: int = 8, show_progress: bool = True) -> Predictions:
    size = model.config.input_size
    scores, maps, images, weights, level_scores, level_maps = [], [], [], [], [], []
    for start in tqdm(range(0, len(samples), batch_size), desc="predict", unit="batch", leave=False, disable=not show_progress):
        chunk = [resize_to_input(read_image(s.image_path), size) for s in samples[start : start + batch_size]]
        batch = torch.from_numpy(np.stack(chunk)).permute(0, 3, 1, 2).float()
        out = model(batch)
        scores.append(out.score.numpy())
        maps.append(out.anomaly_map[:, 0].numpy())
        weights.append(out.routing_weights.numpy())
        images.extend(chunk)
        chunk_level_maps, chunk_level_scores = model.level_outputs(out)
        level_maps.append(chunk_level_maps.numpy())
        level_scores.append(chunk_level_scores.numpy())
    return Predictions(np.concatenate(scores), np.concatenate(maps), images, np.concatenate(weights),
                       np.concatenate(level_scores), np.concatenate(level_maps))


def load_masks(samples, size: int) -> np.ndarray:
    """Ground-truth masks at the model size: bool [N, size, size]; all False for normal images."""
    masks = np.zeros((len(samples), size, size), bool)
    for i, sample in enumerate(samples):
        if not sample.mask_paths:
            continue
        shape = read_image(sample.image_path).shape[:2]
        union = np.zeros(shape, bool)
        for path in sample.mask_paths:
            union |= read_mask(path, shape, sample.image_path)
        masks[i] = cv2.resize(union.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
    return masks


def compute_metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray, has_masks: bool) -> dict[str, float]:
    f1, threshold = f1_max(labels, scores)
    result = {"image_auroc": auroc(labels, scores), "f1_max": f1, "threshold": threshold}
    if has_masks:
        result["pixel_auroc"] = auroc(masks, maps)
        result["aupro"] = aupro(masks, maps)
    else:
        result["pixel_auroc"] = result["aupro"] = float("nan")
    return result


def score_predictions(dataset: Dataset, scores: np.ndarray, maps: np.ndarray) -> dict[str, Any]:
    """Overall and per-defect metrics of any detector's image ``scores`` [N] and ``maps`` [N, S, S] on
    ``dataset.test`` (masks compared at the maps' size S): one implementation for ours and for peers."""
    samples = dataset.test
    labels = np.array([s.label for s in samples])
    masks = load_masks(samples, maps.shape[-1])
    has_masks = all(s.mask_paths for s in samples if s.label == 1) and labels.any()
    overall = compute_metrics(labels, scores, masks, maps, has_masks)
    per_defect = {}
    good = labels == 0
    for defect in dataset.defect_types:
        subset = good | np.array([s.defect_type == defect for s in samples])
        per_defect[defect] = {
            "count": int((subset & ~good).sum()),
            **compute_metrics(labels[subset], scores[subset], masks[subset], maps[subset], has_masks),
        }
    return {**overall, "per_defect": per_defect, "num_images": len(samples), "num_anomalous": int(labels.sum())}


def evaluate(model, dataset: Dataset, save_images: str | Path | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Metrics of ``model`` on ``dataset.test``; the JSON-ready dict the CLI writes."""
    samples = dataset.test
    found = predict(model, samples, show_progress=show_progress)
    scores, maps = found.scores, found.maps
    present = [level for level, count in zip(LEVELS, model.level_matrix.sum(dim=1).tolist()) if count > 0]
    result = {
        **score_predictions(dataset, scores, maps),
        # Each level alone, so that a loss can be traced to the level that should have seen it.
        "per_level": {
            level: _without_f1(score_predictions(dataset, found.level_scores[:, LEVELS.index(level)], found.level_maps[:, LEVELS.index(level)]))
            for level in present
        },
        "expert_selected_share": (found.weights > 0).mean(axis=0).tolist(),
        "scores": [{"image": str(s.image_path), "label": int(s.label), "defect": s.defect_type, "score": float(v)} for s, v in zip(samples, scores)],
    }
    if save_images:
        threshold = result["threshold"]
        vmax = 2.0 * threshold if np.isfinite(threshold) and threshold > 0 else float(maps.max())
        root = Path(save_images)
        masks = load_masks(samples, model.config.input_size)
        for sample, image, mask, amap, score in zip(samples, found.images, masks, maps, scores):
            verdict = "ANOMALY" if score >= threshold else "normal"
            caption = f"{sample.defect_type}/{sample.image_path.name}  score {score:.3f}  ({verdict} at {threshold:.3f})"
            write_png(root / sample.defect_type / f"{sample.image_path.stem}.png", side_by_side(image, mask, amap, vmax, caption))
    return result


def _without_f1(metrics: dict[str, Any]) -> dict[str, Any]:
    """A level's metrics: AUROCs and AUPRO, per defect too (F1 and its threshold mean little for a single level)."""
    drop = ("f1_max", "threshold", "num_images", "num_anomalous")
    kept = {k: v for k, v in metrics.items() if k not in drop and k != "per_defect"}
    kept["per_defect"] = {d: {k: v for k, v in m.items() if k not in drop} for d, m in metrics["per_defect"].items()}
    return kept


def format_table(result: dict[str, Any], title: str = "") -> str:
    """A fixed-width table of the overall and per-defect metrics."""
    header = f"{'subset':<20}{'n':>5}{'img AUROC':>11}{'px AUROC':>10}{'AUPRO':>8}{'F1-max':>8}"
    rows = [title, header, "-" * len(header)] if title else [header, "-" * len(header)]

    def row(name: str, n: int, m: dict) -> str:
        return f"{name:<20}{n:>5}{m['image_auroc']:>11.4f}{m['pixel_auroc']:>10.4f}{m['aupro']:>8.4f}{m['f1_max']:>8.4f}"

    for defect, metrics in result["per_defect"].items():
        rows.append(row(defect, metrics["count"], metrics))
    rows.append("-" * len(header))
    rows.append(row("all", result["num_images"], result))
    rows.append(f"threshold at F1-max: {result['threshold']:.4f}")
    levels = result.get("per_level", {})
    if levels:
        defects = list(result["per_defect"])
        rows.append("")
        rows.append(f"{'image AUROC by level':<20}" + "".join(f"{d[:10]:>11}" for d in defects) + f"{'all':>8}")
        for level, metrics in levels.items():
            rows.append(f"{level:<20}" + "".join(f"{metrics['per_defect'][d]['image_auroc']:>11.4f}" for d in defects) + f"{metrics['image_auroc']:>8.4f}")
    return "\n".join(rows)


MEAN_KEYS = ("image_auroc", "f1_max", "pixel_auroc", "aupro")


def combine_categories(per_category: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Several categories' results (``evaluate``, each with its own product's calibration) -> one result: the
    means of the image and pixel metrics over the categories (each counts once, whatever its image count), the
    image counts summed, and ``per_category`` holding each one whole."""
    return {
        **{key: float(np.mean([r[key] for r in per_category.values()])) for key in MEAN_KEYS},
        "num_images": sum(r["num_images"] for r in per_category.values()),
        "num_anomalous": sum(r["num_anomalous"] for r in per_category.values()),
        "per_category": per_category,
    }


def format_category_table(result: dict[str, Any], title: str = "") -> str:
    """A fixed-width table of a combined result: one row per category, then the means."""
    header = f"{'category':<20}{'n':>5}{'img AUROC':>11}{'px AUROC':>10}{'AUPRO':>8}{'F1-max':>8}"
    rows = [title, header, "-" * len(header)] if title else [header, "-" * len(header)]

    def row(name: str, m: dict) -> str:
        return f"{name:<20}{m['num_images']:>5}{m['image_auroc']:>11.4f}{m['pixel_auroc']:>10.4f}{m['aupro']:>8.4f}{m['f1_max']:>8.4f}"

    rows += [row(name, metrics) for name, metrics in result["per_category"].items()]
    rows += ["-" * len(header), row("mean", result)]
    return "\n".join(rows)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(Path(path), json.dumps(result, indent=2, allow_nan=True))
