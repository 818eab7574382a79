"""Variant E of the SKAB detector, declared before it was scored: a fast release.

E. A row the detector flags stays flagged only while a second, lightly smoothed view of the same rows agrees
   (``SequenceSettings.release_smooth`` / ``release_ratio``): the rows' causal rolling mean over ``release_smooth``
   rows instead of the recipe's 30 is cut into windows and scored by the same network, scaler, baseline shift and
   per-sensor normaliser, against its own threshold fitted the same way (3x the 99.9th percentile of the training
   windows' scores, seen through that smoothing); the row stays flagged while that view's ratio exceeds
   ``release_ratio``. The release is an output filter: the drift baseline and the aftermath peak follow the
   detector's own decision, so nothing else changes. Everything else is the shipped recipe (variant C's score steps
   included).
   Why: on ``skab_label_free.py``'s synthetic files the largest share of the false alarms (2,951 of 5,797 rows, dense,
   shipped; ``skab_trend.json``) sits in the 60 rows after a fault ends, where the 30-row rolling mean still holds
   fault rows. A 5- or 10-row mean forgets the fault within 5 or 10 rows. The risk: the light view is noisier, so
   inside a fault its ratio may dip under ``release_ratio`` and cost misses (the synthetic MAR measures that).
   Choice, per model, from the synthetic files only: (``release_smooth``, ``release_ratio``) in {None (as shipped),
   (5, 0.25), (5, 0.5), (5, 1), (10, 0.25), (10, 0.5), (10, 1)}, the best synthetic F1 (the rule of variants C and
   D). SKAB is then scored once per model with its pick; a pick of None is the detector as shipped, so it takes no
   new look.

    python benchmarks/skab_release.py choose [--models dense,lstm,conv]   # synthetic choice
    python benchmarks/skab_release.py look [--models dense,lstm,conv]     # the SKAB looks

Results go to benchmarks/skab_release.json; see benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from skab_recent_rows import Study, run_study

from models.sequence_detector import SequenceSettings, default_settings

HERE = Path(__file__).resolve().parent
RELEASES: tuple[tuple[int, float] | None, ...] = (None, (5, 0.25), (5, 0.5), (5, 1.0), (10, 0.25), (10, 0.5),
                                                  (10, 1.0))


def settings_of(model: str, release: Sequence[float] | None) -> SequenceSettings:
    """The detector a release setting stands for (a JSON round trip turns the pair into a list)."""
    if release is None:
        return default_settings(model)
    smooth, ratio = release
    return default_settings(model, release_smooth=int(smooth), release_ratio=float(ratio))


def main() -> None:
    run_study(Study("release", RELEASES, None, settings_of, HERE / "skab_release.json"), __doc__ or "")


if __name__ == "__main__":
    main()
