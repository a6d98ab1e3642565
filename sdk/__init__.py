"""amoe-sdk: mixture-of-experts visual anomaly detection from training to the edge.

The top-level package stays light: importing it pulls in neither torch nor any inference backend.
Training lives in ``amoe_sdk.training``, the model in ``amoe_sdk.models``, data in ``amoe_sdk.data``.
"""

from amoe_sdk.errors import AmoeError
from amoe_sdk.version import __version__

__all__ = ["AmoeError", "__version__"]
