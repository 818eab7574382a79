"""The SKAB evaluation protocol, for any directory laid out like ``shared/datasets/skab``.

Protocol (SKAB's core/utils.py): every anomalous file (``valve1/*.csv``, ``other/*.csv``; ``;``-separated, a
``datetime`` column, the sensor columns, then ``anomaly`` and ``changepoint``) is one experiment: its first 400 rows
train a detector, the remaining rows are the test rows. A detector flags rows causally (a window's score belongs to
its last row; no row's flag may depend on later rows: checked on every file). F1, FAR (false alarms / normal test
rows) and MAR (missed / anomalous test rows) are point-wise, from one confusion matrix summed over all test rows.

``anomaly-free/anomaly-free.csv`` is not part of the protocol. ``normal_segments`` offers it, minus its last 572
rows (a copy of the first rows of ``other/5.csv``), as normal data for label-free calibration.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

TRAIN_ROWS = 400
ANOMALOUS_DIRS = ("valve1", "other")
LABEL_COLUMNS = ("anomaly", "changepoint")
ANOMALY_FREE = Path("anomaly-free") / "anomaly-free.csv"
DUPLICATED_TAIL_ROWS = 572


@dataclass(frozen=True)
class SkabFile:
    """One experiment: sensor values ``[T, F]`` in column order and point labels ``[T]``."""

    name: str
    sensors: tuple[str, ...]
    values: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Confusion:
    """Point-wise confusion counts; ``+`` sums them."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def f1(self) -> float:
        """2TP / (2TP + FP + FN); 0 when there is nothing to find and nothing flagged."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else 0.0

    @property
    def far(self) -> float:
        """False alarm rate FP / (FP + TN)."""
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    @property
    def mar(self) -> float:
        """Missed alarm rate FN / (FN + TP)."""
        return self.fn / (self.fn + self.tp) if self.fn + self.tp else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Counts and rates (FAR and MAR as fractions)."""
        return {"f1": round(self.f1, 4), "far": round(self.far, 4), "mar": round(self.mar, 4),
                "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}


def confusion(flags: np.ndarray, labels: np.ndarray) -> Confusion:
    """Confusion counts of boolean ``flags`` against boolean ``labels`` (same length)."""
    f, y = np.asarray(flags, dtype=bool), np.asarray(labels, dtype=bool)
    if f.shape != y.shape:
        raise ValueError(f"flags {f.shape} and labels {y.shape} differ in shape")
    return Confusion(int(np.sum(f & y)), int(np.sum(f & ~y)), int(np.sum(~f & y)), int(np.sum(~f & ~y)))


def _numeric_key(path: Path) -> tuple[int, str]:
    match = re.fullmatch(r"(\d+)", path.stem)
    return (int(match.group(1)) if match else 1 << 30, path.stem)


def list_files(directory: Path) -> list[Path]:
    """The anomalous CSVs of a SKAB-like directory: valve1/ then other/, each in numeric order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    found = [p for d in ANOMALOUS_DIRS for p in sorted((directory / d).glob("*.csv"), key=_numeric_key)]
    if not found:
        raise FileNotFoundError(f"{directory}: no {' or '.join(f'{d}/*.csv' for d in ANOMALOUS_DIRS)} files")
    return found


def read_file(path: Path, root: Path | None = None) -> SkabFile:
    """Read one anomalous SKAB CSV; ValueError when the ``anomaly`` column or sensor columns are missing, or a value
    is not a finite number."""
    frame = pd.read_csv(path, sep=";")
    if "anomaly" not in frame.columns:
        raise ValueError(f"{path}: no 'anomaly' column")
    sensors = tuple(c for c in frame.columns if c != "datetime" and c not in LABEL_COLUMNS)
    if not sensors:
        raise ValueError(f"{path}: no sensor columns")
    name = str(path.relative_to(root)) if root is not None else path.name
    values = frame[list(sensors)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(f"{path}: {int(bad.sum())} value(s) are missing or not finite numbers (first: row {row + 2} "
                         f"of the file, column {sensors[col]!r})")
    return SkabFile(name, sensors, values, frame["anomaly"].to_numpy(dtype=np.float64) > 0.5)


def load_skab(directory: Path, *, limit: int | None = None) -> list[SkabFile]:
    """The anomalous files (the first ``limit`` of ``list_files`` when given); all must share one sensor order."""
    paths = list_files(directory)[:limit] if limit else list_files(directory)
    files = [read_file(p, Path(directory)) for p in paths]
    if len({f.sensors for f in files}) > 1:
        raise ValueError(f"{directory}: files disagree on the sensor columns")
    return files


def normal_segments(directory: Path, *, length: int, sensors: Sequence[str]) -> list[np.ndarray]:
    """``anomaly-free.csv`` without its duplicated tail, cut into consecutive ``[length, F]`` segments of the given
    sensor columns; empty when the file is absent."""
    path = Path(directory) / ANOMALY_FREE
    if not path.is_file():
        return []
    frame = pd.read_csv(path, sep=";")
    values = frame[list(sensors)].to_numpy(dtype=np.float64)[: max(len(frame) - DUPLICATED_TAIL_ROWS, 0)]
    return [values[i : i + length] for i in range(0, len(values) - length + 1, length)]


class RowDetector(Protocol):
    """What the harness evaluates: fit on training rows; flag rows causally."""

    train_seconds: float

    def fit(self, rows: np.ndarray) -> Any: ...

    def flags(self, rows: np.ndarray) -> np.ndarray: ...


@dataclass
class FileResult:
    """One file's test-row confusion and its training time; with ``keep_traces``, its rows' flags and (for a
    detector that has ``decide``) score/threshold ratios, both over the whole file."""

    name: str
    confusion: Confusion
    train_seconds: float
    flags: np.ndarray | None = None
    ratios: np.ndarray | None = None


@dataclass
class EvaluationResult:
    """A detector's summed confusion over all files, per-file results and total training time."""

    model: str
    files: list[FileResult] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def confusion(self) -> Confusion:
        """The confusion summed over all test rows of all files."""
        total = Confusion()
        for result in self.files:
            total = total + result.confusion
        return total

    @property
    def train_seconds(self) -> float:
        """Training time summed over files."""
        return sum(r.train_seconds for r in self.files)

    def to_dict(self) -> dict[str, Any]:
        """``{"model", "f1", "far", "mar", "files", ...}`` (rates as fractions) plus per-file rows."""
        total = self.confusion
        return {"model": self.model, **total.to_dict(), "files": len(self.files),
                "train_seconds": round(self.train_seconds, 2), "settings": self.settings,
                "per_file": [{"file": r.name, **r.confusion.to_dict(), "train_seconds": round(r.train_seconds, 2)}
                             for r in self.files]}


class CausalityError(AssertionError):
    """A detector's flags for earlier rows changed when later rows were added."""


def evaluate_files(files: Sequence[SkabFile], make_detector: Callable[[], RowDetector], *, model: str,
                   train_rows: int = TRAIN_ROWS, settings: dict[str, Any] | None = None,
                   progress: bool = True, check_causal: bool = True, keep_traces: bool = False) -> EvaluationResult:
    """Run the protocol: per file, a fresh detector fits rows ``[:train_rows]`` and flags the whole file; test rows
    ``[train_rows:]`` are scored against the labels.

    With ``check_causal`` the flags of a prefix (cut half-way through the test rows) must equal the full run's
    flags on that prefix, else CausalityError. A progress bar runs over files unless ``progress`` is False.
    ``keep_traces`` keeps each file's flags and ratios in its ``FileResult`` (for ``pipeline.skab_plot``).
    """
    result = EvaluationResult(model=model, settings=dict(settings or {}))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[file]}"),
               TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(f"skab {model}", total=len(files), file="")
        for skab_file in files:
            bar.update(task, file=skab_file.name)
            if len(skab_file.values) <= train_rows:
                raise ValueError(f"{skab_file.name}: {len(skab_file.values)} rows, needs more than {train_rows}")
            detector = make_detector()
            detector.fit(skab_file.values[:train_rows])
            decide = getattr(detector, "decide", None)
            ratios, flags = decide(skab_file.values) if decide else (None, detector.flags(skab_file.values))
            flags = np.asarray(flags, dtype=bool)
            if flags.shape != (len(skab_file.values),):
                raise ValueError(f"{model}: flags of shape {flags.shape} for {len(skab_file.values)} rows")
            if check_causal:
                cut = train_rows + (len(skab_file.values) - train_rows) // 2
                prefix = np.asarray(detector.flags(skab_file.values[:cut]), dtype=bool)
                if not np.array_equal(prefix, flags[:cut]):
                    raise CausalityError(f"{model} on {skab_file.name}: flags changed when later rows were added")
            result.files.append(FileResult(skab_file.name, confusion(flags[train_rows:], skab_file.labels[train_rows:]),
                                           detector.train_seconds, flags if keep_traces else None,
                                           ratios if keep_traces else None))
            bar.advance(task)
    return result


