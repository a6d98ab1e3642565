"""The interface every backend implements, and the default way to keep several batches in flight."""

from __future__ import annotations

import queue
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

Infer = Callable[[np.ndarray], dict[str, np.ndarray]]


class InferPipeline(ABC):
    """Up to ``depth`` batches in flight: ``submit`` returns at once with a future of the outputs, and blocks
    only while all ``depth`` slots are busy (back-pressure for the caller)."""

    depth: int = 1

    @abstractmethod
    def submit(self, batch: np.ndarray) -> Future: ...

    def close(self) -> None:
        """Wait for the batches in flight and release the slots."""


class ThreadedPipeline(InferPipeline):
    """One worker thread per lane; a lane is an ``infer`` callable that one thread at a time may use (ONNX
    Runtime's session serves several threads at once, a TensorRT lane has its own context and CUDA stream)."""

    def __init__(self, lanes: list[Infer]):
        self.depth = len(lanes)
        self._free: queue.Queue[Infer] = queue.Queue()
        for lane in lanes:
            self._free.put(lane)
        self._slots = queue.Queue(maxsize=self.depth)
        self._pool = ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix="amoe-infer")

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        lane = self._free.get()
        try:
            return lane(batch)
        finally:
            self._free.put(lane)
            self._slots.get_nowait()

    def submit(self, batch: np.ndarray) -> Future:
        self._slots.put(None)  # blocks while depth batches are in flight
        return self._pool.submit(self._run, batch)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Backend(ABC):
    """``infer(batch uint8 [B, S, S, 3])`` -> {output name: array}; ``B`` and ``S`` are the bundle's."""

    name: str = "?"
    device: str = "?"

    @abstractmethod
    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def pipeline(self, depth: int) -> InferPipeline:
        """``depth`` batches in flight. The default runs ``infer`` from ``depth`` threads, which suits a
        runtime whose ``infer`` is thread-safe; the others override this."""
        return ThreadedPipeline([self.infer] * depth)

    def close(self) -> None:
        """Release the runtime's resources; the backend is unusable afterwards."""

    def describe(self) -> str:
        return f"{self.name} on {self.device}"
