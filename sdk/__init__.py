"""amoe-sdk: mixture-of-experts visual anomaly detection from training to the edge.

The top-level package stays light: importing it pulls in neither torch nor any inference backend.
``EdgeDetector`` (the torch-free runtime) loads on first use; training lives in ``amoe_sdk.training``, the model
in ``amoe_sdk.models``, data in ``amoe_sdk.data``, conversion in ``amoe_sdk.converters``.
"""

from amoe_sdk.errors import AmoeError
from amoe_sdk.version import __version__

__all__ = ["AmoeError", "DetectionResult", "EdgeDetector", "__version__"]


def __getattr__(name: str):
    if name in ("EdgeDetector", "DetectionResult"):
        from amoe_sdk import runtimes

        return getattr(runtimes, name)
    raise AttributeError(f"module 'amoe_sdk' has no attribute {name!r}")
