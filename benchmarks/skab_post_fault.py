"""Where the synthetic false alarms after a fault come from (synthetic files only, no SKAB labels).

For every false-alarm row in the 60 rows after a synthetic fault ends (the shipped detector of ``--model``), it
counts whether the same row is flagged in the clean segment too (the fault did not cause it), and which sensor has
the largest normalised error there (the faulted sensor, or another one), and both at once.

    python benchmarks/skab_post_fault.py [--model dense]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.progress import track
from skab_label_free import normal_segments, synthetic_files

from models.sequence_detector import SequenceDetector, default_settings
from pipeline.skab import TRAIN_ROWS, load_skab

HERE = Path(__file__).resolve().parent


class RecordingDetector(SequenceDetector):
    """The detector, keeping each scored window's normalised per-sensor errors while ``recording``."""

    recording = False

    def _errors(self, windows: np.ndarray) -> np.ndarray:
        errors = super()._errors(windows)
        if self.recording:
            assert self.sensor_scale is not None
            self.recorded.append(errors / self.sensor_scale)
        return errors

    def flags_and_errors(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the flag, and the normalised per-sensor errors of the window ending there (scored rows only)."""
        self.recorded: list[np.ndarray] = []
        self.recording = True
        try:
            flags = self.flags(rows)
        finally:
            self.recording = False
        return flags, np.concatenate(self.recorded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "datasets" / "skab")
    parser.add_argument("--model", default="dense")
    args = parser.parse_args()
    sensors = load_skab(args.data)[0].sensors
    segments = normal_segments(args.data, sensors)
    fitted = [RecordingDetector(default_settings(args.model)).fit(s[:TRAIN_ROWS]) for s in segments]
    clean_flags = [d.flags(s) for d, s in zip(fitted, segments, strict=True)]
    rows = also_clean = by_faulted = fault_only_faulted = 0
    by_sensor = dict.fromkeys(sensors, 0)
    for f in track(synthetic_files(segments, seeds=2), description="synthetic files"):
        flags, errors = fitted[f.segment].flags_and_errors(f.values)
        first = len(f.values) - len(errors)
        faulted = np.abs(f.values - segments[f.segment]).sum(axis=0) > 0
        end = int(np.flatnonzero(f.labels)[-1])
        for t in np.flatnonzero(flags[end + 1 : end + 61]) + end + 1:
            top = int(np.argmax(errors[t - first]))
            rows += 1
            also_clean += int(clean_flags[f.segment][t])
            by_faulted += int(faulted[top])
            fault_only_faulted += int(faulted[top] and not clean_flags[f.segment][t])
            by_sensor[sensors[top]] += 1
    doc = {"model": args.model, "fp_after_60": rows, "also_flagged_in_clean_segment": also_clean,
           "top_sensor_is_faulted": by_faulted,
           "not_in_clean_segment_and_top_sensor_is_faulted": fault_only_faulted, "top_sensor": by_sensor}
    print(json.dumps(doc, indent=1))
    (HERE / f"skab_post_fault_{args.model}.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
