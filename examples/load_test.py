"""Load test: several streams on one bundle at once, as a multi-camera line script runs them, for a fixed time.

Usage: python examples/load_test.py BUNDLE IMAGES_DIR [--streams 4] [--minutes 2] [--fps 30] [--depth 1] [--threads 2]

One ``EdgeDetector`` serves ``--streams`` streams, each in its own thread with its own looping source over the
images of IMAGES_DIR, with the ``latest`` policy a line uses (frame i is image i mod N, dropped frames
included). ``--fps`` paces each source like a camera; 0 reads as fast as possible, so the detector runs flat
out and the throughput is its capacity under this many streams. Every result is checked against the score the
same image got single-threaded before the load started: a result that belongs to another image counts as wrong.
Prints throughput (all streams and per stream), dropped frames, latency p50 / p99 from capture to result,
errors, wrong results and the process memory (RSS) after warm-up and at the end. Exits 1 on any error or wrong
result.
"""

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

from amoe_sdk import EdgeDetector
from soak_stream import LoopingImages, rss_mb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--fps", type=float, default=30.0, help="per stream, like a camera (default 30); 0 = as fast as possible")
    parser.add_argument("--depth", type=int, default=1, help="frames in flight per stream")
    parser.add_argument("--threads", type=int, default=2, help="backend CPU threads")
    args = parser.parse_args()

    detector = EdgeDetector(args.bundle, threads=args.threads)
    sources = [LoopingImages(args.images, args.fps) for _ in range(args.streams)]
    frames = sources[0].frames
    if not frames:
        print(f"no images in {args.images}", file=sys.stderr)
        return 2
    reference = [detector.predict(frame).score for frame in frames]
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in sources]
    done = [0] * len(sources)
    wrong = [0] * len(sources)
    errors: list[str] = []
    streams: list = [None] * len(sources)

    def run(k: int) -> None:
        try:
            with detector.stream(sources[k], policy="latest", depth=args.depth) as stream:
                streams[k] = stream
                for item in stream:
                    expected = reference[item.frame_index % len(frames)]
                    if abs(item.score - expected) > 1e-4 * max(1.0, abs(expected)):
                        wrong[k] += 1
                    latencies[k].append(item.latency_ms)
                    done[k] += 1
                    if stop.is_set():
                        break
        except Exception as exc:  # a failing stream is counted, not allowed to end the others
            errors.append(f"stream {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(k,), name=f"stream-{k}") for k in range(len(sources))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    samples = []  # (elapsed s, frames done, RSS MB)
    while time.perf_counter() - started < args.minutes * 60 and any(t.is_alive() for t in threads):
        time.sleep(min(10.0, args.minutes * 6))
        samples.append((time.perf_counter() - started, sum(done), rss_mb()))
        print(f"{samples[-1][0]:6.0f} s  {samples[-1][1]:7d} frames  RSS {samples[-1][2]:7.1f} MB", flush=True)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    elapsed = time.perf_counter() - started
    detector.close()

    all_latencies = np.concatenate([np.array(l) for l in latencies if l]) if any(latencies) else np.array([np.nan])
    p50, p99 = np.percentile(all_latencies, [50, 99])
    settled = [s[2] for s in samples if s[0] >= min(30.0, elapsed / 3)] or [s[2] for s in samples]
    first, last = settled[0], settled[-1]
    print(f"\n{args.bundle}: {detector.backend.describe()}, {args.streams} streams x depth {args.depth}, {args.threads} threads, "
          f"{elapsed / 60:.1f} min")
    dropped = sum(s.stats.frames_dropped for s in streams if s is not None)
    print(f"frames {sum(done)}: {sum(done) / elapsed:.1f} FPS in all, per stream " + ", ".join(f"{n / elapsed:.1f}" for n in done)
          + f"; {dropped} dropped")
    print(f"latency capture to result: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"errors {len(errors)}, wrong results {sum(wrong)}")
    print(f"RSS after warm-up {first:.1f} MB, at the end {last:.1f} MB ({last - first:+.1f} MB)")
    for error in errors[:5]:
        print(error, file=sys.stderr)
    return 1 if errors or sum(wrong) else 0


if __name__ == "__main__":
    sys.exit(main())
