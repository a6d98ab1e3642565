"""``verify``: the artifact against the PyTorch reference it was exported from, on the same images.

Per image: score difference, anomaly-map max abs difference (relative to the reference map's range) and
correlation, and the verdict at the bundle's threshold; image AUROC of both when the data has labels. FP32
artifacts must match to ``map_rtol`` with no label flip; FP16 is reported, not gated.

A folded bundle is also held against the dense model it was folded from (``dense``): on the images where the dense
router picks the folded expert set, the artifact must match the dense maps to the same tolerance with no label
flip; the images where it picks another set are counted and their score differences reported, not gated (they are
what folding gives up, and the folding agreement measured them before the bundle was written).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from amoe_sdk.checkpoint import load_detector
from amoe_sdk.converters.folding import folded_from_report
from amoe_sdk.data.images import list_images, read_image
from amoe_sdk.data.layouts import read_dataset
from amoe_sdk.errors import CheckpointError, ParityError
from amoe_sdk.evaluation.metrics import auroc
from amoe_sdk.models.routing import expert_names
from amoe_sdk.outputs import atomic_write_text, sha256_of
from amoe_sdk.runtimes.backends import create_backend
from amoe_sdk.runtimes.bundle import REPORT_NAME, Bundle, read_bundle
from amoe_sdk.runtimes.preprocess import pad_batch, resize_to_input

FP32_MAP_RTOL = 1e-4


@dataclass
class VerifyImages:
    paths: list[Path]
    labels: np.ndarray | None  # None for a plain folder


def verification_images(data: Path) -> VerifyImages:
    """An MVTec category's test split (with labels) or a plain folder of images (no labels)."""
    data = Path(data)
    if (data / "test").is_dir():
        dataset = read_dataset(data, require_test=True)
        return VerifyImages([s.image_path for s in dataset.test], np.array([s.label for s in dataset.test]))
    return VerifyImages(list_images(data), None)


def verify(bundle_dir: str | Path, data: str | Path, reference: str | Path | None = None, backend: str = "auto",
           device: str | None = None, map_rtol: float = FP32_MAP_RTOL, show_progress: bool = True) -> dict:
    """Compare, write ``parity_report.json`` into the bundle, and raise ParityError when an FP32 artifact is off."""
    bundle = read_bundle(bundle_dir)
    manifest = bundle.manifest
    images = verification_images(Path(data))
    model = load_reference(bundle, reference)
    routing = manifest.routing
    core = folded_from_report(model, routing.folding) if routing.mode == "folded" else model
    runner = create_backend(bundle, backend, device)
    size, batch = bundle.input_size, bundle.batch_size
    threshold = manifest.threshold.image
    ref_scores, art_scores, map_errors, correlations = [], [], [], []
    # Per image, for a folded bundle: did the dense router pick the folded set, the map difference to the dense map,
    # the dense score.
    folded_set = set(routing.folding["selected"]) if routing.mode == "folded" else None
    names = expert_names(model)
    agrees, dense_errors, dense_scores = [], [], []
    try:
        for start in tqdm(range(0, len(images.paths), batch), desc="verify", unit="batch", disable=not show_progress):
            frames = [resize_to_input(read_image(p), size) for p in images.paths[start : start + batch]]
            count = len(frames)
            nhwc = pad_batch(frames, batch)
            with torch.no_grad():
                ref = core(torch.from_numpy(nhwc).permute(0, 3, 1, 2).float())
                dense = model(torch.from_numpy(nhwc).permute(0, 3, 1, 2).float()) if folded_set is not None else None
            out = runner.infer(nhwc)
            for i in range(count):
                if dense is not None:
                    dense_map = dense.anomaly_map[i, 0].numpy()
                    chosen = {names[e] for e in torch.nonzero(dense.routing_weights[i] > 0).flatten().tolist()}
                    agrees.append(chosen == folded_set)
                    dense_span = max(float(dense_map.max() - dense_map.min()), 1e-6)
                    dense_errors.append(float(np.abs(dense_map - out["anomaly_map"][i, 0]).max()) / dense_span)
                    dense_scores.append(float(dense.score[i]))
                ref_map, art_map = ref.anomaly_map[i, 0].numpy(), out["anomaly_map"][i, 0].astype(np.float32)
                span = max(float(ref_map.max() - ref_map.min()), 1e-6)
                map_errors.append(float(np.abs(ref_map - art_map).max()) / span)
                correlations.append(float(np.corrcoef(ref_map.ravel(), art_map.ravel())[0, 1]))
                ref_scores.append(float(ref.score[i]))
                art_scores.append(float(out["score"][i]))
    finally:
        runner.close()
    ref_scores, art_scores = np.array(ref_scores), np.array(art_scores)
    flips = int(((ref_scores > threshold) != (art_scores > threshold)).sum())
    gated = manifest.precision == "fp32"
    report = {
        "bundle": str(bundle.root),
        "backend": runner.describe(),
        "precision": manifest.precision,
        "routing": routing.mode,
        "images": len(images.paths),
        "data": str(data),
        "score_abs_diff_max": float(np.abs(ref_scores - art_scores).max()),
        "score_rel_diff_max": float((np.abs(ref_scores - art_scores) / np.maximum(np.abs(ref_scores), 1e-6)).max()),
        "map_rel_diff_max": max(map_errors),
        "map_correlation_min": min(correlations),
        "label_flips": flips,
        "threshold": threshold,
        "map_rtol": map_rtol if gated else None,
    }
    if images.labels is not None and 0 < images.labels.sum() < len(images.labels):
        report["image_auroc_reference"] = auroc(images.labels, ref_scores)
        report["image_auroc_artifact"] = auroc(images.labels, art_scores)
    report["passed"] = (not gated) or (report["map_rel_diff_max"] <= map_rtol and flips == 0)
    if folded_set is not None:
        report["dense"] = against_dense(np.array(agrees), np.array(dense_errors), np.array(dense_scores), art_scores, threshold)
        if gated and report["dense"]["agreeing_images"]:
            dense = report["dense"]
            report["passed"] = report["passed"] and dense["agreeing_map_rel_diff_max"] <= map_rtol and dense["agreeing_label_flips"] == 0
    atomic_write_text(bundle.root / REPORT_NAME, json.dumps(report, indent=2))
    if not report["passed"]:
        dense = report.get("dense")
        against = (
            f"; against the dense model where its router picks the folded set: map difference "
            f"{dense['agreeing_map_rel_diff_max']:.2e}, {dense['agreeing_label_flips']} label flip(s)" if dense and dense["agreeing_images"] else ""
        )
        raise ParityError(
            f"{bundle.root} differs from its PyTorch reference: map difference {report['map_rel_diff_max']:.2e} of the "
            f"map range (tolerance {map_rtol:.0e}), {flips} label flip(s) at the threshold{against}; see {bundle.root / REPORT_NAME}"
        )
    return report


