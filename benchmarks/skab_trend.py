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

import argparse
import json
from pathlib import Path
from typing import Any

from skab_recent_rows import synthetic_scores

from models.sequence_detector import SequenceDetector, default_settings
from pipeline.skab import evaluate_files, load_skab

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "skab_trend.json"
TREND_SPANS: tuple[int | None, ...] = (None, 150, 300, 600)


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The declared rule: the best synthetic F1."""
    return max(rows, key=lambda r: r["f1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "datasets" / "skab")
    parser.add_argument("command", choices=("choose", "look"))
    parser.add_argument("--models", default="dense,lstm,conv")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"synthetic": {}, "looks": {}}
    for model in args.models.split(","):
        if args.command == "choose":
            rows = [{"trend_span": span,
                     **synthetic_scores(args.data, default_settings(model, trend_span=span),
                                        f"{model} trend {span}")}
                    for span in TREND_SPANS]
            results["synthetic"][model] = {"rows": rows, "pick": choose(rows)["trend_span"]}
            for r in rows:
                print(f"{model} trend {r['trend_span']}: synthetic F1 {r['f1']:.3f}, FAR {100 * r['far']:.2f}%, "
                      f"MAR {100 * r['mar']:.2f}%")
            print(f"{model}: pick trend_span {results['synthetic'][model]['pick']}")
            continue
        if model not in results["synthetic"]:
            raise SystemExit(f"no synthetic pick for {model}: run `choose --models {model}` first")
        span = results["synthetic"][model]["pick"]
        if span is None:
            print(f"{model}: the pick is the level-only baseline, as shipped; no new look")
            continue
        if model in results["looks"]:
            raise SystemExit(f"{model} was scored on SKAB already (one look per model): {results['looks'][model]}")
        settings = default_settings(model, trend_span=span)
        doc = evaluate_files(load_skab(args.data), lambda s=settings: SequenceDetector(s), model=model,
                             settings=settings.describe(), progress=True).to_dict()
        results["looks"][model] = {"trend_span": span, **{k: doc[k] for k in ("f1", "far", "mar", "train_seconds")}}
        print(f"{model} trend {span}: F1 {doc['f1']:.3f}, FAR {100 * doc['far']:.2f}%, MAR {100 * doc['mar']:.2f}%, "
              f"training {doc['train_seconds']:.1f} s")
        RESULTS.write_text(json.dumps(results, indent=1, default=float) + "\n")
    RESULTS.write_text(json.dumps(results, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
