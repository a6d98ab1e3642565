"""Soak a stream: run EdgeDetector.stream for a fixed time on a looping source and print the process memory
(RSS) over time, to show that nothing grows over a long run.

Usage: python examples/soak_stream.py BUNDLE IMAGES_DIR [--minutes 10] [--fps 15] [--depth 2] [--threads 2]

The source loops over the images of IMAGES_DIR at --fps (a camera's pace, so the frame count is bounded by
minutes x 60 x fps) with the ``latest`` policy, as on a line. RSS is sampled every 30 s; the verdict compares
the last samples with the first ones after warm-up.
"""

import argparse
import itertools
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from amoe_sdk import EdgeDetector
from amoe_sdk.runtimes.sources import FrameSource


class LoopingImages(FrameSource):
    """A live source that repeats a folder's images at a fixed frame rate, like a camera (``fps`` 0: as fast as
    they are taken). Frame ``i`` is ``frames[i % len(frames)]``."""

    live = True

    def __init__(self, folder: Path, fps: float):
        self.frames = [cv2.imread(str(p)) for p in sorted(folder.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".bmp")]
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.cycle = itertools.cycle(self.frames)
        self.next_at = 0.0

    def open(self) -> None:
        if not self.frames:
            raise SystemExit("no images to loop over")
        self.next_at = time.perf_counter()

    def read(self) -> np.ndarray:
        self.next_at += self.period
        delay = self.next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return next(self.cycle).copy()  # a new buffer per frame, as a camera delivers

    def describe(self) -> str:
        return f"{len(self.frames)} looping images"


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=15.0)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    detector = EdgeDetector(args.bundle, threads=args.threads)
    max_frames = int(args.minutes * 60 * args.fps)
    samples = []  # (elapsed s, frames done, RSS MB)
    started = time.perf_counter()
    next_sample = started
    with detector.stream(LoopingImages(args.images, args.fps), policy="latest", depth=args.depth, max_frames=max_frames) as stream:
        for _ in stream:
            now = time.perf_counter()
            if now >= next_sample:
                samples.append((now - started, stream.stats.frames_done, rss_mb()))
                print(f"{samples[-1][0]:7.0f} s  {samples[-1][1]:6d} frames  RSS {samples[-1][2]:7.1f} MB", flush=True)
                next_sample += 30.0
        samples.append((time.perf_counter() - started, stream.stats.frames_done, rss_mb()))
        print(stream.stats)
    settled = [s[2] for s in samples if s[0] >= 60] or [s[2] for s in samples]
    first, last = np.mean(settled[:3]), np.mean(settled[-3:])
    print(f"\nRSS after warm-up {first:.1f} MB, at the end {last:.1f} MB ({last - first:+.1f} MB over "
          f"{samples[-1][0] / 60:.1f} min, {samples[-1][1]} frames); peak {max(s[2] for s in samples):.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
