"""``amoe bench``: bundles side by side, in the manner of ``yolo benchmark``: size, pre / infer / post latency,
frames per second at batch 1 and pipelined, and image AUROC on labelled images, with a floor that fails the run.

Torch-free, like the rest of the runtime: it runs wherever the bundles will run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from amoe_sdk.runtimes.detector import EdgeDetector


@dataclass
class BenchRow:
    artifact: str
    backend: str
    precision: str
    size_mb: float
    pre_p50_ms: float
    pre_p99_ms: float
    infer_p50_ms: float
    infer_p99_ms: float
    post_p50_ms: float
    post_p99_ms: float
    fps: float
    fps_pipelined: float
    pipeline_depth: int
    image_auroc: float | None


def load_labelled_frames(data: Path) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Frames (BGR, at their own size) and labels from an MVTec category (test split) or a plain image folder
    (no labels, timing only)."""
    from amoe_sdk.data.images import list_images, read_image
    from amoe_sdk.data.layouts import read_dataset

    if (data / "test").is_dir():
        samples = read_dataset(data, require_test=True).test
        return [read_image(s.image_path) for s in samples], np.array([s.label for s in samples])
    return [read_image(p) for p in list_images(data)], None


def bench_bundle(
    bundle: str | Path,
    frames: list[np.ndarray],
    labels: np.ndarray | None,
    runs: int = 100,
    depth: int = 2,
    threads: int | None = None,
    backend: str = "auto",
    device: str | None = None,
) -> BenchRow:
    """Latency from ``runs`` sequential ``predict`` calls after a warm-up; pipelined FPS from ``runs`` frames kept
    ``depth`` deep in flight through the backend's pipeline (pre- and post-processing included, as a stream
    does them); AUROC over all ``frames`` when ``labels`` are given."""
    from amoe_sdk.evaluation.metrics import auroc

    options = {"threads": threads} if threads else {}
    with EdgeDetector(bundle, backend=backend, device=device, **options) as detector:
        detector.warmup()
        scores = np.array([detector.predict(f).score for f in frames]) if labels is not None else None
        timings = {"pre": [], "infer": [], "post": []}
        started = time.perf_counter()
        for i in range(runs):
            for key, value in detector.predict(frames[i % len(frames)]).timings_ms.items():
                timings[key].append(value)
        fps = runs / (time.perf_counter() - started)
        fps_pipelined = _pipelined_fps(detector, frames, runs, depth)
        p = {k: np.percentile(v, [50, 99]) for k, v in timings.items()}
        return BenchRow(
            artifact=str(bundle), backend=detector.backend.name, precision=detector.bundle.manifest.precision,
            size_mb=detector.bundle.size_mb(),
            pre_p50_ms=p["pre"][0], pre_p99_ms=p["pre"][1], infer_p50_ms=p["infer"][0], infer_p99_ms=p["infer"][1],
            post_p50_ms=p["post"][0], post_p99_ms=p["post"][1], fps=fps, fps_pipelined=fps_pipelined, pipeline_depth=depth,
            image_auroc=auroc(labels, scores) if labels is not None and 0 < labels.sum() < len(labels) else None,
        )


def _pipelined_fps(detector: EdgeDetector, frames: list[np.ndarray], runs: int, depth: int) -> float:
    pipeline = detector.backend.pipeline(depth)
    in_flight = []
    try:
        started = time.perf_counter()
        for i in range(runs):
            frame = frames[i % len(frames)]
            in_flight.append((frame, pipeline.submit(detector.prepare([frame]))))
            if len(in_flight) >= depth:
                done, future = in_flight.pop(0)
                detector.results([done], future.result())
        for done, future in in_flight:
            detector.results([done], future.result())
        return runs / (time.perf_counter() - started)
    finally:
        pipeline.close()


def markdown_table(rows: list[BenchRow]) -> str:
    lines = [
        "| artifact | backend | precision | size MB | pre p50/p99 ms | infer p50/p99 ms | post p50/p99 ms | FPS batch 1 | FPS pipelined | image AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        auroc = "-" if r.image_auroc is None else f"{r.image_auroc:.3f}"
        lines.append(
            f"| {r.artifact} | {r.backend} | {r.precision} | {r.size_mb:.1f} | {r.pre_p50_ms:.1f} / {r.pre_p99_ms:.1f} | "
            f"{r.infer_p50_ms:.1f} / {r.infer_p99_ms:.1f} | {r.post_p50_ms:.1f} / {r.post_p99_ms:.1f} | {r.fps:.1f} | "
            f"{r.fps_pipelined:.1f} (depth {r.pipeline_depth}) | {auroc} |"
        )
    return "\n".join(lines)


def json_report(rows: list[BenchRow]) -> str:
    return json.dumps([{k: (float(v) if isinstance(v, np.floating) else v) for k, v in asdict(r).items()} for r in rows], indent=1)
