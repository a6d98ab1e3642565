"""Streaming: sources, frame policies, pipelined inference, and a real network stream that stops and restarts."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time

import cv2
import numpy as np
import pytest

from amoe_sdk.calibration.data import load_frames
from amoe_sdk.data.layouts import read_dataset
from amoe_sdk.errors import InputError
from amoe_sdk.runtimes import EdgeDetector
from amoe_sdk.runtimes.sources import CaptureSource, FrameSource, jetson_csi_pipeline, open_source


def _ffmpeg() -> str:
    """The static ffmpeg of the ``imageio-ffmpeg`` wheel (in the ``dev`` extra), else one on the PATH."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        path = shutil.which("ffmpeg")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("ffmpeg is missing: the dev extra's imageio-ffmpeg ships it, and .ci/run falls back to apt-get")
        pytest.skip("ffmpeg is missing: pip install -e '.[dev]' (imageio-ffmpeg ships one) or apt-get install ffmpeg")
    return path


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def planted_clip(sample_root, line_bundle, tmp_path_factory):
    """A lossless clip of normal washer test images with anomalies planted among them: the same images with a
    foreign object in view. -> (path, {frame digest: label}, {frame digest: offline score})."""
    detector = EdgeDetector(line_bundle)
    dataset = read_dataset(sample_root / "washer", require_test=True)
    normal = load_frames([s.image_path for s in dataset.test if s.label == 0], detector.input_size)
    size = detector.input_size
    planted = []
    for i, frame in enumerate(normal):
        frame = frame.copy()
        centre = (size // 3 + 10 * i, size // 3 + 7 * i)
        cv2.circle(frame, centre, size // 6, (30, 30, 30), -1)
        cv2.rectangle(frame, (centre[0] - 8, centre[1] - 8), (centre[0] + 8, centre[1] + 8), (0, 160, 255), -1)
        planted.append(frame)
    frames = [normal[0], normal[1], planted[0], planted[1], normal[2], normal[3], planted[2], planted[3]]
    labels = {_digest(f): int(any(f is p for p in planted)) for f in frames}
    scores = {_digest(f): detector.predict(f).score for f in frames}
    path = tmp_path_factory.mktemp("clip") / "line.mkv"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 10, (size, size))
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path, labels, scores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(clip, url) -> subprocess.Popen:
    """ffmpeg as a one-client HTTP server on loopback, looping the clip in real time (FFV1 in Matroska: lossless,
    so every decoded frame is bit-exact and can be matched to its label)."""
    return subprocess.Popen(
        [_ffmpeg(), "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip), "-c", "copy", "-f", "matroska", "-listen", "1", url],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _open_when_listening(detector: EdgeDetector, url: str):
    """The stream, once ffmpeg listens (no probe connection: a one-client server would take it as its client)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return detector.stream(url, policy="every", depth=2, read_timeout_s=2.0, open_timeout_s=2.0, backoff_s=0.3)
        except InputError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_network_stream_detects_planted_anomalies_and_survives_a_server_restart(planted_clip, line_bundle, caplog):
    clip, labels, offline = planted_clip
    # The tiny model ranks the planted anomalies above the normal frames, but 4 held-out images put its
    # calibrated threshold above both; place it between the classes so that verdicts mean something.
    normal_max = max(s for d, s in offline.items() if not labels[d])
    anomalous_min = min(s for d, s in offline.items() if labels[d])
    assert anomalous_min > normal_max, "the line model does not separate the planted anomalies offline"
    detector = EdgeDetector(line_bundle, threshold=(normal_max + anomalous_min) / 2)
    url = f"http://127.0.0.1:{_free_port()}/line.mkv"
    restarted: list[subprocess.Popen] = []
    seen: list[tuple[int, int]] = []  # (label, verdict)
    killed_at = None
    restart = threading.Timer(1.5, lambda: restarted.append(_serve(clip, url)))  # a pause the stream must ride out
    server = _serve(clip, url)
    stream = None
    try:
        stream = _open_when_listening(detector, url)
        for item in stream:
            digest = _digest(item.result.image)  # lossless: every streamed frame is one of the clip's, bit for bit
            assert item.score == pytest.approx(offline[digest], rel=1e-5, abs=1e-6)
            seen.append((labels[digest], int(item.is_anomaly)))
            if killed_at is None and len(seen) == 15:
                server.kill()
                server.wait()
                killed_at = len(seen)
                restart.start()
            if killed_at is not None and stream.stats.reconnects >= 1 and len(seen) >= killed_at + 25:
                break
            assert len(seen) < 400, "the stream never reconnected"
    finally:
        if stream is not None:
            stream.close()
        restart.cancel()
        if restart.ident is not None:
            restart.join()  # a restart already under way must land in `restarted`, to be stopped below
        for process in [server, *restarted]:
            process.kill()
            process.wait()
    stats = stream.stats
    assert stats.reconnects >= 1 and any("reconnect" in r.message for r in caplog.records)
    labels_seen = np.array([label for label, _ in seen])
    verdicts = np.array([verdict for _, verdict in seen])
    assert labels_seen.sum() >= 8 and (labels_seen == 0).sum() >= 8
    assert (verdicts == labels_seen).all()  # every planted anomaly found, no normal frame flagged
    # Stopped cleanly: no capture or inference thread left behind.
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name.startswith("amoe-")]


def test_latest_policy_drops_stale_frames_and_every_keeps_them(planted_clip, onnx_bundle):
    clip, labels, _ = planted_clip
    detector = EdgeDetector(onnx_bundle)
    with detector.stream(str(clip), policy="every") as stream:
        every = [item.frame_index for item in stream]
    assert every == list(range(len(labels))) and stream.stats.frames_dropped == 0

    source = CaptureSource(str(clip), "file")
    with detector.stream(source, policy="latest", depth=1) as stream:
        latest = []
        for item in stream:
            latest.append(item.frame_index)
            time.sleep(0.05)  # a consumer slower than the file's decoding
    assert latest == sorted(latest) and len(latest) < len(labels)
    assert stream.stats.frames_dropped == len(labels) - len(latest)


def test_bad_frames_are_skipped_and_counted(sample_root, onnx_bundle, tmp_path, caplog):
    images = sorted((sample_root / "washer" / "test" / "good").iterdir())[:3]
    for i, image in enumerate(images):
        shutil.copy(image, tmp_path / f"{i}.png")
    (tmp_path / "1b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with EdgeDetector(onnx_bundle).stream(tmp_path, policy="every") as stream:
        indices = [item.frame_index for item in stream]
    assert indices == [0, 1, 3] and stream.stats.bad_frames == 1  # 1b.png sorts third
    assert any("1b.png" in r.message for r in caplog.records)


def test_max_frames_and_close_stop_every_thread(planted_clip, intel_bundle):
    clip, _, _ = planted_clip
    with EdgeDetector(intel_bundle, hint="THROUGHPUT").stream(str(clip), policy="every", depth=3, max_frames=5) as stream:
        assert len(list(stream)) == 5
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name.startswith("amoe-")]


def test_source_errors_name_the_source_and_the_fix(tmp_path):
    with pytest.raises(InputError, match="not a camera index, a URL"):
        open_source(tmp_path / "missing.mp4")
    with pytest.raises(InputError, match="unsupported stream URL scheme"):
        open_source("ftp://camera/stream")
    with pytest.raises(InputError, match="no images"):
        open_source(tmp_path).open()
    with pytest.raises(InputError, match="cannot open network source"):
        CaptureSource(f"http://127.0.0.1:{_free_port()}/none", "network", open_timeout_s=1).open()
    pipeline = jetson_csi_pipeline(sensor_id=1, width=1280, height=720, fps=60)
    assert pipeline.startswith("nvarguscamerasrc sensor-id=1 !") and "appsink drop=true" in pipeline
    assert open_source(pipeline).kind == "gstreamer" and open_source(0).kind == "camera"


class _ListSource(FrameSource):
    """A finite source of the given frames that raises ``fault`` after them, if one is given."""

    def __init__(self, frames, fault: Exception | None = None):
        self.frames, self.fault, self.position = frames, fault, 0

    def open(self) -> None:
        self.position = 0

    def read(self):
        if self.position == len(self.frames):
            if self.fault is not None:
                raise self.fault
            return None
        self.position += 1
        return self.frames[self.position - 1]


def _washer_frames(sample_root, count):
    return list(load_frames(sorted((sample_root / "washer" / "test" / "good").iterdir())[:count], 128))


def test_an_error_in_capture_reaches_the_caller_after_the_frames_read_before_it(sample_root, onnx_bundle):
    source = _ListSource(_washer_frames(sample_root, 3), RuntimeError("sensor fault on the camera link"))
    indices = []
    with pytest.raises(RuntimeError, match="sensor fault"):
        with EdgeDetector(onnx_bundle).stream(source, policy="every") as stream:
            for item in stream:
                indices.append(item.frame_index)
    assert indices == [0, 1, 2]  # before: the stream ended as if the source had finished


def test_a_batch_bundle_fills_its_batches_from_the_captured_frames(sample_root, tiny_run, tmp_path):
    from amoe_sdk.converters.convert import ConvertOptions, convert

    bundle = convert(tiny_run, tmp_path / "batch4", ConvertOptions(target="onnx", batch_size=4))
    detector = EdgeDetector(bundle)
    frames = (_washer_frames(sample_root, 4) * 3)[:10]
    offline = [r.score for r in detector.predict_batch(frames)]
    batches = []
    infer = detector.backend.infer
    detector.backend.infer = lambda batch: (batches.append(len(batch)), infer(batch))[1]
    with detector.stream(_ListSource(frames), policy="every", depth=1) as stream:
        time.sleep(0.5)  # every frame captured before the first batch is taken
        results = list(stream)
    assert [r.frame_index for r in results] == list(range(10))
    assert [r.score for r in results] == pytest.approx(offline, rel=1e-5)
    assert len(batches) == 3  # 4 + 4 + 2 frames; before, one frame per batch of 4: 10 calls
