"""SKAB through the product's own chain (no broker, no database): what the pipeline as configured in YAML flags.

Runs ``pipeline.skab_chain.PipelineChain`` (what ``sensorwatch evaluate --chain pipeline`` runs) for several models
and variants: per file, ``windows_from_frame`` (the windower's grid, smoothing and gap rules) on the first 400 rows,
``train_group``, then ``score_and_judge`` over the whole file (the forward pass and the alert engine's ``judge``,
with or without ``alert.aftermath``, and with or without drift following); a test row is flagged when the window
ending at it is ``is_anomaly``. Point-wise F1 / FAR / MAR over the test rows, summed over valve1/ + other/.

The group (``pipeline.skab_chain.group_config``) maps the SKAB detector's recipe onto the product's configuration; it
was fixed before this ran, and each (model, variant) pair is scored once: window 20 rows, stride 1, smoothing 30
rows, code size 2, scale floors (step 0.5, level 0.002), threshold 3x the 99.9th percentile of the validation
windows' scores, the default alert rule (2 of 3 to open, 3 to resolve, critical at 3x), in the ``aftermath`` rows
``relative`` 0.3 with a 6 h half-life (no decay within a file), and in the ``drift`` rows ``span_s`` 150 (the SKAB
detector's ``baseline_span``: 150 rows at 1 s a row). ``score_steps`` is the detector's per model type unless
``--score-steps`` says otherwise; rows computed before it existed scored the whole window (20).

    python benchmarks/skab_pipeline.py [--data ../shared/datasets/skab] [--models dense,lstm,conv]
                                       [--variants plain,aftermath,aftermath+drift] [--score-steps N]
                                       [--output skab_pipeline.json]

``--output`` replaces the rows it computed in that file and keeps the others.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from models.sequence_detector import DEFAULT_SCORE_STEPS
from pipeline.skab import evaluate_files, load_skab
from pipeline.skab_chain import PipelineChain

VARIANTS = {"plain": (False, False), "aftermath": (True, False), "drift": (False, True),
            "aftermath+drift": (True, True)}  # name: (alert.aftermath, drift)
WHOLE_WINDOW = 20  # the recipe's window: score_steps 20 scores all of it (rows from before score_steps say 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/skab")
    parser.add_argument("--models", default="dense,lstm,conv", help="comma-separated: dense, lstm, conv, sparse, "
                        "contractive, vae (the SKAB detector's hyperparameters of each)")
    parser.add_argument("--variants", default="plain,aftermath,aftermath+drift",
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--score-steps", type=int, default=None,
                        help="the model's score_steps (default: the recipe's per model type; 20: the whole window)")
    parser.add_argument("--output", type=Path, help="write the rows (and per-file counts) as JSON here")
    args = parser.parse_args()
    files = load_skab(args.data)
    rows = []
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            aftermath, drift = VARIANTS[variant]
            steps = args.score_steps or DEFAULT_SCORE_STEPS[model] or WHOLE_WINDOW
            result = evaluate_files(files, functools.partial(PipelineChain, model, aftermath=aftermath, drift=drift,
                                                             score_steps=steps),
                                    model=f"{model} {variant}", check_causal=False)
            total = result.confusion
            rows.append({"model": model, "aftermath": aftermath, "drift": drift, "score_steps": steps,
                         "f1": round(total.f1, 3),
                         "far": round(100 * total.far, 2), "mar": round(100 * total.mar, 2),
                         "train_s": round(result.train_seconds, 1),
                         "files": [{"file": r.name, **r.confusion.to_dict()} for r in result.files]})
    table = Table("model", "aftermath", "drift", "score steps", "F1", "FAR %", "MAR %", "training s")
    for r in rows:
        table.add_row(r["model"], "yes" if r["aftermath"] else "no", "yes" if r["drift"] else "no",
                      str(r["score_steps"]), f"{r['f1']:.3f}", f"{r['far']:.2f}", f"{r['mar']:.2f}",
                      f"{r['train_s']:.1f}")
    Console().print(table)
    if args.output:
        def key(row: dict[str, Any]) -> tuple[str, bool, bool, int]:
            return row["model"], row["aftermath"], row.get("drift", False), row.get("score_steps", WHOLE_WINDOW)

        done = {key(r) for r in rows}
        kept = json.loads(args.output.read_text())["rows"] if args.output.exists() else []
        merged = [r for r in kept if key(r) not in done] + rows
        args.output.write_text(json.dumps({"files": len(files), "rows": merged}, indent=2))


if __name__ == "__main__":
    main()
