"""The SDK version, written into every checkpoint and bundle."""

__version__ = "0.1.0"
