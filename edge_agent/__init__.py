"""The slmops edge agent: downloads, verifies, activates and serves small language models on a device."""

__version__ = "0.1.0"
