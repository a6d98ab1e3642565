"""The interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Backend(ABC):
    """``infer(batch uint8 [B, S, S, 3])`` -> {output name: array}; ``B`` and ``S`` are the bundle's."""

    name: str = "?"
    device: str = "?"

    @abstractmethod
    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None:
        """Release the runtime's resources; the backend is unusable afterwards."""

    def describe(self) -> str:
        return f"{self.name} on {self.device}"
