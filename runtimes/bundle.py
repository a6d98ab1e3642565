"""Bundles: a directory with the artifacts, ``manifest.json`` and the parity report.

Reading a bundle checks what would otherwise fail late or silently on the line, before any artifact is opened:
the schema version; the manifest's own digest (an edit after conversion is refused); every value against the
typed schema (``BundleManifest``); that every file the manifest names lies inside the bundle folder (no absolute
path, no ``..``, no link out of it), is listed in ``files`` and has its recorded SHA-256.
Torch-free: the runtime reads bundles on machines that have only numpy, OpenCV and one backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from amoe_sdk.errors import BundleError
from amoe_sdk.outputs import sha256_of
from amoe_sdk.runtimes.manifest import BundleManifest, manifest_digest, upgrade_to_latest

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "parity_report.json"
# Written into a bundle folder after conversion, by amoe verify and by the TensorRT backend's engine cache.
AFTER_CONVERSION = (REPORT_NAME, "engine_cache")


@dataclass
class Bundle:
    """A checked bundle: its directory and its manifest."""

    root: Path
    manifest: BundleManifest

    @property
    def input_size(self) -> int:
        return self.manifest.input.size

    @property
    def batch_size(self) -> int:
        return self.manifest.input.batch

    @property
    def target(self) -> str:
        return self.manifest.target

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def has_artifact(self, key: str) -> bool:
        return key in self.manifest.artifacts

    def artifact(self, key: str) -> Path:
        name = self.manifest.artifacts.get(key)
        if name is None:
            raise BundleError(
                f"bundle {self.root} has no '{key}' artifact (it was converted for --target {self.target}); "
                f"convert again with the target that backend needs, or pick another backend"
            )
        return member_path(self.root, name, f"artifacts.{key}")

    def size_mb(self) -> float:
        return sum(member_path(self.root, name, "files").stat().st_size for name in self.manifest.files) / 1e6


def member_path(root: Path, name: str, key: str) -> Path:
    """``root / name``, refused unless it resolves inside ``root`` (a symbolic link out of the bundle included)."""
    path = root / name
    inside = root.resolve()
    resolved = path.resolve()
    if resolved != inside and inside not in resolved.parents:
        raise BundleError(
            f"{root / MANIFEST_NAME}: {key} names {name!r}, which lies outside the bundle folder ({resolved}); a bundle "
            "uses only its own files: convert again"
        )
    return path


def read_bundle(root: str | Path) -> Bundle:
    """Read and check ``root/manifest.json`` (schema, digest, values) and every file's presence and SHA-256."""
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist or is not a folder; pass the --out folder of `amoe convert`")
    if not manifest_path.is_file():
        raise BundleError(f"{root} has no {MANIFEST_NAME}: it is not a bundle, or its conversion did not finish; convert again")
    try:
        data = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); the bundle is damaged, convert again") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{manifest_path} holds a JSON {type(data).__name__}, not an object; it is not an amoe-sdk bundle")
    # The schema first (a newer or unreadable one explains itself better than a digest mismatch would); the digest
    # is then checked on the manifest as written.
    latest = upgrade_to_latest(data, f"bundle {root}")
    try:
        expected_digest = manifest_digest(data)
    except ValueError as exc:  # NaN or infinity somewhere: no writer of ours puts them there
        raise BundleError(f"{manifest_path} holds a non-finite number ({exc}); the bundle is damaged, convert again") from exc
    if data.get("manifest_sha256") != expected_digest:
        raise BundleError(
            f"{manifest_path} was changed after conversion (its content no longer matches manifest_sha256). To change "
            "the threshold, pass EdgeDetector(..., threshold=...) or sensitivity= instead of editing the manifest; "
            "otherwise copy the bundle again or convert again"
        )
    manifest = BundleManifest.parse(latest, str(manifest_path))
    for name, expected in manifest.files.items():
        path = member_path(root, name, "files")
        if not path.is_file():
            raise BundleError(f"bundle {root} is missing {name}, which its manifest lists; copy the whole folder or convert again")
        if sha256_of(path) != expected:
            raise BundleError(
                f"{path} does not match the SHA-256 in {MANIFEST_NAME}: the file is truncated or was changed after "
                "conversion; copy the bundle again or convert again"
            )
    return Bundle(root, manifest)


# A range bundle: one bundle per product of a detector trained over a range of them, side by side, and this index.
PRODUCTS_NAME = "products.json"


def read_product_bundle(root: str | Path, product: str | None) -> Bundle:
    """``read_bundle`` of the bundle to open for ``product``: in a range bundle (``products.json``), that
    product's; a plain bundle is its own, and a ``product`` given for it must be the one it was converted for. A
    range bundle without ``product``, or with one it lacks, is a BundleError listing its products: there is no
    default product."""
    root = Path(root)
    index_path = root / PRODUCTS_NAME
    if index_path.is_file():
        try:
            products = json.loads(index_path.read_text())["products"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise BundleError(f"{index_path} is damaged ({type(exc).__name__}); convert the range again") from exc
        if product is None or product not in products:
            given = "no product was named" if product is None else f"it has no product {product!r}"
            raise BundleError(
                f"{root} holds one bundle per product ({', '.join(products)}) and {given}: open it with "
                "EdgeDetector(bundle, product=NAME) (--product NAME on the command line)"
            )
        return read_bundle(member_path(root, products[product], f"products.{product}"))
    bundle = read_bundle(root)
    converted_for = bundle.manifest.source.product
    if product is not None and converted_for != product:
        what = f"for product {converted_for!r}" if converted_for else "from a detector of one product"
        raise BundleError(f"bundle {root} was converted {what}, not {product!r}; open it without product= or pass its own")
    return bundle
