"""How a command ends: one message and a distinct exit code for SDK errors, 130 for Ctrl-C, 143 for SIGTERM.

Both console scripts (``amoe`` and ``amoe-convert``) run their verbs through ``run_command``. SIGTERM (what
``kill``, systemd and Docker send) is turned into an exception in the main thread, so the same clean-up that
Ctrl-C gets runs: ``with`` blocks close, half-written bundles and checkpoints are removed.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

from amoe_sdk.errors import AmoeError

INTERRUPTED_EXIT = 130
TERMINATED_EXIT = 143


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException like KeyboardInterrupt, so that ``except Exception`` does not swallow it."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Run ``command`` and turn how it ended into an exit code, with one line on stderr instead of a traceback."""
    in_main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        return command()
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
        if in_main:
            signal.signal(signal.SIGTERM, previous)
