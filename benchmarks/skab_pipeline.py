"""SKAB through the product's own chain (no broker, no database): what the pipeline as configured in YAML flags.

``sensorwatch evaluate`` scores SKAB with ``models.sequence_detector``, the SKAB detector (a drift-following input
baseline and a row-level aftermath rule). This runs the pipeline's code instead, per file: ``windows_from_frame``
(the windower's grid, smoothing and gap rules) on the first 400 rows, ``train_group``, then ``score_and_judge`` over
the whole file (the forward pass and the alert engine's ``judge``, with or without ``alert.aftermath``, and with or
without drift following, ``drift``); a test row is flagged when the window ending at it is ``is_anomaly``. Point-wise
F1 / FAR / MAR over the test rows, summed over valve1/ + other/, as ``pipeline.skab`` counts them.

The settings (``group_config``) map the SKAB detector's recipe onto the product's configuration and were fixed before
this ran; each (model, variant) pair is scored once:
window 20 rows, stride 1, smoothing 30 rows, code size 2, scale floors (step 0.5, level 0.002), threshold 3x the
99.9th percentile of the validation windows' scores, the default alert rule (2 of 3 to open, 3 to resolve, critical at
3x), in the ``aftermath`` rows ``relative`` 0.3 with a 6 h half-life (no decay within a file), and in the ``drift``
rows ``span_s`` 150 (the SKAB detector's ``baseline_span``: 150 rows at 1 s a row).

    python benchmarks/skab_pipeline.py [--data ../shared/datasets/skab] [--models dense,lstm,conv]
                                       [--variants plain,aftermath,aftermath+drift] [--output skab_pipeline.json]

``--output`` replaces the rows it computed in that file and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import track
from rich.table import Table

from models.sequence_detector import DEFAULT_HYPERPARAMETERS
from pipeline.alerting import AlertEngine
from pipeline.config import GroupConfig, parse_config
from pipeline.drift import DriftTracker, score_and_judge
from pipeline.skab import TRAIN_ROWS, Confusion, SkabFile, confusion, load_skab
from pipeline.train import train_group, windows_from_frame

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z: row i of a file is read at T0 + i seconds
VARIANTS = {"plain": (False, False), "aftermath": (True, False), "drift": (False, True),
            "aftermath+drift": (True, True)}  # name: (alert.aftermath, drift)


def group_config(sensors: tuple[str, ...], model: str, *, aftermath: bool, drift: bool = False) -> GroupConfig:
    """The one group a SKAB file becomes (see the module docstring)."""
    alert: dict[str, Any] = {"k": 2, "n": 3, "clear_after": 3, "critical_multiplier": 3.0}
    if aftermath:
        alert["aftermath"] = {"relative": 0.3, "half_life_s": 21600}
    raw = {"groups": [{
        "name": "skab", "assets": ["file"], "sampling_period_s": 1,
        "sensors": [{"name": s} for s in sensors],
        "window": {"length": 20, "stride": 1, "max_gap": 0, "smooth": 30},
        "model": {"type": model, **DEFAULT_HYPERPARAMETERS[model], "epochs": 40, "batch_size": 32, "patience": 6,
                  "validation_fraction": 0.2, "scale_floor_step": 0.5, "scale_floor_level": 0.002},
        "threshold": {"method": "percentile", "percentile": 99.9, "multiplier": 3.0},
        "alert": alert,
        **({"drift": {"span_s": 150}} if drift else {}),
    }]}
    return parse_config(raw, env={}).groups[0]


def _frame(file: SkabFile, rows: int | None = None) -> pd.DataFrame:
    values = file.values if rows is None else file.values[:rows]
    index = pd.to_datetime(T0 + 1000 * np.arange(len(values)), unit="ms", utc=True)
    return pd.DataFrame(values, columns=list(file.sensors), index=index).rename_axis("ts").reset_index().assign(
        asset="file")


def flag_file(file: SkabFile, model: str, *, aftermath: bool, drift: bool = False) -> tuple[np.ndarray, float]:
    """Per row of ``file``: flagged by the pipeline's chain (rows before the first window: not flagged); and the
    training seconds."""
    group = group_config(file.sensors, model, aftermath=aftermath, drift=drift)
    started = time.perf_counter()
    trained = train_group(windows_from_frame(_frame(file, TRAIN_ROWS), group), group, progress=False)
    seconds = time.perf_counter() - started
    judged, _ = score_and_judge(windows_from_frame(_frame(file), group), {group.name: trained.detector},
                                AlertEngine([group]), DriftTracker([group]))
    flags = np.zeros(len(file.values), dtype=bool)
    for score in judged:
        flags[(score.end_ms - T0) // 1000 - 1] = score.is_anomaly  # a window's verdict belongs to its last row
    return flags, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/skab")
    parser.add_argument("--models", default="dense,lstm,conv", help="comma-separated: dense, lstm, conv, sparse, "
                        "contractive, vae (the SKAB detector's hyperparameters of each)")
    parser.add_argument("--variants", default="plain,aftermath,aftermath+drift",
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--output", type=Path, help="write the rows (and per-file counts) as JSON here")
    args = parser.parse_args()
    files = load_skab(args.data)
    rows = []
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            aftermath, drift = VARIANTS[variant]
            total, seconds, per_file = Confusion(0, 0, 0, 0), 0.0, []
            for file in track(files, description=f"{model} {variant}"):
                flags, took = flag_file(file, model, aftermath=aftermath, drift=drift)
                counts = confusion(flags[TRAIN_ROWS:], file.labels[TRAIN_ROWS:])
                total, seconds = total + counts, seconds + took
                per_file.append({"file": file.name, **counts.to_dict()})
            rows.append({"model": model, "aftermath": aftermath, "drift": drift, "f1": round(total.f1, 3),
                         "far": round(100 * total.far, 2), "mar": round(100 * total.mar, 2),
                         "train_s": round(seconds, 1), "files": per_file})
    table = Table("model", "aftermath", "drift", "F1", "FAR %", "MAR %", "training s")
    for r in rows:
        table.add_row(r["model"], "yes" if r["aftermath"] else "no", "yes" if r["drift"] else "no", f"{r['f1']:.3f}",
                      f"{r['far']:.2f}", f"{r['mar']:.2f}", f"{r['train_s']:.1f}")
    Console().print(table)
    if args.output:
        def key(row: dict[str, Any]) -> tuple[str, bool, bool]:
            return row["model"], row["aftermath"], row.get("drift", False)

        done = {key(r) for r in rows}
        kept = json.loads(args.output.read_text())["rows"] if args.output.exists() else []
        merged = [r for r in kept if key(r) not in done] + rows
        args.output.write_text(json.dumps({"files": len(files), "rows": merged}, indent=2))


if __name__ == "__main__":
    main()
