"""``Stream``: frames from a source, captured in their own thread and inferred with several batches in flight.

Capture never waits for inference: with the ``latest`` policy the queue holds one batch of the newest frames and
a frame that inference has not picked up when it is full is dropped (and counted), so results stay current on a
live line; with ``every`` the capture thread waits instead, so no frame is lost (a live camera then drops in its
own driver). Each inference batch takes as many waiting frames as the bundle's batch holds, and never waits for
more. Live sources that stall or drop are reopened with exponential back-off, and each attempt is logged; an
exception in capture ends the stream and is raised in the caller's loop after the frames read before it. Every
structure is bounded, so a run of any length holds the same memory.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from amoe_sdk.errors import ConfigError, InputError
from amoe_sdk.runtimes.preprocess import pad_batch
from amoe_sdk.runtimes.sources import BadFrame, FrameSource, open_source

if TYPE_CHECKING:
    from amoe_sdk.runtimes.detector import DetectionResult, EdgeDetector

POLICIES = ("latest", "every")
LOG = logging.getLogger("amoe_sdk.runtimes")
_END = object()


@dataclass
class StreamResult:
    """One frame's verdict with where it sits in the stream: ``frame_index`` counts every frame the source gave
    (dropped and bad ones too); ``captured_at`` is the wall-clock time it was read; ``latency_ms`` runs from that
    read to this result."""

    frame_index: int
    captured_at: float
    latency_ms: float
    result: "DetectionResult"

    @property
    def score(self) -> float:
        return self.result.score

    @property
    def is_anomaly(self) -> bool:
        return self.result.is_anomaly


@dataclass
class StreamStats:
    frames_read: int = 0
    frames_done: int = 0
    frames_dropped: int = 0
    bad_frames: int = 0
    reconnects: int = 0
    elapsed_s: float = 0.0
    fps: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0

    def __str__(self) -> str:
        return (
            f"{self.frames_done} frames in {self.elapsed_s:.1f} s ({self.fps:.1f} FPS), latency p50 {self.latency_p50_ms:.1f} ms "
            f"p99 {self.latency_p99_ms:.1f} ms; {self.frames_dropped} dropped, {self.bad_frames} bad, {self.reconnects} reconnect(s)"
        )


@dataclass
class _Captured:
    index: int
    captured_at: float
    clock: float
    image: np.ndarray


class Stream:
    """See ``EdgeDetector.stream``. Options: ``queue_size`` (frames the ``every`` policy may hold, 64),
    ``max_frames`` (stop after this many frames read), ``reconnect`` (reopen live sources, True),
    ``backoff_s`` / ``max_backoff_s`` (first and longest wait between reconnect attempts, 0.5 s and 10 s),
    ``open_timeout_s`` / ``read_timeout_s`` (how long a network source may stay silent, 5 s each)."""

    def __init__(
        self,
        detector: "EdgeDetector",
        source: int | str | FrameSource,
        policy: str = "latest",
        depth: int = 2,
        queue_size: int = 64,
        max_frames: int | None = None,
        reconnect: bool = True,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        **source_options,
    ):
        if policy not in POLICIES:
            raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if depth < 1:
            raise ConfigError(f"depth must be at least 1, got {depth}")
        self.detector, self.policy, self.depth = detector, policy, depth
        self.source = open_source(source, **source_options) if not isinstance(source, FrameSource) else source
        self.max_frames, self.reconnect = max_frames, reconnect
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        # ``latest`` holds one batch of the newest frames (a batch-B bundle fills its batches from them).
        self._frames: queue.Queue = queue.Queue(maxsize=detector.batch_size if policy == "latest" else queue_size)
        self._capture_error: BaseException | None = None
        self._stop = threading.Event()
        self._latencies: deque[float] = deque(maxlen=10_000)
        self._stats = StreamStats()
        self._started = 0.0
        self._finished: float | None = None
        self._pipeline = None
        self.source.open()  # fail here, in the caller's thread, when the source is wrong from the start
        self._thread = threading.Thread(target=self._capture, name="amoe-capture", daemon=True)
        self._thread.start()
        self._started = time.perf_counter()

    # -- capture thread --------------------------------------------------------------------------------------
    def _capture(self) -> None:
        index = 0
        try:
            while not self._stop.is_set():
                frame = self.source.read()
                if frame is None:
                    if self.source.live and self.reconnect and self._reopen():
                        continue
                    break
                if isinstance(frame, BadFrame):
                    LOG.warning("frame %d from %s skipped: %s", index, self.source.describe(), frame.reason)
                    self._stats.bad_frames += 1
                else:
                    self._hand_over(_Captured(index, time.time(), time.perf_counter(), frame))
                index += 1
                self._stats.frames_read = index
                if self.max_frames is not None and index >= self.max_frames:
                    break
        except Exception as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it after the frames before it
            LOG.error("capture from %s failed: %s", self.source.describe(), exc)
            self._capture_error = exc
        finally:
            self.source.close()
            self._put_blocking(_END)

    def _reopen(self) -> bool:
        """Reopen a stalled or dropped live source with exponential back-off, until it opens or ``close()``."""
        wait = self.backoff_s
        attempt = 0
        self.source.close()
        while not self._stop.is_set():
            attempt += 1
            LOG.warning("%s stalled or dropped; reconnect attempt %d in %.1f s", self.source.describe(), attempt, wait)
            if self._stop.wait(wait):
                return False
            try:
                self.source.open()
            except InputError as exc:
                LOG.warning("reconnect attempt %d failed: %s", attempt, exc)
                wait = min(wait * 2, self.max_backoff_s)
                continue
            self._stats.reconnects += 1
            LOG.warning("%s reconnected after %d attempt(s)", self.source.describe(), attempt)
            return True
        return False

    def _hand_over(self, item: _Captured) -> None:
        if self.policy == "every":
            self._put_blocking(item)
            return
        try:
            self._frames.put_nowait(item)
        except queue.Full:
            try:  # the one waiting frame is stale now: replace it
                self._frames.get_nowait()
                self._stats.frames_dropped += 1
            except queue.Empty:
                pass  # inference took it in the meantime
            self._frames.put_nowait(item)

    def _put_blocking(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._frames.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # -- caller's thread ---------------------------------------------------------------------------------------
    def _next(self, wait: bool):
        """The next captured frame, ``_END``, or None when ``wait`` is False and nothing is ready."""
        while not self._stop.is_set():
            try:
                return self._frames.get(timeout=0.1) if wait else self._frames.get_nowait()
            except queue.Empty:
                if not wait:
                    return None
        return _END

    def _take_batch(self, wait: bool) -> tuple[list[tuple[_Captured, np.ndarray]], bool]:
        """Up to the bundle's batch size of captured frames, each checked and resized, waiting for the first only
        when ``wait`` and taking the rest only if already captured (a batch never waits to fill) -> (frames,
        whether capture has ended). Bad frames are logged, counted and left out."""
        taken: list[tuple[_Captured, np.ndarray]] = []
        while len(taken) < self.detector.batch_size:
            item = self._next(wait=wait and not taken)
            if item is None:
                return taken, False
            if item is _END:
                return taken, True
            try:
                taken.append((item, self.detector.prepare_frame(item.image, item.index)))
            except InputError as exc:
                LOG.warning("frame %d skipped: %s", item.index, exc)
                self._stats.bad_frames += 1
        return taken, False

    def __iter__(self) -> Iterator[StreamResult]:
        pipeline = self._pipeline = self.detector.backend.pipeline(self.depth)
        in_flight: deque = deque()
        ended = False
        try:
            while True:
                while not ended and len(in_flight) < self.depth:
                    taken, ended = self._take_batch(wait=not in_flight)
                    if not taken:
                        break
                    batch = pad_batch([resized for _, resized in taken], self.detector.batch_size)
                    in_flight.append(([item for item, _ in taken], pipeline.submit(batch)))
                if not in_flight:
                    if ended:
                        if self._capture_error is not None:
                            raise self._capture_error
                        return
                    continue
                items, future = in_flight.popleft()
                outputs = future.result()
                for item, result in zip(items, self.detector.results([item.image for item in items], outputs)):
                    latency = (time.perf_counter() - item.clock) * 1000.0
                    self._latencies.append(latency)
                    self._stats.frames_done += 1
                    yield StreamResult(item.index, item.captured_at, latency, result)
        finally:
            self._finished = time.perf_counter()
            self.close()

    @property
    def stats(self) -> StreamStats:
        stats = self._stats
        stats.elapsed_s = (self._finished or time.perf_counter()) - self._started
        stats.fps = stats.frames_done / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
        if self._latencies:
            stats.latency_p50_ms, stats.latency_p99_ms = (float(v) for v in np.percentile(list(self._latencies), [50, 99]))
        return stats

    def close(self) -> None:
        """Stop capture and inference and release the source; safe to call more than once and from any thread
        (a consumer that leaves its loop early need not wait for garbage collection to end the worker threads)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.source_timeout() + 1.0)
        if self._pipeline is not None:
            self._pipeline.close()

    def source_timeout(self) -> float:
        return float(getattr(self.source, "read_timeout_s", 1.0))

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
