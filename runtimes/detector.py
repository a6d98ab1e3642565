"""``EdgeDetector``: a bundle in, verdicts out, on numpy + OpenCV + one inference backend (no torch).

    from amoe_sdk import EdgeDetector
    detector = EdgeDetector("bundles/kit-onnx")           # backend and device chosen from the bundle
    result = detector.predict(cv2.imread("part.png"))      # H x W x 3 uint8 BGR, any size
    result.score, result.is_anomaly, result.anomaly_map    # map at the frame's own size
    cv2.imwrite("part-overlay.png", result.overlay())
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from amoe_sdk.errors import ConfigError, InputError
from amoe_sdk.runtimes.backends import create_backend
from amoe_sdk.runtimes.bundle import read_product_bundle
from amoe_sdk.runtimes.preprocess import check_frame, heat_map_overlay, map_to_frame, pad_batch, resize_to_input
from amoe_sdk.typed import in_range

if TYPE_CHECKING:
    from amoe_sdk.runtimes.stream import Stream


@dataclass
class DetectionResult:
    """One frame's verdict. ``anomaly_map`` is float32 at the frame's size, in the bundle's normalised units (0 is
    a typical normal pixel); ``normalized_score`` is 0.5 at the threshold, 0 at a typical normal score and capped
    at 1 (twice the threshold). ``timings_ms`` holds this frame's share of pre, infer and post."""

    score: float
    normalized_score: float
    is_anomaly: bool
    anomaly_map: np.ndarray
    threshold: float
    pixel_threshold: float
    image: np.ndarray = field(repr=False)
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        """bool H x W: the pixels above the pixel threshold."""
        return self.anomaly_map > self.pixel_threshold

    def overlay(self, alpha: float = 0.45) -> np.ndarray:
        """The frame with the heat map blended in and the anomalous region outlined (BGR uint8)."""
        return heat_map_overlay(self.image, self.anomaly_map, self.pixel_threshold, alpha)


def effective_threshold(base: float, sensitivity: float) -> float:
    """``sensitivity`` in [0, 1] scales the calibrated threshold: 0.5 keeps it, 1 halves it, 0 doubles it."""
    if not in_range(sensitivity, 0.0, 1.0):
        raise ConfigError(f"sensitivity must be a number in [0, 1] (0.5 keeps the calibrated threshold), got {sensitivity!r}")
    return base * 2.0 ** (1.0 - 2.0 * sensitivity)


def check_threshold(threshold: float) -> float:
    """An absolute image-score threshold must be a positive finite number: scores are normalised so that 0 is a
    typical normal image, and the normalised score divides by the threshold."""
    if not in_range(threshold, 0.0, None, low_open=True):
        raise ConfigError(f"threshold must be a positive finite number, got {threshold!r}; or pass sensitivity= in [0, 1]")
    return float(threshold)


