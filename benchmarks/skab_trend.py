"""Variant D of the SKAB detector, declared before it was scored: a drift baseline that follows a trend.

D. The drift-following baseline follows a linear trend as well as a level (Holt's method, ``SequenceSettings.
   trend_span``): on rows that are not flagged, ``L <- (L + b) + (x - (L + b)) / baseline_span`` and
   ``b <- b + ((L_new - L_old) - b) / trend_span``; both freeze on flagged rows; ``b`` starts at 0. Everything else
   is the shipped recipe (variant C's score steps included).
   Why: the normal recording the synthetic files come from (anomaly-free.csv) warms up steadily: its thermocouple
   rises by 1.4-18 training standard deviations across every 1,100-row segment, and a level-only EWMA follows a ramp
   of slope ``r`` about ``r x baseline_span`` behind, which the detector reads as an anomaly. A trend term follows
   the ramp without that lag, at the risk of following the start of a slow fault (the synthetic ramp faults measure
   that risk).
   Choice of ``trend_span``, per model, from the synthetic files only: ``trend_span`` in {None (level only, as
   shipped), 150, 300, 600}, the best synthetic F1 (the rule of variant C). SKAB is then scored once per model with
   its pick; a pick of None is the detector as shipped, so it takes no new look.

    python benchmarks/skab_trend.py choose [--models dense,lstm,conv]   # synthetic choice of trend_span
    python benchmarks/skab_trend.py look [--models dense,lstm,conv]     # the SKAB looks

Results go to benchmarks/skab_trend.json; see benchmarks/README.md.
"""

from __future__ import annotations

from pathlib import Path

from skab_recent_rows import Study, run_study

from models.sequence_detector import default_settings

HERE = Path(__file__).resolve().parent
TREND_SPANS: tuple[int | None, ...] = (None, 150, 300, 600)


def main() -> None:
    run_study(Study("trend_span", TREND_SPANS, None, lambda model, span: default_settings(model, trend_span=span),
                    HERE / "skab_trend.json"), __doc__ or "")


if __name__ == "__main__":
    main()
