"""How a command ends: one message and a distinct exit code for SDK errors, 130 for Ctrl-C, 143 for SIGTERM.

Both console scripts (``amoe`` and ``amoe-convert``) run their verbs through ``run_command``, which also shows
the SDK's log records (one ``logging`` logger per package, under ``amoe_sdk``) on stderr. SIGTERM (what
``kill``, systemd and Docker send) is turned into an exception in the main thread, so the same clean-up that
Ctrl-C gets runs: ``with`` blocks close, half-written bundles and checkpoints are removed.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Callable

from amoe_sdk.errors import AmoeError

INTERRUPTED_EXIT = 130
TERMINATED_EXIT = 143


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException like KeyboardInterrupt, so that ``except Exception`` does not swallow it."""


# The signal that arrived during run_command, kept beyond its exception: in the test suite a SIGINT sent during
# amoe-convert ended with exit 0 and no message, so something in the conversion swallowed its KeyboardInterrupt
# (a library catching BaseException, or C++ calling back into Python). Whatever is about to be committed asks again.
_received: int | None = None


def _on_signal(signum, frame) -> None:
    global _received
    _received = signum
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def raise_if_signalled() -> None:
    """Raise the exception of a SIGINT or SIGTERM that arrived during ``run_command``, even if it was swallowed:
    call it before committing a result, so that an interrupted command never leaves one."""
    if _received == signal.SIGINT:
        raise KeyboardInterrupt()
    if _received == signal.SIGTERM:
        raise Terminated()


class ReportHandler(logging.Handler):
    """A log record as one line on stderr (``warning: ...`` from WARNING up), written through ``tqdm.write`` where
    tqdm is installed so that a progress bar on the terminal stays whole."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if record.levelno >= logging.WARNING:
                line = f"{record.levelname.lower()}: {line}"
            try:
                from tqdm import tqdm
            except ImportError:  # the torch-free base install has no tqdm
                print(line, file=sys.stderr)
            else:
                tqdm.write(line, file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's contract: a failing handler reports, never raises
            self.handleError(record)


def show_reports() -> None:
    """Show the SDK's INFO and WARNING records on stderr, once per process (a library user configures logging
    themselves; the console commands do it here)."""
    logger = logging.getLogger("amoe_sdk")
    if not any(isinstance(h, ReportHandler) for h in logger.handlers):
        logger.addHandler(ReportHandler())
    logger.setLevel(logging.INFO)


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Run ``command`` and turn how it ended into an exit code, with one line on stderr instead of a traceback."""
    global _received
    show_reports()
    in_main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        code = command()
        raise_if_signalled()
        return code
    except AmoeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing half-written was kept", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Terminated:
        print(f"{prog}: terminated (SIGTERM); nothing half-written was kept", file=sys.stderr)
        return TERMINATED_EXIT
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received = None  # what it recorded belongs to this command only
