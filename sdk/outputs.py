"""Output paths, checked before any work, and written so that nothing of the user's is harmed.

Every verb checks its outputs first (a training run must not find out after 20 minutes that ``--out`` is a
file), refuses to write into a folder that holds someone else's files, and writes files through a temporary name
and a rename, so an interruption never leaves a truncated file where a good one was. ``sha256_of`` is the digest
a bundle's manifest and a student's teacher record pin their files with.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterable

from amoe_sdk.errors import UsageError

# A temporary folder of ours carries this file: only folders holding it are ever removed as stale.
WRITER_MARKER = ".amoe-writer.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_file(path: Path, flag: str) -> None:
    """``path`` can be written as a file: it is not a folder, and no file stands where a parent folder must go."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; pass the path of a file to write (for example {path / 'out.json'})")
    _check_parents(path, flag)


def check_output_folder(path: Path, flag: str) -> None:
    """``path`` can be used as a folder: it is a folder or does not exist yet."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder; pass a folder (it is created if missing)")
    _check_parents(path, flag)


def check_run_folder(path: Path, flag: str, owned: Iterable[str]) -> None:
    """``path`` is a new or empty folder, or one that already holds a run of ours (one of the ``owned`` files):
    a run writes model.pt, config.yaml and history.json, and must not overwrite a user's own files of those names."""
    path = Path(path)
    check_output_folder(path, flag)
    if not path.is_dir():
        return
    entries = list(path.iterdir())
    if entries and not any((path / name).is_file() for name in owned):
        shown = ", ".join(sorted(e.name for e in entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise UsageError(
            f"{flag} {path} is a folder that holds other files ({shown}) and no run of amoe-sdk; pass a new folder "
            "for the run (it is created), so that nothing of yours is overwritten"
        )


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path}: {parent} is a file, so no folder can be made there; pass another path")
            return


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def mark_as_ours(folder: Path) -> None:
    """Label a temporary folder with this process's host and PID, so a later run can tell whether it is stale."""
    (folder / WRITER_MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def stale_writer(folder: Path) -> bool:
    """True when ``folder`` carries our marker and the process that wrote it is gone (same host, dead PID)."""
    try:
        owner: dict[str, Any] = json.loads((folder / WRITER_MARKER).read_text())
        host, pid = owner["host"], int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return host == socket.gethostname() and pid != os.getpid() and not _alive(pid)


def remove_stale_writers(parent: Path, prefix: str) -> list[Path]:
    """Remove the folders under ``parent`` named ``prefix*`` that a dead process of ours left; -> what was removed."""
    removed = []
    if not parent.is_dir():
        return removed
    for candidate in parent.glob(prefix + "*"):
        if candidate.is_dir() and not candidate.is_symlink() and stale_writer(candidate):
            shutil.rmtree(candidate)
            removed.append(candidate)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
