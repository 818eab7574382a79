"""Event-level recall and precision."""

from pipeline.evaluation import Span, score_events


def test_recall_precision_and_per_kind() -> None:
    truth = [Span("a", 100, 200, "spike"), Span("a", 500, 600, "drift"), Span("b", 100, 200, "spike")]
    alerts = [Span("a", 150, 250), Span("b", 300, 400), Span("a", 590, 700)]
    result = score_events(truth, alerts)
    assert result.recall == 2 / 3
    assert result.precision == 2 / 3
    assert result.recall_by_label() == {"drift": 1.0, "spike": 0.5}
    assert result.false_alerts == [Span("b", 300, 400)]


def test_touching_spans_do_not_overlap_and_empty_inputs() -> None:
    assert not Span("a", 0, 10).overlaps(Span("a", 10, 20))
    assert score_events([], []).recall == 1.0 and score_events([], []).precision == 1.0
