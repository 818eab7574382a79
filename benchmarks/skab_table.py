"""SKAB detection-quality table: every model type plus the reference baselines, same split, same protocol.

    python benchmarks/skab_table.py [--data ../shared/datasets/skab] [--models dense,lstm] [--files N]
                                    [--calibrate] [--json benchmarks/skab_results.json]

Prints a Markdown table (F1, FAR, MAR, training time summed over files, wall time) and writes the full results,
per file and with the settings used, as JSON. Settings are ``models.sequence_detector.default_settings``: one fixed
configuration for every file, never tuned per file or on test labels.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from models.autoencoders import MODEL_TYPES
from models.baselines import FlagEverything, HalfSpaceTreesDetector, river_available
from models.sequence_detector import SequenceDetector, default_settings
from pipeline.skab import EvaluationResult, calibrated_settings, evaluate_files, load_skab

ROOT = Path(__file__).resolve().parents[1]


def run(data: Path, models: list[str], *, limit: int | None, calibrate: bool, progress: bool) -> list[dict[str, Any]]:
    """Evaluate each model type and both baselines; one JSON-friendly row per detector."""
    files = load_skab(data, limit=limit)
    rows: list[dict[str, Any]] = []

    def record(result: EvaluationResult, started: float) -> None:
        rows.append({**result.to_dict(), "wall_seconds": round(time.perf_counter() - started, 1)})

    for model_type in models:
        started = time.perf_counter()
        settings = default_settings(model_type)
        if calibrate:
            settings, _ = calibrated_settings(settings, data, files, false_alarm_rate=0.05)
        record(evaluate_files(files, lambda s=settings: SequenceDetector(s), model=model_type,
                              settings=settings.describe(), progress=progress), started)
    started = time.perf_counter()
    record(evaluate_files(files, FlagEverything, model=FlagEverything.name, progress=progress), started)
    problem = river_available()
    if problem is None:
        started = time.perf_counter()
        record(evaluate_files(files, HalfSpaceTreesDetector, model=HalfSpaceTreesDetector.name, progress=progress),
               started)
    else:
        print(f"note: {HalfSpaceTreesDetector.name} skipped: {problem}")
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown (FAR and MAR in percent)."""
    lines = ["| detector | F1 | FAR % | MAR % | training s (sum over files) | wall s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['f1']:.3f} | {100 * r['far']:.2f} | {100 * r['mar']:.2f} | "
                     f"{r['train_seconds']:.1f} | {r['wall_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "skab")
    parser.add_argument("--models", default=",".join(MODEL_TYPES), help="comma-separated model types")
    parser.add_argument("--files", type=int, default=None, help="only the first N files")
    parser.add_argument("--calibrate", action="store_true", help="threshold headroom from anomaly-free.csv")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "skab_results.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    rows = run(args.data, [m.strip() for m in args.models.split(",") if m.strip()], limit=args.files,
               calibrate=args.calibrate, progress=not args.no_progress)
    print(markdown(rows))
    args.json.write_text(json.dumps({"data": str(args.data), "calibrate": args.calibrate, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
