"""The values that flow through the pipeline: small frozen dataclasses, numpy-backed where it matters.

Every record carries where it came from (partition, offset) so the runner can decide what is safe to commit.
Times are integer epoch milliseconds (UTC) inside the pipeline; conversion to datetimes happens at the edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np


def ms_to_datetime(ms: int) -> datetime:
    """Epoch milliseconds to an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def ms_to_iso(ms: int) -> str:
    """Epoch ms as ISO-8601 UTC to the millisecond, e.g. ``2026-03-01T12:00:00.000Z`` (for messages)."""
    return ms_to_datetime(ms).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def datetime_to_ms(value: datetime) -> int:
    """Aware (or naive = UTC) datetime to epoch milliseconds."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return round(value.timestamp() * 1000)


def significant(value: float, digits: int = 6) -> float:
    """``value`` rounded to ``digits`` significant digits (errors and scores for storage and display: small ones keep
    their precision, where rounding to decimals would turn them into 0)."""
    return float(f"{value:.{digits}g}")


@dataclass(frozen=True, slots=True)
class Reading:
    """One validated reading of one or more sensors of an asset at one instant."""

    asset: str
    ts_ms: int
    values: dict[str, float]
    partition: int = 0
    offset: int = -1


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message that could not become a reading, with a machine-readable reason; bound for the dead-letter topic.
    ``partial``: only some of its values were left out (``detail`` names them); the others were used."""

    reason: str
    detail: str
    value: bytes | None
    key: bytes | None
    topic: str = ""
    partition: int = 0
    offset: int = -1
    partial: bool = False


@dataclass(frozen=True, slots=True)
class Window:
    """A complete window of one asset: ``values`` is ``[length, n_sensors]`` in the group's sensor order.

    ``start_ms`` is the first grid instant, ``end_ms`` the instant one step after the last (end exclusive).
    """

    asset: str
    group: str
    start_ms: int
    end_ms: int
    values: np.ndarray = field(repr=False)


@dataclass(frozen=True, slots=True)
class SkippedWindow:
    """A window that was not scored because gaps exceeded the fill limit."""

    asset: str
    group: str
    start_ms: int
    end_ms: int
    missing: int


@dataclass(frozen=True, slots=True)
class Score:
    """The model's verdict on one window: total error, per-sensor errors, and the threshold it was held to.

    ``smoothed`` is the EWMA of the asset's scores up to this window when the model's threshold applies to the
    smoothed stream (``threshold.ewma_alpha``), else None. ``level`` is what the threshold is compared with.
    ``aftermath_floor`` is the raised bar of the alert rule's ``aftermath`` (score units) when a recent large
    incident of the asset set one above the threshold, else None. ``drift_offset`` holds the asset's residual offsets
    (per sensor, in the model's standardised units) after this window when its group follows drift
    (``GroupConfig.drift``; ``pipeline.drift``): what the asset's next window's residuals are taken relative to.
    """

    asset: str
    group: str
    start_ms: int
    end_ms: int
    score: float
    threshold: float
    sensor_errors: dict[str, float]
    model_version: str
    smoothed: float | None = None
    aftermath_floor: float | None = None
    drift_offset: dict[str, float] | None = None
    # sensors whose mean over the steps the score covers (``scoring.off_training``) lies OFF_TRAINING_SIGMAS or more
    # of their training standard deviations from their training mean, signed (far outside what the model was trained
    # on: a model may reconstruct such a shift and put the error on other sensors, so the shares alone can miss them);
    # stored with the score (NULL when empty; migration 0012), so that a restart rebuilds a pending incident's
    # evidence with it
    off_training: dict[str, float] = field(default_factory=dict)

    @property
    def level(self) -> float:
        """The value held to the threshold: the smoothed score when there is one, else the raw score."""
        return self.score if self.smoothed is None else self.smoothed

    @property
    def bar(self) -> float:
        """What the level must exceed: the threshold, or the aftermath floor when one is set above it."""
        return self.threshold if self.aftermath_floor is None else max(self.threshold, self.aftermath_floor)

    @property
    def is_anomaly(self) -> bool:
        """True when the level (smoothed or raw score) exceeds the bar (the threshold, raised by the aftermath rule
        after a large excursion)."""
        return self.level > self.bar


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """The current state of one alert (one incident of one asset), as written to the database."""

    asset: str
    group: str
    opened_ms: int
    last_seen_ms: int
    closed_ms: int | None
    peak_score: float
    threshold: float
    severity: str
    status: str
    window_count: int
    top_sensors: list[dict[str, float | str]]
    model_version: str
    # every sensor's error summed over the incident's windows, unrounded: a restart resumes the ranking from these
    # (None for alerts stored before they were kept, whose ranking resumes from the listed sensors)
    error_sums: dict[str, float] | None = None
    # sensors far outside their training data in the incident's exceeding windows: the farthest window mean seen,
    # signed, in training standard deviations (``Score.off_training``); None for alerts stored before it was kept
    off_training: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """A change of an alert: ``kind`` is ``opened``, ``updated`` or ``resolved``.

    ``previous_severity`` is the severity before an update, so an escalation is visible to the sinks.
    """

    kind: str
    alert: AlertRecord
    previous_severity: str | None = None

    @property
    def escalated(self) -> bool:
        """True for an update that raised the alert's severity."""
        return self.kind == "updated" and self.previous_severity not in (None, self.alert.severity)
