"""Bundles: a directory with the artifacts, ``manifest.json`` and the parity report.

Reading a bundle checks what would otherwise fail late or silently on the line: the schema version, that every
file the manifest lists is there and has its recorded SHA-256, and that the artifact the backend needs exists.
Torch-free: the runtime reads bundles on machines that have only numpy, OpenCV and one backend.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amoe_sdk.errors import BundleError

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "parity_report.json"
SCHEMA_VERSION = 1

# Which manifest artifact key each backend runs; an engine may be absent (built on the device at first load).
ARTIFACT_KEYS = {
    "onnxruntime": ("onnx",),
    "openvino": ("openvino_xml", "openvino_bin"),
    "tensorrt": ("tensorrt_onnx",),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    """A checked bundle: its directory and its manifest."""

    root: Path
    manifest: dict[str, Any]

    @property
    def input_size(self) -> int:
        return int(self.manifest["input"]["size"])

    @property
    def batch_size(self) -> int:
        return int(self.manifest["input"]["batch"])

    @property
    def target(self) -> str:
        return self.manifest["target"]

    def artifact(self, key: str) -> Path:
        name = self.manifest["artifacts"].get(key)
        if name is None:
            raise BundleError(
                f"bundle {self.root} has no '{key}' artifact (it was converted for --target {self.target}); "
                f"convert again with the target that backend needs, or pick another backend"
            )
        return self.root / name


def read_bundle(root: str | Path, verify_checksums: bool = True) -> Bundle:
    """Read and check ``root/manifest.json`` and, unless told otherwise, every file's SHA-256."""
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist or is not a folder; pass the --out folder of `amoe convert`")
    if not manifest_path.is_file():
        raise BundleError(f"{root} has no {MANIFEST_NAME}: it is not a bundle, or its conversion did not finish; convert again")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); the bundle is damaged, convert again") from exc
    schema = manifest.get("schema_version")
    if not isinstance(schema, int):
        raise BundleError(f"{manifest_path} has no schema_version; it is not an amoe-sdk bundle")
    if schema > SCHEMA_VERSION:
        raise BundleError(
            f"bundle {root} has schema {schema}, newer than this SDK reads ({SCHEMA_VERSION}; it was written by "
            f"amoe-sdk {manifest.get('sdk_version', '?')}); upgrade amoe-sdk on this machine"
        )
    for key in ("target", "input", "artifacts", "files", "threshold", "outputs"):
        if key not in manifest:
            raise BundleError(f"{manifest_path} lacks '{key}'; the bundle is damaged, convert again")
    for name, expected in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"bundle {root} is missing {name}, which its manifest lists; copy the whole folder or convert again")
        if verify_checksums and sha256_of(path) != expected:
            raise BundleError(
                f"{path} does not match the SHA-256 in {MANIFEST_NAME}: the file is truncated or was changed after "
                "conversion; copy the bundle again or convert again"
            )
    return Bundle(root, manifest)