class EdgeDetector:
    """Run a bundle written by ``amoe convert``.

    backend: ``auto`` (the bundle's target decides: TensorRT for jetson, OpenVINO for intel, ONNX Runtime for
    onnx), ``openvino``, ``onnxruntime`` or ``tensorrt``. device: the backend's device name (OpenVINO CPU / GPU /
    NPU / AUTO, ONNX Runtime CPU / CUDA / TensorRT, TensorRT cuda:N); None takes the device the bundle was
    converted for (``amoe convert --device``), else the backend's default. A device that is not present is an
    error, never a quiet switch to the CPU. threshold: an absolute image-score threshold instead of the calibrated
    one; sensitivity: scale the calibrated one (see ``effective_threshold``). product: for a bundle of a detector
    trained over a range of products (``amoe convert`` of such a run writes one bundle per product), the product
    whose calibration and threshold to run; such a bundle opened without it is an error listing its products.
    Other keyword arguments are the
    chosen backend's options (``amoe_sdk.runtimes.backends.options``: ONNX Runtime ``threads``; OpenVINO ``threads``,
    ``cache_dir``, ``hint``, ``inference_precision``; TensorRT ``cache_dir``, ``dla_core``); one it does not take
    is an error naming the backend and its options.

    Thread safety: one detector may be called from several threads at once (``predict``, ``predict_batch``,
    several ``stream`` s); each backend keeps what one call needs apart from the others (see
    ``amoe_sdk.runtimes.backends.base``).
    """

    def __init__(
        self,
        bundle: str | Path,
        backend: str = "auto",
        device: str | None = None,
        threshold: float | None = None,
        sensitivity: float | None = None,
        product: str | None = None,
        **backend_options,
    ):
        if threshold is not None and sensitivity is not None:
            raise ConfigError("pass threshold or sensitivity, not both")
        if threshold is not None:
            check_threshold(threshold)
        self.bundle = read_product_bundle(bundle, product)
        calibrated = self.bundle.manifest.threshold
        chosen_sensitivity = calibrated.sensitivity if sensitivity is None else sensitivity
        self.threshold = float(threshold) if threshold is not None else effective_threshold(calibrated.image, chosen_sensitivity)
        self.pixel_threshold = calibrated.pixel * self.threshold / calibrated.image
        self.backend = create_backend(self.bundle, backend, device, **backend_options)
        self.input_size = self.bundle.input_size
        self.batch_size = self.bundle.batch_size

    def __repr__(self) -> str:
        return f"EdgeDetector({self.bundle.root}, {self.backend.describe()}, threshold={self.threshold:.4g})"

    def warmup(self, runs: int = 3) -> None:
        """Run a few blank batches so that lazy initialisation is not charged to the first real frame."""
        blank = np.zeros((self.batch_size, self.input_size, self.input_size, 3), np.uint8)
        for _ in range(runs):
            self.backend.infer(blank)

    def predict(self, image: np.ndarray) -> DetectionResult:
        return self.predict_batch([image])[0]

    def predict_batch(self, images: list[np.ndarray]) -> list[DetectionResult]:
        """Any number of frames (sizes may differ); they run in batches of the bundle's batch size."""
        if len(images) == 0:
            raise InputError("predict_batch got no frames")
        results = []
        for start in range(0, len(images), self.batch_size):
            results.extend(self._run_chunk(images[start : start + self.batch_size], start))
        return results

    def _run_chunk(self, frames: list[np.ndarray], offset: int) -> list[DetectionResult]:
        started = time.perf_counter()
        batch = self.prepare(frames, offset)
        prepared = time.perf_counter()
        outputs = self.backend.infer(batch)
        inferred = time.perf_counter()
        results = self.results(frames, outputs)
        done = time.perf_counter()
        share = 1000.0 / len(frames)
        for result in results:
            result.timings_ms = {"pre": (prepared - started) * share, "infer": (inferred - prepared) * share, "post": (done - inferred) * share}
        return results

    def prepare(self, frames: list[np.ndarray], offset: int = 0) -> np.ndarray:
        """Check and resize up to ``batch_size`` frames -> the uint8 [B, S, S, 3] batch the backend takes (the
        graph's batch is fixed: a short chunk is padded, and ``results`` drops the padding's outputs)."""
        return pad_batch([self.prepare_frame(f, offset + i) for i, f in enumerate(frames)], self.batch_size)

    def prepare_frame(self, frame: np.ndarray, index: int = 0) -> np.ndarray:
        """Check one frame (InputError naming ``frame {index}``) and resize it to the input size."""
        return resize_to_input(check_frame(frame, f"frame {index}"), self.input_size)

    def results(self, frames: list[np.ndarray], outputs: dict[str, np.ndarray]) -> list[DetectionResult]:
        """The backend's outputs for ``prepare(frames)`` -> one ``DetectionResult`` per frame, maps at frame size."""
        results = []
        for i, frame in enumerate(frames):
            score = float(outputs["score"][i])
            results.append(
                DetectionResult(
                    score=score,
                    normalized_score=float(np.clip(0.5 * score / self.threshold, 0.0, 1.0)),
                    is_anomaly=score > self.threshold,
                    anomaly_map=map_to_frame(outputs["anomaly_map"][i, 0], frame.shape[0], frame.shape[1]),
                    threshold=self.threshold,
                    pixel_threshold=self.pixel_threshold,
                    image=frame,
                )
            )
        return results

    def stream(self, source, policy: str = "latest", depth: int = 2, **options) -> "Stream":
        """Results for a live or recorded source, captured in a thread and inferred ``depth`` frames at a time.

        source: a camera index, a video file, an RTSP / HTTP / UDP URL, a GStreamer pipeline string
        (``jetson_csi_pipeline()`` builds the CSI one), a folder of images, or a ``FrameSource``. policy:
        ``latest`` drops stale frames when inference falls behind (live lines), ``every`` keeps them all
        (recordings, audits). Other options: see ``Stream``. Iterate it, or use it as a context manager::

            with detector.stream("rtsp://10.0.0.7/stream1") as stream:
                for item in stream:
                    print(item.frame_index, item.result.score, item.latency_ms)
        """
        from amoe_sdk.runtimes.stream import Stream

        return Stream(self, source, policy=policy, depth=depth, **options)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "EdgeDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
