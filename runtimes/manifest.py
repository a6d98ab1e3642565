"""``manifest.json`` as one typed schema: what a bundle promises, checked before anything runs.

The converter writes a ``BundleManifest`` and the runtime parses the same dataclass back, so a missing key, a
wrong type or a value out of range is a ``BundleError`` that names the key, never a KeyError on the line. The
manifest also carries ``manifest_sha256``, a digest over its own content (every key but that one): a manifest
edited after conversion, an edited threshold included, is refused at load. The digest catches edits and damage;
it is not a signature, so it does not stop someone who rewrites the whole manifest on purpose (loading never
executes anything from a bundle, whatever it says).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import MISSING, dataclass, fields
from pathlib import PurePosixPath
from typing import Any, Callable

from amoe_sdk.errors import BundleError
from amoe_sdk.typed import from_plain, to_plain

SCHEMA_VERSION = 2
# Schema N -> N + 1, each a pure function of the manifest's data (in the manner of anomalib's metadata
# migration). A schema change adds its step here, so bundles already on the lines keep loading.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
# Older schemas no step can bring forward, and why.
UNREADABLE_SCHEMAS = {
    1: "carries no digest of its own manifest, so its threshold and file list cannot be trusted",
}
TARGETS = ("onnx", "intel", "jetson")
PRECISIONS = ("fp32", "fp16", "int8")
ROUTING_MODES = ("dense", "folded")
INFERENCE_PRECISIONS = ("f32", "f16", "bf16")
# The artifacts each target's bundle must carry.
REQUIRED_ARTIFACTS = {"onnx": ("onnx",), "intel": ("openvino_xml", "openvino_bin"), "jetson": ("tensorrt_onnx",)}
# The device names each target's backend takes, as ``amoe convert --device`` records them.
DEVICE_PATTERNS = {
    "intel": re.compile(r"(CPU|GPU(\.\d+)?|NPU|AUTO(:[A-Z0-9.,]+)?|MULTI:[A-Z0-9.,]+|HETERO:[A-Z0-9.,]+)", re.IGNORECASE),
    "onnx": re.compile(r"(CPU|CUDA|TENSORRT)", re.IGNORECASE),
    "jetson": re.compile(r"(cuda:)?\d+", re.IGNORECASE),
}
DEVICE_EXAMPLES = {"intel": "CPU, GPU, GPU.1, NPU or AUTO", "onnx": "CPU, CUDA or TensorRT", "jetson": "cuda:0"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class SourceInfo:
    """The checkpoint the bundle was converted from: absolute path, training step and SHA-256, and for a detector
    trained over a range of products, the ``product`` whose calibration the bundle carries."""

    checkpoint: str
    step: int
    data_root: str | None = None
    sha256: str | None = None
    product: str | None = None


@dataclass
class InputSpec:
    """The graph's one input: a fixed-size uint8 BGR batch [batch, size, size, 3] (NHWC)."""

    name: str
    size: int
    batch: int
    layout: str = "NHWC"
    dtype: str = "uint8"
    colour: str = "BGR"
    resize: str = "cv2.resize INTER_LINEAR to size x size"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.size, self.size, 3)


@dataclass
class RoutingInfo:
    """``dense`` (router in the graph) or ``folded`` (static expert set, with the folding report)."""

    mode: str
    top_k: int
    static: bool = False
    folding: dict[str, Any] | None = None


@dataclass
class Normalisation:
    """Per-expert map normalisation (already inside the graph; recorded for inspection)."""

    map_low: list[float]
    map_high: list[float]
    level_weights: list[float]
    top_percent: float
    map_level_weights: list[float] | None = None  # the map's shares; None in bundles written before it had its own


@dataclass
class Threshold:
    """The calibrated image and pixel thresholds, measured on the artifact itself at ``inference_precision``."""

    image: float
    pixel: float
    sensitivity: float = 0.5
    rule: str = ""
    normal_score_mean: float | None = None
    normal_score_std: float | None = None
    normal_score_max: float | None = None
    images: int = 0
    source: str = ""
    measured_with: str = ""
    inference_precision: str = "f32"


