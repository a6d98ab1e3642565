"""What the benchmark scripts share: a bundle's accuracy on a labelled test set, latency measured with each
bundle alone in its own process, and the latency of any call in this one."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from amoe_sdk.calibration.data import load_frames
from amoe_sdk.evaluation.evaluate import load_masks
from amoe_sdk.evaluation.metrics import aupro, auroc
from amoe_sdk.runtimes import EdgeDetector
from amoe_sdk.runtimes.bundle import read_bundle


def bundle_accuracy(bundle_dir: Path, samples, threads: int) -> dict:
    """Scores, maps [N, S, S], verdicts at the bundle's threshold, image / pixel AUROC and AUPRO of the backend call
    itself on the test ``samples`` (maps compared at the bundle's input size S), and its size on disk."""
    bundle = read_bundle(bundle_dir)
    labels = np.array([s.label for s in samples])
    frames = load_frames([s.image_path for s in samples], bundle.input_size)
    masks = load_masks(samples, bundle.input_size)
    detector = EdgeDetector(bundle_dir, threads=threads)
    try:
        outputs = [detector.backend.infer(frames[i : i + 1]) for i in range(len(frames))]
    finally:
        detector.close()
    scores = np.array([o["score"][0] for o in outputs], np.float64)
    maps = np.stack([o["anomaly_map"][0, 0] for o in outputs])
    return {
        "scores": scores, "maps": maps, "verdicts": scores > bundle.manifest.threshold.image,
        "image": auroc(labels, scores), "pixel": auroc(masks, maps), "aupro": aupro(masks, maps),
        "mb": bundle.size_mb(), "manifest": bundle.manifest,
    }


def isolated_latency(bundle_dirs: list[Path], images: Path, runs: int, threads: int, rounds: int = 3) -> list[tuple[float, float]]:
    """(p50, p99) ms of the backend call at batch 1 for each bundle: each bundle alone in a fresh process
    (`amoe bench`), in ``rounds`` alternating rounds of ``runs / rounds`` calls, medians of the rounds.

    Several runtimes loaded in one process slow each other down (their idle worker threads keep spinning on a
    small machine), and timing the bundles one after the other would hand the machine's drifting load to
    whichever ran during it."""
    measured = [[] for _ in bundle_dirs]
    for _ in range(rounds):
        for k, bundle_dir in enumerate(bundle_dirs):
            command = [sys.executable, "-m", "amoe_sdk.cli.main", "bench", str(bundle_dir), "--runs", str(max(1, runs // rounds)),
                       "--threads", str(threads), "--format", "json", "--data", str(images)]
            report = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)[0]
            measured[k].append((report["infer_p50_ms"], report["infer_p99_ms"]))
    return [(float(np.median([m[0] for m in ms])), float(np.median([m[1] for m in ms]))) for ms in measured]


def call_latency(call, frames: list[np.ndarray], runs: int) -> tuple[float, float]:
    """(p50, p99) ms of ``call(frame)`` over ``runs`` calls cycling through ``frames``, after a warm-up on five."""
    for frame in frames[:5]:
        call(frame)
    times = []
    for i in range(runs):
        started = time.perf_counter()
        call(frames[i % len(frames)])
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))
