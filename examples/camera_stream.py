"""Watch a camera or stream with a bundle: heat-map overlay in a window, or an annotated MP4 when there is no
display, and a JSONL log of every anomalous frame. Copy it and adapt.

Usage: python examples/camera_stream.py BUNDLE SOURCE [--out annotated.mp4] [--events events.jsonl]
       [--policy latest|every] [--max-frames N] [--show auto|yes|no] [--threads 2]

SOURCE: a camera index (0), a video file, an RTSP / HTTP / UDP URL, a GStreamer pipeline string, or a folder of
images. Press q in the window, or Ctrl-C, to stop; the statistics print at the end.
"""

import argparse
import json
import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import cv2

from amoe_sdk import EdgeDetector


def has_display() -> bool:
    return sys.platform in ("win32", "darwin") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def annotate(item) -> "cv2.Mat":
    frame = item.result.overlay()
    verdict = "NG" if item.is_anomaly else "OK"
    colour = (0, 0, 255) if item.is_anomaly else (0, 200, 0)
    text = f"#{item.frame_index} {verdict} score {item.score:.2f} ({item.latency_ms:.0f} ms)"
    cv2.putText(frame, text, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.55, colour, 2, cv2.LINE_AA)
    return frame


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("source", help="camera index, video file, stream URL, GStreamer pipeline or image folder")
    parser.add_argument("--out", type=Path, default=Path("annotated.mp4"), help="annotated video when no window is shown")
    parser.add_argument("--events", type=Path, default=Path("events.jsonl"), help="one JSON line per anomalous frame")
    parser.add_argument("--policy", choices=["latest", "every"], default="latest", help="latest drops stale frames (live); every keeps all")
    parser.add_argument("--max-frames", type=int, help="stop after this many frames")
    parser.add_argument("--show", choices=["auto", "yes", "no"], default="auto", help="window (auto: when a display exists)")
    parser.add_argument("--threads", type=int, default=None, help="backend CPU threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    show = args.show == "yes" or (args.show == "auto" and has_display())
    source = int(args.source) if args.source.isdigit() else args.source
    detector = EdgeDetector(args.bundle, **({"threads": args.threads} if args.threads else {}))
    writer = None
    anomalies = 0
    with detector, detector.stream(source, policy=args.policy, max_frames=args.max_frames) as stream, args.events.open("w") as events:
        try:
            for item in stream:
                if item.is_anomaly:
                    anomalies += 1
                    events.write(json.dumps({
                        "frame": item.frame_index,
                        "captured_at": datetime.fromtimestamp(item.captured_at, timezone.utc).isoformat(timespec="milliseconds"),
                        "score": round(item.score, 4), "threshold": round(item.result.threshold, 4),
                        "latency_ms": round(item.latency_ms, 1),
                    }) + "\n")
                    events.flush()
                frame = annotate(item)
                if show:
                    cv2.imshow("amoe", frame)
                    if cv2.waitKey(1) & 0xFF == ord("q"):
                        break
                else:
                    if writer is None:
                        height, width = frame.shape[:2]
                        writer = cv2.VideoWriter(str(args.out), cv2.VideoWriter_fourcc(*"mp4v"), 10, (width, height))
                    if frame.shape[:2] != (height, width):  # a folder of mixed sizes: one video size
                        frame = cv2.resize(frame, (width, height))
                    writer.write(frame)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
        stats = stream.stats
    if writer is not None:
        writer.release()
        print(f"annotated video: {args.out}")
    if show:
        cv2.destroyAllWindows()
    print(f"{stats}; {anomalies} anomalous frame(s) logged to {args.events}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