@dataclass
class BundleManifest:
    """Everything a bundle says about itself. ``files`` maps every file of the bundle to its SHA-256;
    ``artifacts`` maps the backend's keys (``onnx``, ``openvino_xml`` ...) to files among them."""

    schema_version: int
    sdk_version: str
    created: str
    source: SourceInfo
    target: str
    precision: str
    input: InputSpec
    outputs: dict[str, list[int]]
    experts: list[str]
    routing: RoutingInfo
    normalisation: Normalisation
    model: dict[str, Any]
    onnx_opset: int
    artifacts: dict[str, str]
    files: dict[str, str]
    threshold: Threshold
    calibration: dict[str, Any]
    manifest_sha256: str = ""
    device: str | None = None
    quantization: dict[str, Any] | None = None
    tensorrt_engine: dict[str, Any] | None = None
    convert_seconds: float | None = None

    @classmethod
    def optional_defaults(cls) -> dict[str, Any]:
        """The top-level keys a writer may leave out, with the values ``to_dict`` writes for them."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    @classmethod
    def parse(cls, data: Any, origin: str) -> "BundleManifest":
        """Plain JSON data -> a checked manifest; BundleError naming ``origin`` and the key otherwise."""
        manifest = from_plain(cls, data, origin, BundleError)
        manifest.check(origin)
        return manifest

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def check(self, origin: str) -> None:
        """The values, beyond their types: choices, ranges, shapes that agree, file names inside the bundle."""

        def fail(key: str, problem: str) -> None:
            raise BundleError(f"{origin}: {key} {problem}; the bundle is damaged or was edited, convert again")

        if self.target not in TARGETS:
            fail("target", f"is {self.target!r}, not one of {', '.join(TARGETS)}")
        if self.precision not in PRECISIONS:
            fail("precision", f"is {self.precision!r}, not one of {', '.join(PRECISIONS)}")
        spec = self.input
        if spec.size < 32:
            fail("input.size", f"is {spec.size}; it must be at least 32")
        if spec.batch < 1:
            fail("input.batch", f"is {spec.batch}; it must be at least 1")
        for key, value, expected in (("input.layout", spec.layout, "NHWC"), ("input.dtype", spec.dtype, "uint8"), ("input.colour", spec.colour, "BGR")):
            if value != expected:
                fail(key, f"is {value!r}; this SDK feeds {expected}")
        for key, expected in (("anomaly_map", [spec.batch, 1, spec.size, spec.size]), ("score", [spec.batch])):
            if self.outputs.get(key) != expected:
                fail(f"outputs.{key}", f"is {self.outputs.get(key)}, which does not match input.batch and input.size ({expected})")
        if self.routing.mode not in ROUTING_MODES:
            fail("routing.mode", f"is {self.routing.mode!r}, not one of {', '.join(ROUTING_MODES)}")
        norm = self.normalisation
        if not (len(norm.map_low) == len(norm.map_high) == len(self.experts)):
            fail("normalisation", f"has {len(norm.map_low)} / {len(norm.map_high)} values for {len(self.experts)} experts")
        threshold = self.threshold
        for key, value in (("threshold.image", threshold.image), ("threshold.pixel", threshold.pixel)):
            if not math.isfinite(value) or value <= 0:
                fail(key, f"is {value!r}; a threshold must be a positive finite number")
        if not 0.0 <= threshold.sensitivity <= 1.0:
            fail("threshold.sensitivity", f"is {threshold.sensitivity!r}; it must lie in [0, 1]")
        if threshold.inference_precision not in INFERENCE_PRECISIONS:
            fail("threshold.inference_precision", f"is {threshold.inference_precision!r}, not one of {', '.join(INFERENCE_PRECISIONS)}")
        if self.device is not None and not DEVICE_PATTERNS[self.target].fullmatch(self.device):
            fail("device", f"is {self.device!r}, not a device for target {self.target} ({DEVICE_EXAMPLES[self.target]})")
        if not self.files:
            fail("files", "is empty; every file of a bundle must be listed with its SHA-256")
        for name, digest in self.files.items():
            if not is_member_name(name):
                fail(f"files[{name!r}]", "is not a plain relative path inside the bundle")
            if not _SHA256.fullmatch(digest):
                fail(f"files[{name!r}]", f"has {digest!r}, not a SHA-256 hex digest")
        for key in REQUIRED_ARTIFACTS[self.target]:
            if key not in self.artifacts:
                fail("artifacts", f"lacks '{key}', which a {self.target} bundle carries")
        for key, name in self.artifacts.items():
            if not is_member_name(name):
                fail(f"artifacts.{key}", f"is {name!r}, not a plain relative path inside the bundle")
            if name not in self.files:
                fail(f"artifacts.{key}", f"names {name!r}, which files does not list with a SHA-256")


def is_member_name(name: str) -> bool:
    """A plain relative POSIX path with no ``..``, no absolute part and no backslash: it stays inside the bundle."""
    if not isinstance(name, str) or not name or "\\" in name or name.startswith("/") or ":" in name:
        return False
    parts = PurePosixPath(name).parts
    return bool(parts) and all(part not in ("", ".", "..") for part in parts)


def upgrade_to_latest(data: dict[str, Any], origin: str) -> dict[str, Any]:
    """A manifest of any readable schema -> the same manifest in schema ``SCHEMA_VERSION`` (a new dict; ``data`` is
    left as it is). Its digest is checked before, on the schema it was written in. BundleError for a schema that
    is newer than this SDK or that cannot be brought forward."""
    schema = data.get("schema_version")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise BundleError(f"{origin}: schema_version is missing or not an integer; it is not an amoe-sdk bundle")
    written_by = f"amoe-sdk {data.get('sdk_version', '?')}"
    if schema > SCHEMA_VERSION:
        raise BundleError(f"{origin} has schema {schema}, newer than this SDK reads ({SCHEMA_VERSION}; it was written by {written_by}); upgrade amoe-sdk on this machine")
    upgraded = copy.deepcopy(data)
    while upgraded["schema_version"] < SCHEMA_VERSION:
        version = upgraded["schema_version"]
        if version not in MIGRATIONS:
            reason = UNREADABLE_SCHEMAS.get(version, "has no upgrade path")
            raise BundleError(f"{origin} has schema {version} ({written_by}), which {reason}; convert it again with this amoe-sdk")
        upgraded = {**MIGRATIONS[version](upgraded), "schema_version": version + 1}
    return upgraded


def manifest_digest(data: dict[str, Any]) -> str:
    """SHA-256 over the manifest's canonical JSON (sorted keys, no spaces), ``manifest_sha256`` left out."""
    content = {k: v for k, v in data.items() if k != "manifest_sha256"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