def against_dense(agrees: np.ndarray, map_errors: np.ndarray, dense_scores: np.ndarray, art_scores: np.ndarray, threshold: float) -> dict:
    """A folded artifact against the dense model, split by whether the dense router picked the folded set: per
    image ``agrees`` [N] bool, the map difference relative to the dense map's range [N], the dense and the
    artifact's scores [N]."""
    flips = (dense_scores > threshold) != (art_scores > threshold)
    differ = np.abs(dense_scores - art_scores)
    return {
        "router_agrees_share": float(agrees.mean()),
        "agreeing_images": int(agrees.sum()),
        "agreeing_map_rel_diff_max": float(map_errors[agrees].max()) if agrees.any() else None,
        "agreeing_label_flips": int(flips[agrees].sum()),
        "disagreeing_images": int((~agrees).sum()),
        "disagreeing_score_abs_diff_mean": float(differ[~agrees].mean()) if (~agrees).any() else None,
        "disagreeing_score_abs_diff_max": float(differ[~agrees].max()) if (~agrees).any() else None,
        "disagreeing_label_flips": int(flips[~agrees].sum()),
    }


def load_reference(bundle: Bundle, reference: str | Path | None):
    """The PyTorch model a bundle was converted from: ``reference`` or the checkpoint the manifest records. One
    that is not that checkpoint is a CheckpointError (a wrong reference), never reported as a parity failure."""
    source = bundle.manifest.source
    if reference is None:
        recorded = Path(source.checkpoint)
        if not recorded.is_file():
            raise CheckpointError(
                f"bundle {bundle.root} was converted from {recorded}, which is not on this machine (or has moved); pass "
                "--reference RUN with the run it was converted from"
            )
        reference = recorded
    model, payload = load_detector(reference, source.product)
    path = Path(payload["path"]).resolve()
    if payload["config"]["model"] != bundle.manifest.model:
        raise CheckpointError(
            f"--reference {path} has another model config than the one bundle {bundle.root} was converted from "
            f"({source.checkpoint}): it is the wrong reference, so parity cannot be measured; pass --reference with that run"
        )
    if source.sha256 is not None and sha256_of(path) != source.sha256:
        raise CheckpointError(
            f"--reference {path} is not the checkpoint bundle {bundle.root} was converted from (step {payload['step']} "
            f"against {source.step}; its SHA-256 differs): it was retrained or replaced since. Convert again from it, "
            "or pass --reference with the original"
        )
    return model
