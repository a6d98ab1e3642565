"""The line-side examples run headless on the sample data, and ``amoe bench`` gates on its floor."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """An example as a user runs it, headless (no display variables)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode in (0, 12), result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def mixed_folder(sample_root, tmp_path_factory):
    """Washer test images, normal and anomalous, in one folder as a line would save them: -> (folder, labels)."""
    folder = tmp_path_factory.mktemp("parts")
    labels = {}
    for image in sorted((sample_root / "washer" / "test").rglob("*.png")):
        name = f"{image.parent.name}-{image.stem}"
        (folder / f"{name}.png").write_bytes(image.read_bytes())
        labels[name] = image.parent.name != "good"
    return folder, labels


def test_camera_stream_writes_an_annotated_video_and_an_event_log(onnx_bundle, mixed_folder, tmp_path):
    folder, labels = mixed_folder
    out, events = tmp_path / "annotated.mp4", tmp_path / "events.jsonl"
    result = _run(str(EXAMPLES / "camera_stream.py"), str(onnx_bundle), str(folder), "--policy", "every", "--show", "no",
                  "--out", str(out), "--events", str(events))
    video = cv2.VideoCapture(str(out))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == len(labels)
    logged = [json.loads(line) for line in events.read_text().splitlines()]
    assert f"{len(logged)} anomalous frame(s)" in result.stdout
    assert all({"frame", "captured_at", "score", "latency_ms"} <= set(e) for e in logged)


def test_factory_line_writes_one_row_per_part_and_saves_ng_overlays(onnx_bundle, mixed_folder, tmp_path):
    source, labels = mixed_folder
    folder = shutil.copytree(source, tmp_path / "incoming")
    (folder / "zz-half-written.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a file the camera is still writing
    out = tmp_path / "results"
    result = _run(str(EXAMPLES / "factory_line.py"), str(onnx_bundle), "--watch", str(folder), "--once", "--out", str(out))
    assert "zz-half-written.png is not a readable image" in result.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["part_id"] for r in rows) == sorted(labels)
    assert len((out / "results.jsonl").read_text().splitlines()) == len(labels)
    ng = {r["part_id"] for r in rows if r["verdict"] == "NG"}
    assert {p.stem for p in (out / "ng").glob("*.png")} == ng
    assert all(float(r["latency_ms"]) > 0 for r in rows)


def test_jetson_csi_loop_runs_on_any_source_off_the_jetson(onnx_bundle, mixed_folder, tmp_path):
    folder, _ = mixed_folder
    result = _run(str(EXAMPLES / "jetson_csi.py"), str(onnx_bundle), "--source", str(folder), "--backend", "onnxruntime",
                  "--max-frames", "5", "--ng-dir", str(tmp_path / "ng"))
    assert sum(line.startswith("frame ") for line in result.stdout.splitlines()) >= 1
    assert "FPS" in result.stdout


def test_amoe_bench_prints_the_table_and_exits_12_below_the_floor(onnx_bundle, intel_bundle, sample_root, tmp_path):
    report = tmp_path / "bench.json"
    ok = _run("-m", "amoe_sdk.cli.main", "bench", str(onnx_bundle), str(intel_bundle), "--data", str(sample_root / "washer"),
              "--runs", "10", "--threads", "2", "--floor", "0.0", "--json-out", str(report))
    assert ok.returncode == 0 and ok.stdout.count("| ") > 0 and "FPS pipelined" in ok.stdout
    rows = json.loads(report.read_text())
    assert [r["backend"] for r in rows] == ["onnxruntime", "openvino"]
    assert all(r["fps"] > 0 and r["fps_pipelined"] > 0 and 0 <= r["image_auroc"] <= 1 for r in rows)
    below = _run("-m", "amoe_sdk.cli.main", "bench", str(onnx_bundle), "--data", str(sample_root / "washer"), "--runs", "5", "--floor", "1.01")
    assert below.returncode == 12 and "below the floor" in below.stderr


def test_load_test_drives_four_streams_on_one_bundle_with_no_wrong_result(intel_bundle, sample_root):
    result = _run(str(EXAMPLES / "load_test.py"), str(intel_bundle), str(sample_root / "washer" / "test" / "good"),
                  "--streams", "4", "--minutes", "0.1", "--threads", "1")
    assert result.returncode == 0
    assert "errors 0, wrong results 0" in result.stdout and "FPS in all" in result.stdout and "RSS after warm-up" in result.stdout
