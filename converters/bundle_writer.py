"""Writing a bundle atomically: everything goes to a hidden temporary folder beside the target, the manifest
with every file's SHA-256 last, then one rename. A failed conversion leaves the old bundle (if any) untouched."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from amoe_sdk.runtimes.bundle import MANIFEST_NAME, sha256_of


class BundleWriter:
    """``with BundleWriter(out) as writer: writer.path("model.onnx") ...; writer.commit(manifest)``."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.committed = False

    def __enter__(self) -> "BundleWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self, manifest: dict) -> Path:
        files = sorted(p for p in self.tmp.rglob("*") if p.is_file())
        manifest["files"] = {str(p.relative_to(self.tmp)): sha256_of(p) for p in files}
        (self.tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        # Swap in: the old bundle moves aside first, so a crash between the renames still leaves one whole bundle.
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.exists():
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old.exists():
            shutil.rmtree(old)
        self.committed = True
        return self.out

    def __exit__(self, *exc) -> None:
        if not self.committed and self.tmp.exists():
            shutil.rmtree(self.tmp)
