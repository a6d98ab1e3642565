"""A Jetson CSI camera through GStreamer (nvarguscamerasrc) with a TensorRT bundle: the engine is built on the
Jetson at first load and cached in the bundle, then every frame's verdict is printed and NG frames are saved.

Usage on a Jetson:  python3 examples/jetson_csi.py bundles/kit-jetson --sensor-id 0 --width 1920 --height 1080 --fps 30
Off the Jetson:     python examples/jetson_csi.py BUNDLE --source clip.mp4 --backend onnxruntime   (same loop, any source)

Needs the system OpenCV that JetPack ships (built with GStreamer); the pip wheel has no GStreamer.
"""

import argparse
import logging
import sys
from pathlib import Path

import cv2

from amoe_sdk import EdgeDetector
from amoe_sdk.runtimes.sources import jetson_csi_pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--sensor-id", type=int, default=0)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--flip", type=int, default=0, help="nvvidconv flip-method (2 = rotate 180)")
    parser.add_argument("--source", help="any other source instead of the CSI camera (file, URL, folder)")
    parser.add_argument("--backend", default="auto", help="auto picks TensorRT for a jetson bundle")
    parser.add_argument("--depth", type=int, default=2, help="frames in flight (one CUDA stream each)")
    parser.add_argument("--ng-dir", type=Path, default=Path("ng"), help="NG frames with overlays go here")
    parser.add_argument("--max-frames", type=int)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    source = args.source or jetson_csi_pipeline(args.sensor_id, args.width, args.height, args.fps, args.flip)
    args.ng_dir.mkdir(parents=True, exist_ok=True)
    with EdgeDetector(args.bundle, backend=args.backend) as detector:
        print(detector)
        with detector.stream(source, policy="latest", depth=args.depth, max_frames=args.max_frames) as stream:
            try:
                for item in stream:
                    print(f"frame {item.frame_index}: {'NG' if item.is_anomaly else 'OK'} score {item.score:.3f} ({item.latency_ms:.1f} ms)", flush=True)
                    if item.is_anomaly:
                        cv2.imwrite(str(args.ng_dir / f"frame-{item.frame_index:08d}.png"), item.result.overlay())
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
            print(stream.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
