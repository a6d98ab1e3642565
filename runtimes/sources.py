"""Where stream frames come from: a camera index, a video file, a network URL (RTSP / HTTP / UDP / TCP), a
GStreamer pipeline string, or a folder of images. Each source opens, reads one BGR frame at a time and closes;
the capture thread around it (``runtimes.stream``) does the threading, the frame policy and the reconnects.

    open_source(0)                                      # first camera (V4L2 / DirectShow / AVFoundation)
    open_source("line3.mp4")                            # a video file: ends at its last frame
    open_source("rtsp://10.0.0.7/stream1")              # an IP camera: reconnects with back-off when it drops
    open_source(jetson_csi_pipeline(sensor_id=0))       # a Jetson CSI camera through GStreamer
    open_source("parts/")                               # a folder of images, in name order
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path

import cv2
import numpy as np

from amoe_sdk.data.images import IMAGE_SUFFIXES
from amoe_sdk.errors import InputError

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")


class BadFrame:
    """A frame that could not be decoded: the stream logs and skips it instead of stopping."""

    def __init__(self, reason: str):
        self.reason = reason


class FrameSource(ABC):
    """``live`` sources (cameras, network streams) are reopened when they fail; finite ones end."""

    live: bool = False

    @abstractmethod
    def open(self) -> None:
        """Raise ``InputError`` with the reason when the source cannot be opened."""

    @abstractmethod
    def read(self) -> np.ndarray | BadFrame | None:
        """The next H x W x 3 uint8 BGR frame; ``BadFrame`` for an undecodable one; ``None`` at the end of a
        finite source or when a live one stalls or drops (after the read timeout)."""

    def close(self) -> None:
        """Release the device or connection; ``open`` may be called again."""

    def describe(self) -> str:
        return type(self).__name__


class CaptureSource(FrameSource):
    """Anything ``cv2.VideoCapture`` opens: camera indices, files, URLs and GStreamer pipelines.

    ``open_timeout_s`` / ``read_timeout_s`` bound how long a network stream may stay silent before ``read``
    reports it stalled (OpenCV's FFmpeg backend honours both)."""

    def __init__(self, target: int | str, kind: str, open_timeout_s: float = 5.0, read_timeout_s: float = 5.0):
        self.target, self.kind = target, kind
        self.live = kind in ("camera", "network", "gstreamer")
        self.open_timeout_s, self.read_timeout_s = open_timeout_s, read_timeout_s
        self.capture: cv2.VideoCapture | None = None

    def open(self) -> None:
        if self.kind == "gstreamer":
            if "GStreamer:                   YES" not in cv2.getBuildInformation():
                raise InputError(
                    "this OpenCV build has no GStreamer support, so the pipeline string cannot be opened; on a Jetson "
                    "use the system OpenCV that JetPack ships (python3-opencv), not the pip wheel"
                )
            capture = cv2.VideoCapture(self.target, cv2.CAP_GSTREAMER)
        elif self.kind == "camera":
            capture = cv2.VideoCapture(self.target)
        else:
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.open_timeout_s * 1000), cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.read_timeout_s * 1000)]
            capture = cv2.VideoCapture(str(self.target), cv2.CAP_FFMPEG, params)
        if not capture.isOpened():
            capture.release()
            hint = {
                "camera": "check the index (ls /dev/video*) and that no other program holds the camera",
                "file": "check the path and that OpenCV's FFmpeg can decode the file (ffprobe FILE)",
                "network": "check the URL, that the server is up and that this machine can reach it",
                "gstreamer": "run the pipeline with gst-launch-1.0 to see GStreamer's error",
            }[self.kind]
            raise InputError(f"cannot open {self.kind} source {self.target!r}: {hint}")
        self.capture = capture

    def read(self) -> np.ndarray | BadFrame | None:
        if self.capture is None:
            return None
        ok, frame = self.capture.read()
        if not ok:
            return None
        if frame is None or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            return BadFrame(f"decoded frame has shape {getattr(frame, 'shape', None)}")
        return frame

    def close(self) -> None:
        if self.capture is not None:
            self.capture.release()
            self.capture = None

    def describe(self) -> str:
        return f"{self.kind} {self.target}"


class FolderSource(FrameSource):
    """The images of a folder in name order; an unreadable file is a ``BadFrame`` naming it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.paths: list[Path] = []
        self.position = 0

    def open(self) -> None:
        if not self.folder.is_dir():
            raise InputError(f"image folder {self.folder} does not exist")
        self.paths = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.folder}")
        self.position = 0

    def read(self) -> np.ndarray | BadFrame | None:
        if self.position >= len(self.paths):
            return None
        path = self.paths[self.position]
        self.position += 1
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            return BadFrame(f"{path} is not a readable image (corrupt or truncated); skipped")
        return image

    def describe(self) -> str:
        return f"folder {self.folder}"


def open_source(source: int | str | Path | FrameSource, **options) -> FrameSource:
    """A ``FrameSource`` for a camera index, a video file, a URL, a GStreamer pipeline or an image folder."""
    if isinstance(source, FrameSource):
        return source
    if isinstance(source, (int, np.integer)) or (isinstance(source, str) and source.isdigit()):
        return CaptureSource(int(source), "camera", **options)
    text = str(source)
    if "!" in text:  # GStreamer's element separator never appears in a path or URL we accept
        return CaptureSource(text, "gstreamer", **options)
    scheme = re.match(r"^([a-z][a-z0-9+.-]*)://", text.lower())
    if scheme:
        if scheme.group(1) not in NETWORK_SCHEMES:
            raise InputError(f"unsupported stream URL scheme '{scheme.group(1)}' in {text}; use one of {', '.join(NETWORK_SCHEMES)}")
        return CaptureSource(text, "network", **options)
    path = Path(text)
    if path.is_dir():
        return FolderSource(path)
    if path.is_file():
        return CaptureSource(str(path), "file", **options)
    raise InputError(f"stream source {text!r} is not a camera index, a URL, a GStreamer pipeline, a video file or a folder")


def jetson_csi_pipeline(sensor_id: int = 0, width: int = 1920, height: int = 1080, fps: int = 30, flip: int = 0) -> str:
    """The GStreamer pipeline for a Jetson CSI camera (``nvarguscamerasrc``), converted to BGR for OpenCV.

    ``flip``: nvvidconv's flip-method (0 none, 2 rotate 180, ...). ``appsink drop=true max-buffers=1`` keeps
    only the newest frame in GStreamer too, so a slow consumer never reads stale images."""
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM), width=(int){width}, height=(int){height}, framerate=(fraction){fps}/1 ! "
        f"nvvidconv flip-method={flip} ! video/x-raw, format=(string)BGRx ! "
        "videoconvert ! video/x-raw, format=(string)BGR ! appsink drop=true max-buffers=1"
    )
