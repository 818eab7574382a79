"""What each part of the SKAB recipe contributes: the dense detector with one design choice switched off at a time.

    python benchmarks/skab_ablation.py [--data ../shared/datasets/skab] [--model dense]

Prints a Markdown table (F1, FAR, MAR). Every row uses one fixed configuration for all files.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from models.sequence_detector import SequenceDetector, default_settings
from pipeline.skab import calibrated_settings, evaluate_files, load_skab

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("recipe as shipped", {}),
    ("score the whole window (score_steps None)", {"score_steps": None}),
    ("no drift-following baseline", {"baseline_span": None}),
    ("no aftermath rule", {"aftermath_relative": 0.0}),
    ("neither baseline nor aftermath", {"baseline_span": None, "aftermath_relative": 0.0}),
    ("wide code (hidden 64-16)", {"hyperparameters": {"hidden": [64, 16]}}),
    ("no input smoothing", {"smooth": 1}),
    ("no scale floors", {"level_floor": 0.0, "step_floor": 0.0}),
    ("threshold from validation windows only", {"threshold_windows": "validation"}),
    ("POT threshold, target rate 1e-3, no headroom", {"threshold_method": "pot", "multiplier": 1.0}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "skab")
    parser.add_argument("--model", default="dense")
    args = parser.parse_args()
    files = load_skab(args.data)
    print("| variant | F1 | FAR % | MAR % |\n|---|---:|---:|---:|")
    variants = [*VARIANTS, ("headroom calibrated on anomaly-free.csv (5% FAR)", {"_calibrate": True})]
    for label, overrides in variants:
        calibrate = overrides.pop("_calibrate", False)
        settings = default_settings(args.model, **overrides)
        if calibrate:
            settings, info = calibrated_settings(settings, args.data, files, false_alarm_rate=0.05)
            label += f", multiplier {settings.multiplier:.1f}" if info else " (file missing)"
        total = evaluate_files(files, lambda s=settings: SequenceDetector(s), model=args.model, progress=False,
                               check_causal=False).confusion
        print(f"| {label} | {total.f1:.3f} | {100 * total.far:.2f} | {100 * total.mar:.2f} |", flush=True)


if __name__ == "__main__":
    main()
