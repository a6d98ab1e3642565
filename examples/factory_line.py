"""Inspect parts on a line: one CSV and one JSONL row per part (id, timestamp, score, verdict, latency), NG images
saved with their overlays, and verdicts published over MQTT when paho-mqtt is installed and a broker is named.
Copy it and adapt.

Two ways parts arrive:
  --watch DIR     the line's camera software saves one image per part into DIR; each new file is a part (its
                  name, without suffix, is the part id). --once handles the files already there and exits.
  --camera SRC    a camera or stream runs continuously; each line on standard input (a part id, written by a
                  PLC bridge or a light barrier script) triggers an inspection of the first frame captured after it.

Usage: python examples/factory_line.py BUNDLE --watch incoming/ --out results/ [--once]
       some_trigger | python examples/factory_line.py BUNDLE --camera rtsp://10.0.0.7/stream1 --out results/
       add --mqtt-host broker.local [--mqtt-topic line3/verdicts] to publish each verdict
"""

import argparse
import csv
import json
import logging
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2

from amoe_sdk import EdgeDetector
from amoe_sdk.data.images import IMAGE_SUFFIXES

FIELDS = ["part_id", "timestamp", "score", "verdict", "threshold", "latency_ms", "source"]


class Reporter:
    """Writes each verdict to results.csv and results.jsonl, the NG overlays to ng/, and to MQTT if asked."""

    def __init__(self, out: Path, mqtt_host: str | None, mqtt_topic: str):
        out.mkdir(parents=True, exist_ok=True)
        (out / "ng").mkdir(exist_ok=True)
        self.out = out
        new_csv = not (out / "results.csv").exists()
        self.csv_file = (out / "results.csv").open("a", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=FIELDS)
        if new_csv:
            self.csv.writeheader()
        self.jsonl = (out / "results.jsonl").open("a")
        self.mqtt, self.topic = None, mqtt_topic
        if mqtt_host:
            try:
                import paho.mqtt.client as mqtt
            except ImportError:
                raise SystemExit("--mqtt-host needs paho-mqtt: pip install paho-mqtt") from None
            self.mqtt = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
            self.mqtt.connect(mqtt_host)
            self.mqtt.loop_start()

    def report(self, part_id: str, result, latency_ms: float, source: str) -> dict:
        row = {
            "part_id": part_id, "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "score": round(result.score, 4), "verdict": "NG" if result.is_anomaly else "OK",
            "threshold": round(result.threshold, 4), "latency_ms": round(latency_ms, 1), "source": source,
        }
        self.csv.writerow(row)
        self.csv_file.flush()
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if result.is_anomaly:
            cv2.imwrite(str(self.out / "ng" / f"{part_id}.png"), result.overlay())
        if self.mqtt is not None:
            self.mqtt.publish(self.topic, json.dumps(row), qos=1)
        print(f"{row['part_id']}: {row['verdict']} (score {row['score']}, {row['latency_ms']} ms)", flush=True)
        return row

    def close(self) -> None:
        self.csv_file.close()
        self.jsonl.close()
        if self.mqtt is not None:
            self.mqtt.loop_stop()
            self.mqtt.disconnect()


def watch_folder(detector: EdgeDetector, folder: Path, reporter: Reporter, once: bool, poll_s: float) -> None:
    done: set[Path] = set()
    while True:
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p not in done):
            done.add(path)
            started = time.perf_counter()
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:  # still being written, or corrupt: say so and move on
                logging.warning("%s is not a readable image; skipped", path)
                continue
            result = detector.predict(image)
            reporter.report(path.stem, result, (time.perf_counter() - started) * 1000, str(path))
        if once:
            return
        time.sleep(poll_s)


def triggered_camera(detector: EdgeDetector, source, reporter: Reporter) -> None:
    latest = {"item": None}
    arrived = threading.Condition()
    stream = detector.stream(source, policy="latest")

    def follow():
        for item in stream:
            with arrived:
                latest["item"] = item
                arrived.notify_all()

    follower = threading.Thread(target=follow, name="amoe-line-follower", daemon=True)
    follower.start()
    try:
        for line in sys.stdin:
            part_id = line.strip()
            if not part_id:
                continue
            triggered = time.time()
            with arrived:
                # The first frame captured after the trigger, not a stale one from before the part arrived.
                if not arrived.wait_for(lambda: latest["item"] is not None and latest["item"].captured_at >= triggered, timeout=10):
                    logging.error("no frame from %s within 10 s of trigger %s", source, part_id)
                    continue
                item = latest["item"]
            reporter.report(part_id, item.result, item.latency_ms, f"{source}#{item.frame_index}")
    finally:
        stream.close()
        follower.join(timeout=5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parts = parser.add_mutually_exclusive_group(required=True)
    parts.add_argument("--watch", type=Path, help="folder the line saves part images into")
    parts.add_argument("--camera", help="camera index or stream; parts are triggered by lines on standard input")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results.csv, results.jsonl and ng/ go here")
    parser.add_argument("--once", action="store_true", help="with --watch: handle the files already there and exit")
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between folder scans (default 0.2)")
    parser.add_argument("--mqtt-host", help="MQTT broker to publish verdicts to (needs paho-mqtt)")
    parser.add_argument("--mqtt-topic", default="amoe/verdicts")
    parser.add_argument("--threads", type=int, default=None, help="backend CPU threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    detector = EdgeDetector(args.bundle, **({"threads": args.threads} if args.threads else {}))
    detector.warmup()
    reporter = Reporter(args.out, args.mqtt_host, args.mqtt_topic)
    try:
        if args.watch:
            watch_folder(detector, args.watch, reporter, args.once, args.poll)
        else:
            triggered_camera(detector, int(args.camera) if args.camera.isdigit() else args.camera, reporter)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        reporter.close()
        detector.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
