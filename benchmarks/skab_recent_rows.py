"""Variant C of the SKAB detector, declared before it was scored: the recent-rows score.

C. Each window's per-sensor error is its mean squared residual over its last ``tail`` rows instead of all ``window``
   rows (``SequenceSettings.score_steps``); the per-sensor normaliser and the threshold are fitted the same way from
   the training windows' errors under that definition. Everything else is shipped (window 20, smoothing 30,
   multiplier 3, aftermath 0.3, baseline span 150).
   Why: on ``skab_label_free.py``'s synthetic files, half the false alarms sit in the 60 rows after a fault ends,
   where the window still holds fault rows (lag), and most misses are the rows before a fault is first flagged.
   Choice of ``tail``, per model, from the synthetic files only: ``tail`` in {1, 5, 10, 20 (= the whole window, as
   shipped then)}, the best synthetic F1 at the shipped constants. SKAB is then scored once per model with its pick;
   a pick of 20 is the detector as it was, so it takes no new look. The picks became ``DEFAULT_SCORE_STEPS``.

    python benchmarks/skab_recent_rows.py choose [--models dense,lstm,conv]   # synthetic choice of tail
    python benchmarks/skab_recent_rows.py look [--models dense,lstm,conv]     # the SKAB looks

Results go to benchmarks/skab_recent_rows.json; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track
from skab_label_free import KINDS, normal_segments, synthetic_files

from models.sequence_detector import SequenceDetector, SequenceSettings, default_settings
from pipeline.skab import TRAIN_ROWS, Confusion, confusion, evaluate_files, load_skab

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "skab_recent_rows.json"
TAILS = (1, 5, 10, 20)
WHOLE_WINDOW = 20  # the detector's window: a tail of 20 scores all of it, as every model did before this study


def synthetic_scores(data: Path, settings: SequenceSettings, description: str) -> dict[str, Any]:
    """Synthetic F1/FAR/MAR (total and per fault kind) of a detector with ``settings``, and where the lag shows:
    false alarms in the 60 rows after each fault (``fp_after_60``) and misses before each fault is first flagged
    (``fn_onset``)."""
    sensors = load_skab(data)[0].sensors
    segments = normal_segments(data, sensors)
    files = synthetic_files(segments, seeds=2)
    fitted = [SequenceDetector(settings).fit(s[:TRAIN_ROWS]) for s in track(segments, description=description)]
    total, per_kind = Confusion(), dict.fromkeys(KINDS, Confusion())
    fp_after_60 = fn_onset = 0
    for f in files:
        flags, labels = fitted[f.segment].flags(f.values)[TRAIN_ROWS:], f.labels[TRAIN_ROWS:]
        c = confusion(flags, labels)
        total, per_kind[f.kind] = total + c, per_kind[f.kind] + c
        start, end = np.flatnonzero(labels)[[0, -1]]
        fp_after_60 += int(flags[end + 1 : end + 61].sum())
        caught = np.flatnonzero(flags[start : end + 1])
        fn_onset += int(caught[0]) if len(caught) else int(end + 1 - start)
    return {**total.to_dict(), "fp_after_60": fp_after_60, "fn_onset": fn_onset,
            "per_kind": {k: v.to_dict() for k, v in per_kind.items()}}


@dataclass(frozen=True)
class Study:
    """A pre-registered one-setting study: ``values`` of the setting ``key`` are scored on the synthetic files, the
    best synthetic F1 is picked per model, and SKAB scores each pick once (a pick of ``shipped``, the detector as it
    is, takes no new look). ``settings(model, value)`` is the detector a value stands for."""

    key: str
    values: tuple[Any, ...]
    shipped: Any
    settings: Callable[[str, Any], SequenceSettings]
    results: Path


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The declared rule: the best synthetic F1."""
    return max(rows, key=lambda r: r["f1"])


def run_study(study: Study, description: str) -> None:
    """The command line of a study: ``choose`` (the synthetic grid and pick per model) or ``look`` (SKAB, once per
    pick); results are kept in ``study.results``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "datasets" / "skab")
    parser.add_argument("command", choices=("choose", "look"))
    parser.add_argument("--models", default="dense,lstm,conv")
    args = parser.parse_args()
    key = study.key
    results = json.loads(study.results.read_text()) if study.results.exists() else {"synthetic": {}, "looks": {}}
    for model in args.models.split(","):
        if args.command == "choose":
            rows = [{key: value, **synthetic_scores(args.data, study.settings(model, value), f"{model} {key} {value}")}
                    for value in study.values]
            results["synthetic"][model] = {"rows": rows, "pick": choose(rows)[key]}
            for r in rows:
                print(f"{model} {key} {r[key]}: synthetic F1 {r['f1']:.3f}, FAR {100 * r['far']:.2f}%, "
                      f"MAR {100 * r['mar']:.2f}%")
            print(f"{model}: pick {key} {results['synthetic'][model]['pick']}")
            continue
        if model not in results["synthetic"]:
            raise SystemExit(f"no synthetic pick for {model}: run `choose --models {model}` first")
        value = results["synthetic"][model]["pick"]
        if value == study.shipped:
            print(f"{model}: the pick is the detector as shipped ({key} {value}); no new look")
            continue
        if model in results["looks"]:
            raise SystemExit(f"{model} was scored on SKAB already (one look per model): {results['looks'][model]}")
        settings = study.settings(model, value)
        doc = evaluate_files(load_skab(args.data), lambda s=settings: SequenceDetector(s), model=model,
                             settings=settings.describe(), progress=True).to_dict()
        results["looks"][model] = {key: value, **{k: doc[k] for k in ("f1", "far", "mar", "train_seconds")}}
        print(f"{model} {key} {value}: F1 {doc['f1']:.3f}, FAR {100 * doc['far']:.2f}%, MAR {100 * doc['mar']:.2f}%, "
              f"training {doc['train_seconds']:.1f} s")
        study.results.write_text(json.dumps(results, indent=1, default=float) + "\n")
    study.results.write_text(json.dumps(results, indent=1, default=float) + "\n")


def main() -> None:
    run_study(Study("tail", TAILS, WHOLE_WINDOW,
                    lambda model, tail: default_settings(model, score_steps=None if tail == WHOLE_WINDOW else tail),
                    RESULTS), __doc__ or "")


if __name__ == "__main__":
    main()
