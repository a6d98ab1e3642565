"""Writing a bundle atomically, and only where nothing of the user's is harmed.

Everything goes to a hidden temporary folder beside the target, the manifest (checked against the typed schema,
with every file's SHA-256 and its own digest) last, then one rename. A failed, interrupted or terminated
conversion leaves the old bundle (if any) untouched and removes its temporary folder; one left by a process that
was killed outright is removed by the next conversion to the same place. The destination must be new, empty or a
bundle: ``check_bundle_destination`` refuses anything else before any work is done.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from amoe_sdk.errors import UsageError
from amoe_sdk.outputs import WRITER_MARKER, mark_as_ours, remove_stale_writers, sha256_of, stale_writer
from amoe_sdk.process import raise_if_signalled
from amoe_sdk.runtimes.bundle import AFTER_CONVERSION, MANIFEST_NAME
from amoe_sdk.runtimes.manifest import BundleManifest, manifest_digest


def check_bundle_destination(out: Path) -> None:
    """``out`` may be written: it does not exist, is an empty folder, or is a bundle holding only its own files.
    Anything else (a file, a link, a run folder, a folder of the user's) is a UsageError that changes nothing."""
    out = Path(out)
    if out.is_symlink():
        raise UsageError(f"--out {out} is a symbolic link; pass the folder itself, so that the bundle is written where you expect")
    if not out.exists():
        for parent in out.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise UsageError(f"--out {out}: {parent} is a file, so no bundle folder can be made there")
                break
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a bundle folder; pass a new folder (nothing was changed)")
    entries = {entry.name for entry in out.iterdir()}
    if not entries:
        return
    listed = _bundle_files(out)
    if listed is None:
        raise UsageError(
            f"--out {out} is a folder that is not an amoe-sdk bundle (it has no {MANIFEST_NAME} of ours): amoe convert "
            "replaces only bundles. Pass a new folder (nothing was changed)"
        )
    foreign = sorted(name for name in entries - {MANIFEST_NAME, *AFTER_CONVERSION} if not name.startswith(".") and not any(
        listed_name == name or listed_name.startswith(name + "/") for listed_name in listed
    ))
    if foreign:
        raise UsageError(
            f"--out {out} is a bundle that also holds files of yours ({', '.join(foreign[:5])}); replacing it would "
            "delete them. Move them out of the folder, or pass another --out (nothing was changed)"
        )


def _bundle_files(folder: Path) -> list[str] | None:
    """The files a folder's manifest lists, or None when the folder is not a bundle of ours."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("schema_version"), int) or not isinstance(data.get("files"), dict):
        return None
    return [str(name) for name in data["files"]]


class BundleWriter:
    """``with BundleWriter(out) as writer: writer.path("model.onnx") ...; writer.commit(manifest)``."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.committed = False

    def __enter__(self) -> "BundleWriter":
        check_bundle_destination(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._recover_stale()
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        mark_as_ours(self.tmp)
        return self

    def _recover_stale(self) -> None:
        """Remove what a killed conversion to the same place left: its partial folder, and the previous bundle it
        had moved aside (put back when the new one never arrived)."""
        for old in self.out.parent.glob(f".{self.out.name}.old-*"):
            if not stale_writer(old):
                continue
            if self.out.exists():
                shutil.rmtree(old)
            else:
                (old / WRITER_MARKER).unlink()
                old.rename(self.out)
        remove_stale_writers(self.out.parent, f".{self.out.name}.partial-")

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self, manifest: dict) -> Path:
        """Hash every file, check the manifest against the schema, write it with its digest, swap the folder in."""
        raise_if_signalled()  # an interrupt a library swallowed must not end as a new bundle
        (self.tmp / WRITER_MARKER).unlink()
        files = sorted(p for p in self.tmp.rglob("*") if p.is_file())
        manifest["files"] = {p.relative_to(self.tmp).as_posix(): sha256_of(p) for p in files}
        manifest["manifest_sha256"] = ""
        checked = BundleManifest.parse(manifest, f"the manifest for {self.out}").to_dict()  # a converter bug stops here
        checked["manifest_sha256"] = manifest_digest(checked)
        (self.tmp / MANIFEST_NAME).write_text(json.dumps(checked, indent=2, allow_nan=False))
        check_bundle_destination(self.out)  # again: the folder may have changed during the conversion
        # Swap in: the old bundle moves aside first, so a crash between the renames still leaves one whole bundle
        # (the next conversion puts it back).
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()
        if self.out.exists():
            self.out.rename(old)
            mark_as_ours(old)
        self.tmp.rename(self.out)
        if old.exists():
            shutil.rmtree(old)
        self.committed = True
        return self.out

    def __exit__(self, *exc) -> None:
        if not self.committed and self.tmp.exists():
            shutil.rmtree(self.tmp)
