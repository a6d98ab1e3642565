"""Streaming overhead: frames per second of EdgeDetector.stream against the backend's raw pipelined throughput.

Usage: python examples/benchmark_stream.py BUNDLE [BUNDLE ...] --images DIR [--frames 300] [--depth 2] [--threads 2]

Raw: the backend's own pipeline (OpenVINO AsyncInferQueue / ONNX Runtime worker threads / TensorRT streams)
fed back to back with batches that are already at the input size: the most the backend can do. Stream: the same
frames through ``EdgeDetector.stream`` with the ``every`` policy, so capture thread, hand-over, checks, result
objects and maps at frame size are all included. Both keep ``depth`` frames in flight.
"""

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from amoe_sdk import EdgeDetector
from amoe_sdk.runtimes.sources import FrameSource


class FramesInMemory(FrameSource):
    """A finite source of frames already decoded, so that disk and decoding do not enter the comparison."""

    def __init__(self, frames: list[np.ndarray], count: int):
        self.frames, self.count, self.position = frames, count, 0

    def open(self) -> None:
        self.position = 0

    def read(self):
        if self.position >= self.count:
            return None
        self.position += 1
        return self.frames[self.position % len(self.frames)]


def raw_fps(detector: EdgeDetector, frames: list[np.ndarray], count: int, depth: int) -> float:
    batches = [detector.prepare([f]) for f in frames]
    pipeline = detector.backend.pipeline(depth)
    try:
        for batch in batches[:depth]:  # warm-up
            pipeline.submit(batch).result()
        futures = []
        started = time.perf_counter()
        for i in range(count):
            futures.append(pipeline.submit(batches[i % len(batches)]))
            if len(futures) > depth:
                futures.pop(0).result()
        for future in futures:
            future.result()
        return count / (time.perf_counter() - started)
    finally:
        pipeline.close()


def stream_fps(detector: EdgeDetector, frames: list[np.ndarray], count: int, depth: int) -> float:
    with detector.stream(FramesInMemory(frames, count), policy="every", depth=depth) as stream:
        done = sum(1 for _ in stream)
    assert done == count, f"stream delivered {done} of {count} frames"
    return stream.stats.fps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternate raw and stream runs this many times; medians reported")
    args = parser.parse_args()

    print(f"| bundle | backend | raw pipelined FPS | stream FPS | stream / raw |  ({args.frames} frames, depth {args.depth}, {args.threads} threads)")
    print("|---|---|---|---|---|")
    for bundle in args.bundles:
        options = {"threads": args.threads}
        detector = EdgeDetector(bundle, **options, **({"hint": "THROUGHPUT"} if (bundle / "model.xml").exists() else {}))
        frames = [cv2.imread(str(p)) for p in sorted(args.images.iterdir())[:16]]
        frames = [cv2.resize(f, (detector.input_size,) * 2) for f in frames if f is not None]
        detector.warmup()
        raws, streams = [], []
        for _ in range(args.repeats):  # alternated, so that drift in the machine's load hits both alike
            raws.append(raw_fps(detector, frames, args.frames, args.depth))
            streams.append(stream_fps(detector, frames, args.frames, args.depth))
        raw, streamed = float(np.median(raws)), float(np.median(streams))
        print(f"| {bundle} | {detector.backend.describe()} | {raw:.1f} | {streamed:.1f} | {streamed / raw:.0%} |", flush=True)
        detector.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