def calibrated_settings(settings: Any, directory: Path, files: Sequence[SkabFile], *, false_alarm_rate: float
                        ) -> tuple[Any, dict[str, Any] | None]:
    """``settings`` (a ``SequenceSettings``) with the threshold multiplier calibrated on anomaly-free.csv by
    ``calibrate_multiplier`` (segments as long as the median file); unchanged, with None, when the file is absent."""
    from models.sequence_detector import calibrate_multiplier

    segments = normal_segments(directory, length=int(np.median([len(f.values) for f in files])),
                               sensors=files[0].sensors)
    if not segments:
        return settings, None
    multiplier, info = calibrate_multiplier(settings, segments, train_rows=TRAIN_ROWS,
                                            false_alarm_rate=false_alarm_rate)
    return replace(settings, multiplier=multiplier), info


def evaluate_skab(directory: Path, model_type: str, *, limit: int | None = None, baselines: bool = True,
                  calibrate: bool = False, calibration_rate: float = 0.05, progress: bool = True,
                  overrides: dict[str, Any] | None = None, plot: Path | None = None, chain: str = "detector",
                  aftermath: bool | None = None, drift: bool | None = None) -> dict[str, Any]:
    """The full comparison on one directory: ``model_type`` and, with ``baselines``, flag-everything and river's
    HalfSpaceTrees (skipped with a note when river is missing).

    ``chain`` "detector" runs the SKAB detector (``SequenceDetector`` with ``default_settings`` and ``overrides``;
    with ``calibrate`` its threshold multiplier is set from normal data only, ``calibrated_settings`` at
    ``calibration_rate``). ``chain`` "pipeline" runs the streaming product's own chain (``pipeline.skab_chain``),
    with the alert rule's ``aftermath`` and ``drift`` following (None: with) or without; of ``overrides`` it takes
    ``epochs`` and ``score_steps`` (the model's, as the detector's setting of the same name).
    With ``plot``, an HTML page of every file's ratios, labels and flags is written there (``pipeline.skab_plot``;
    its path is ``report["plot"]``).
    Returns ``{"model", "chain", "f1", "far", "mar", "files", ..., "baselines": [...], "notes": [...]}``
    with FAR and MAR as fractions. ValueError for an unknown chain or an override the chain does not take.
    """
    from models.baselines import FlagEverything, HalfSpaceTreesDetector, river_available

    files = load_skab(directory, limit=limit)
    notes: list[str] = []
    make_detector: Callable[[], RowDetector]
    if chain == "pipeline":
        from pipeline.skab_chain import PipelineChain

        extra = sorted(set(overrides or {}) - {"epochs", "score_steps"})
        if calibrate or extra:
            raise ValueError(f"the pipeline chain does not take {'calibration' if calibrate else ', '.join(extra)}"
                             " (its threshold comes from the group's YAML recipe)")
        options = {"aftermath": aftermath is not False, "drift": drift is not False, **(overrides or {})}

        def make_detector() -> RowDetector:
            return PipelineChain(model_type, **options)

        described = PipelineChain(model_type, **options).describe()
    elif chain == "detector":
        from models.sequence_detector import SequenceDetector, default_settings

        if aftermath is not None or drift is not None:
            raise ValueError("the aftermath and drift switches apply to the pipeline chain only (the SKAB detector's "
                             "own aftermath rule and baseline are part of its recipe)")

        settings = default_settings(model_type, **(overrides or {}))
        calibration: dict[str, Any] | None = None
        if calibrate:
            settings, calibration = calibrated_settings(settings, directory, files, false_alarm_rate=calibration_rate)
            if calibration is None:
                notes.append(f"no {ANOMALY_FREE}: threshold multiplier left at {settings.multiplier}")

        def make_detector() -> RowDetector:
            return SequenceDetector(settings)

        described = {"chain": "detector", **settings.describe(), "calibration": calibration}
    else:
        raise ValueError(f"unknown chain {chain!r} (have: detector, pipeline)")
    main = evaluate_files(files, make_detector, model=model_type, settings=described, progress=progress,
                          keep_traces=plot is not None)
    report = {"chain": chain, **main.to_dict()}
    if plot is not None:
        from pipeline.skab_plot import write_evaluation_html

        report["plot"] = str(write_evaluation_html(plot, main, files))
    report["baselines"] = []
    if baselines:
        report["baselines"].append(
            evaluate_files(files, FlagEverything, model=FlagEverything.name, progress=progress).to_dict())
        problem = river_available()
        if problem is None:
            report["baselines"].append(evaluate_files(files, HalfSpaceTreesDetector, model=HalfSpaceTreesDetector.name,
                                                      progress=progress).to_dict())
        else:
            notes.append(f"baseline {HalfSpaceTreesDetector.name} skipped: {problem}")
    report["notes"] = notes
    return report
