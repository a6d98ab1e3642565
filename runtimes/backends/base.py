"""The interface every backend implements, the pool that makes them safe to call from several threads, and the
default way to keep several batches in flight.

Thread safety, per backend (``EdgeDetector.predict`` inherits it): ONNX Runtime's ``InferenceSession.run`` is
documented as safe to call concurrently, so every thread shares the one session. An OpenVINO infer request and
a TensorRT execution context (with its device buffers) serve one batch at a time, so those backends keep a
``LanePool``: each call borrows a request or context of its own, made on first need, and returns it when its
outputs are copied out.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Generic, Iterator, TypeVar

import numpy as np

from amoe_sdk.errors import BackendError, BundleError, InputError
from amoe_sdk.runtimes.bundle import Bundle

Infer = Callable[[np.ndarray], dict[str, np.ndarray]]
Lane = TypeVar("Lane")


class LanePool(Generic[Lane]):
    """Lanes (an infer request, an execution context) that one thread at a time may use. ``borrow()`` hands out a
    free lane, makes a new one while fewer than ``limit`` exist, and otherwise waits for one to come back."""

    def __init__(self, make: Callable[[], Lane], limit: int, release: Callable[[Lane], None] | None = None):
        self._make, self._release, self.limit = make, release, limit
        self._free: queue.LifoQueue[Lane] = queue.LifoQueue()
        self._lanes: list[Lane] = []
        self._lock = threading.Lock()

    @contextmanager
    def borrow(self) -> Iterator[Lane]:
        lane = self._take()
        try:
            yield lane
        finally:
            self._free.put(lane)

    def _take(self) -> Lane:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if len(self._lanes) < self.limit:
                lane = self._make()
                self._lanes.append(lane)
                return lane
        return self._free.get()

    def prime(self, lane: Lane) -> None:
        """Add a lane made beforehand (the one a backend made to read its tensors' shapes)."""
        with self._lock:
            self._lanes.append(lane)
            self._free.put(lane)

    def __len__(self) -> int:
        return len(self._lanes)

    def close(self) -> None:
        """Release every lane; call only when no thread uses the pool any more."""
        with self._lock:
            if self._release is not None:
                for lane in self._lanes:
                    self._release(lane)
            self._lanes.clear()


class InferPipeline(ABC):
    """Up to ``depth`` batches in flight: ``submit`` returns at once with a future of the outputs, and blocks
    only while all ``depth`` slots are busy (back-pressure for the caller)."""

    depth: int = 1

    @abstractmethod
    def submit(self, batch: np.ndarray) -> Future: ...

    def close(self) -> None:
        """Wait for the batches in flight and release the slots."""


class ThreadedPipeline(InferPipeline):
    """``depth`` worker threads calling a thread-safe ``infer`` (a backend's, which borrows a lane per call)."""

    def __init__(self, infer: Infer, depth: int):
        self.depth = depth
        self._infer = infer
        self._slots = threading.BoundedSemaphore(depth)
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="amoe-infer")

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return self._infer(batch)
        finally:
            self._slots.release()

    def submit(self, batch: np.ndarray) -> Future:
        self._slots.acquire()  # blocks while depth batches are in flight
        return self._pool.submit(self._run, batch)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Backend(ABC):
    """A runner in the manner of Polygraphy's: made from a bundle, a device name and the backend's options
    dataclass, it loads nothing until ``activate()`` (or ``with backend:``), which loads the artifact on the
    device; ``deactivate()`` releases it and ``activate()`` may load it again. ``infer(batch uint8 [B, S, S, 3])``
    -> {output name: array}, with ``B`` and ``S`` the bundle's: the public ``infer`` checks the batch against the
    artifact's input and the runner's state, then calls the backend's ``infer_impl``. ``close()`` deactivates for
    good and may be called more than once; an inactive or closed backend refuses to run with an error saying so.
    Every backend's ``infer`` may be called from several threads at once (see the module's notes)."""

    name: str = "?"

    def __init__(self, bundle: Bundle, device: str, options):
        self.bundle = bundle
        self.requested_device = device  # what ``activate_impl`` loads on, each time
        self.device = device  # what ``describe`` shows; ``activate_impl`` makes it precise (the GPU's name)
        self.options = options
        self.input_shape = bundle.manifest.input.shape
        self._active = False
        self._closed = False

    @property
    def is_active(self) -> bool:
        return self._active

    @property
    def is_closed(self) -> bool:
        return self._closed

    def activate(self) -> "Backend":
        """Load the artifact on the device; activating an active backend does nothing."""
        self._refuse_if_closed()
        if not self._active:
            self.activate_impl()
            self._active = True
        return self

    def deactivate(self) -> None:
        """Release what ``activate`` loaded; deactivating an inactive backend does nothing."""
        if self._active:
            self._active = False
            self.deactivate_impl()

    def __enter__(self) -> "Backend":
        return self.activate()

    def __exit__(self, *exc_info) -> None:
        self.deactivate()

    @abstractmethod
    def activate_impl(self) -> None:
        """Load the artifact on ``self.requested_device`` with ``self.options``; raise ``BackendError`` saying what is missing."""

    def deactivate_impl(self) -> None:
        """Release what ``activate_impl`` loaded."""

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.check_batch(batch)
        return self.infer_impl(batch)

    @abstractmethod
    def infer_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise BackendError(f"the {self.name} backend of {self.bundle.root} is closed; open a new EdgeDetector to run it again")

    def check_usable(self) -> None:
        self._refuse_if_closed()
        if not self._active:
            raise BackendError(f"the {self.name} backend of {self.bundle.root} is not active; call activate() (or use it in a with block) first")

    def check_batch(self, batch: np.ndarray) -> None:
        self.check_usable()
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.shape != self.input_shape:
            got = f"{batch.dtype} {batch.shape}" if isinstance(batch, np.ndarray) else type(batch).__name__
            raise InputError(
                f"batch is {got}, but bundle {self.bundle.root} takes uint8 {self.input_shape} (NHWC BGR); "
                "EdgeDetector.prepare(frames) makes it from frames of any size"
            )

    def check_artifact_input(self, shape: tuple, dtype: str, artifact: str) -> None:
        """The artifact's own input must be what the manifest says; otherwise the manifest belongs to another one."""
        if tuple(shape) != self.input_shape or dtype != "uint8":
            spec = self.bundle.manifest.input
            raise BundleError(
                f"{self.bundle.manifest_path}: input.size {spec.size} and input.batch {spec.batch} say the artifact "
                f"takes uint8 {self.input_shape}, but {artifact} takes {dtype} {tuple(shape)}; the manifest does not "
                "belong to this artifact: convert again"
            )

    def pipeline(self, depth: int) -> InferPipeline:
        """``depth`` batches in flight, from ``depth`` threads calling ``infer``."""
        self.check_usable()
        return ThreadedPipeline(self.infer, depth)

    def close(self) -> None:
        """Deactivate for good: the backend refuses to run or activate afterwards. Safe to call twice."""
        self.deactivate()
        self._closed = True

    def describe(self) -> str:
        return f"{self.name} on {self.device}"
