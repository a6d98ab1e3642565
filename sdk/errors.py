"""Exceptions with messages that name the file at fault and the fix.

The CLI turns an ``AmoeError`` into a one-paragraph message and a distinct exit code instead of a traceback.
"""

from __future__ import annotations


class AmoeError(Exception):
    """Base class of every error the SDK raises on purpose. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(AmoeError):
    """Options that do not fit together, or an output path that cannot be written without harming what is there."""

    exit_code = 2


class DataError(AmoeError):
    """An image, mask or dataset folder that cannot be used as it is."""

    exit_code = 3


class ConfigError(AmoeError):
    """A config file or option that is missing, misspelt or out of range."""

    exit_code = 4


class WeightsError(AmoeError):
    """A missing or mismatched encoder weights file."""

    exit_code = 5


class CheckpointError(AmoeError):
    """A checkpoint that is missing, truncated or written by an incompatible SDK version."""

    exit_code = 6


class BundleError(AmoeError):
    """A bundle that is missing, truncated, tampered with or written by a newer SDK."""

    exit_code = 7


class ConversionError(AmoeError):
    """A conversion that cannot produce a correct artifact (an unsupported op, a refused folding)."""

    exit_code = 8


class BackendError(AmoeError):
    """An inference backend or device that is not installed or not present on this machine."""

    exit_code = 9


class InputError(AmoeError):
    """A frame the runtime cannot take: wrong dtype, channel count, or empty."""

    exit_code = 10


class ParityError(AmoeError):
    """An artifact whose outputs differ from the PyTorch reference beyond tolerance."""

    exit_code = 11
