"""What each backend may be told beyond the bundle and the device: one dataclass per backend, checked when made.

``EdgeDetector(bundle, threads=2)`` and ``amoe bench --threads 2`` pass keyword options; ``make_options`` turns
them into the chosen backend's dataclass, and an option that backend does not take is a ``BackendError`` naming
the backend and the options it has (never a ``TypeError`` from deep inside, never silently dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Union

from amoe_sdk.errors import BackendError

# OpenVINO's PERFORMANCE_HINT values.
OPENVINO_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")


def _check_threads(backend: str, threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise BackendError(f"the {backend} backend's threads must be a positive whole number or None, got {threads!r}")


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """threads: intra-op CPU threads (None: ONNX Runtime's choice)."""

    threads: int | None = None

    def __post_init__(self):
        _check_threads("onnxruntime", self.threads)


@dataclass(frozen=True)
class OpenVINOOptions:
    """threads: CPU inference threads (None: OpenVINO's choice; ignored off the CPU, where OpenVINO has no such
    setting). cache_dir: OpenVINO's model cache, so later loads skip compilation. hint: the performance hint.
    inference_precision: None runs at the precision the bundle's threshold was measured at (see the backend)."""

    threads: int | None = None
    cache_dir: str | Path | None = None
    hint: str = "LATENCY"
    inference_precision: str | None = None

    def __post_init__(self):
        _check_threads("openvino", self.threads)
        if self.hint not in OPENVINO_HINTS:
            raise BackendError(f"the openvino backend's hint must be one of {', '.join(OPENVINO_HINTS)}, got {self.hint!r}")


@dataclass(frozen=True)
class TensorRTOptions:
    """cache_dir: where an engine built on this device is kept (default ``<bundle>/engine_cache``). dla_core: the
    Jetson DLA core to build for (None: the GPU)."""

    cache_dir: str | Path | None = None
    dla_core: int | None = None

    def __post_init__(self):
        if self.dla_core is not None and (isinstance(self.dla_core, bool) or not isinstance(self.dla_core, int) or self.dla_core < 0):
            raise BackendError(f"the tensorrt backend's dla_core must be a DLA core index (0, 1, ...) or None, got {self.dla_core!r}")


BackendOptions = Union[OnnxRuntimeOptions, OpenVINOOptions, TensorRTOptions]
BACKEND_OPTIONS: dict[str, type] = {"onnxruntime": OnnxRuntimeOptions, "openvino": OpenVINOOptions, "tensorrt": TensorRTOptions}


def option_names(backend: str) -> list[str]:
    return [f.name for f in fields(BACKEND_OPTIONS[backend])]


def make_options(backend: str, **options) -> BackendOptions:
    """The backend's options from keyword arguments; one it does not take is an error listing those it does."""
    accepted = option_names(backend)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise BackendError(f"the {backend} backend takes no option {', '.join(unknown)}; its options: {', '.join(accepted) or 'none'}")
    return BACKEND_OPTIONS[backend](**options)
