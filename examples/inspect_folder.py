"""Run a bundle on a folder of images with EdgeDetector: one verdict line per image, overlays of the NG ones.

This is the smallest line-side script: no torch, only numpy, OpenCV and the bundle's backend.
Usage: python examples/inspect_folder.py BUNDLE FOLDER [--out OVERLAY_DIR] [--sensitivity 0.5]
FOLDER may hold images directly or in sub-folders (an MVTec test/ folder works as it is).
"""

import argparse
from pathlib import Path

import cv2
import numpy as np

from amoe_sdk import EdgeDetector

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, help="write overlays of anomalous images here")
    parser.add_argument("--sensitivity", type=float, help="0..1, 0.5 keeps the calibrated threshold")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    detector = EdgeDetector(args.bundle, sensitivity=args.sensitivity, threads=args.threads)
    detector.warmup()
    print(f"{detector}")
    paths = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in SUFFIXES)
    if not paths:
        raise SystemExit(f"no images in {args.folder}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    latencies, flagged = [], 0
    for path in paths:
        image = cv2.imread(str(path))
        if image is None:
            print(f"skip {path}: not readable as an image")
            continue
        result = detector.predict(image)
        latencies.append(sum(result.timings_ms.values()))
        flagged += result.is_anomaly
        verdict = "NG" if result.is_anomaly else "OK"
        print(f"{verdict}  score {result.score:7.4f}  ({result.normalized_score:.2f})  {path.relative_to(args.folder)}")
        if args.out and result.is_anomaly:
            name = "_".join(path.relative_to(args.folder).parts)
            cv2.imwrite(str(args.out / name), result.overlay())
    print(f"{flagged} of {len(latencies)} images NG; latency p50 {np.percentile(latencies, 50):.1f} ms, "
          f"p99 {np.percentile(latencies, 99):.1f} ms (pre + infer + post)")


if __name__ == "__main__":
    main()
