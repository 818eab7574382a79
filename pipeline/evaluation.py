"""Event-level scoring of alerts against injected (ground-truth) anomalies. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A labelled time span of one asset, ``[start_ms, end_ms)``."""

    asset: str
    start_ms: int
    end_ms: int
    label: str = ""

    def overlaps(self, other: Span) -> bool:
        """Same asset and intersecting time spans."""
        return self.asset == other.asset and self.start_ms < other.end_ms and other.start_ms < self.end_ms


@dataclass
class EventScores:
    """Recall over injected anomalies, precision over raised alerts, and the per-anomaly verdicts."""

    recall: float
    precision: float
    caught: list[tuple[Span, bool]] = field(default_factory=list)
    false_alerts: list[Span] = field(default_factory=list)

    def recall_by_label(self) -> dict[str, float]:
        """Recall per anomaly kind."""
        out: dict[str, list[bool]] = {}
        for span, hit in self.caught:
            out.setdefault(span.label, []).append(hit)
        return {label: sum(hits) / len(hits) for label, hits in sorted(out.items())}


def score_events(truth: Sequence[Span], alerts: Sequence[Span]) -> EventScores:
    """An anomaly is caught when an alert of its asset overlaps it; an alert is true when it overlaps an anomaly.

    With no anomalies recall is 1; with no alerts precision is 1 (nothing false was raised).
    """
    caught = [(t, any(t.overlaps(a) for a in alerts)) for t in truth]
    false_alerts = [a for a in alerts if not any(a.overlaps(t) for t in truth)]
    recall = sum(hit for _, hit in caught) / len(caught) if caught else 1.0
    precision = (len(alerts) - len(false_alerts)) / len(alerts) if alerts else 1.0
    return EventScores(recall, precision, caught, false_alerts)
