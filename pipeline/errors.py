"""The project's small error tree.

- ``InvalidReading``: one input message is unusable; it goes to the dead-letter topic, never stops the pipeline.
- ``TransientError``: an outside dependency failed (database, broker); retry and do not commit offsets.
- ``ConfigError``: the configuration is invalid; raised at start-up with the key path and the reason.
- ``ModelError``: a model bundle is missing, tampered with, or does not match the configuration
  (``ModelMismatch``: it is fine, but trained for another configuration).
"""

from __future__ import annotations


class SensorwatchError(Exception):
    """Base of every error raised on purpose by sensorwatch."""


class InvalidReading(SensorwatchError):
    """A message that cannot become a reading. ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TransientError(SensorwatchError):
    """A failure worth retrying (database or broker unavailable)."""


class ConfigError(SensorwatchError):
    """The configuration file is invalid. The message names the key path and the problem."""


class ModelError(SensorwatchError):
    """A model bundle cannot be used (missing, checksum mismatch, sensors not matching the config)."""


class ModelMismatch(ModelError):
    """A sound bundle trained for another configuration (sensors, window length, sampling grid, smoothing): no retry
    helps until a model is trained for this one."""
