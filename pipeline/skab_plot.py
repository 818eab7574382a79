"""A self-contained HTML page of one SKAB evaluation: per file, the detector's score/threshold ratio over the rows,
with the labelled anomaly and the flagged rows shaded, so misses and false alarms can be seen, not just counted.

Red: labelled anomalous rows; blue: flagged rows (where both overlap the page shows purple: caught); grey: the
training rows. Pure: ``render_evaluation_html`` turns an ``EvaluationResult`` (run with ``keep_traces``) and its
files into a string.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pipeline.report import Series, Shade, svg_plot
from pipeline.skab import TRAIN_ROWS, EvaluationResult, SkabFile

_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px}
h2{font-size:15px;margin:18px 0 2px}.meta{color:#555}.legend span{margin-right:14px}
.swatch{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle;opacity:.5}"""
LABEL_COLOUR, FLAG_COLOUR, TRAIN_COLOUR = "#d62728", "#1f77b4", "#999999"


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges where ``mask`` is True, in order."""
    padded = np.r_[False, np.asarray(mask, dtype=bool), False]
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _row_ticks(lo: int, hi: int) -> list[tuple[int, str]]:
    span = max(hi - lo, 1)
    step = 10 ** math.floor(math.log10(span / 4))
    step = next(m * step for m in (1, 2, 5, 10) if span / (m * step) <= 8)
    return [(t, f"row {t}") for t in range(math.ceil(lo / step) * step, hi + 1, step)]


def _file_plot(index: int, skab_file: SkabFile, flags: np.ndarray, ratios: np.ndarray | None, train_rows: int
               ) -> str:
    n = len(skab_file.values)
    rows = np.arange(n)
    shades = [Shade(0, train_rows, TRAIN_COLOUR, "training", "training", f"rows 0-{train_rows - 1}: training")]
    shades += [Shade(a, b, LABEL_COLOUR, "labelled", "", f"rows {a}-{b - 1}: labelled anomaly")
               for a, b in runs(skab_file.labels)]
    shades += [Shade(a, b, FLAG_COLOUR, "flagged", "", f"rows {a}-{b - 1}: flagged") for a, b in runs(flags)]
    if ratios is not None:
        series = [Series("score / threshold", rows, ratios, "#222"),
                  Series("threshold", rows, np.ones(n), LABEL_COLOUR, "6,3")]
        finite = ratios[np.isfinite(ratios)]
        log = bool(len(finite)) and float(finite.max()) > 30 and float(finite.min()) > 0
        title = "score / threshold" + (" (log scale)" if log else "")
    else:  # a detector without ratios: draw its flags
        series = [Series("flagged", rows, flags.astype(float), FLAG_COLOUR)]
        log, title = False, "flags"
    return svg_plot(plot_id=f"file:{index}", title=title, x_range=(0, n - 1), series=series, shades=shades,
                    height=170, log=log, x_ticks=_row_ticks)


def render_evaluation_html(result: EvaluationResult, files: Sequence[SkabFile], *, train_rows: int = TRAIN_ROWS,
                           generated_at: datetime | None = None) -> str:
    """The page for ``result`` (from ``evaluate_files(..., keep_traces=True)`` over ``files``, in the same order).

    ValueError when the result has no traces or does not match the files.
    """
    if [r.name for r in result.files] != [f.name for f in files]:
        raise ValueError("the evaluation result and the files differ")
    if any(r.flags is None for r in result.files):
        raise ValueError("the evaluation was run without keep_traces")
    total = result.confusion
    parts: list[str] = []
    for index, (file_result, skab_file) in enumerate(zip(result.files, files, strict=True)):
        c = file_result.confusion
        assert file_result.flags is not None
        parts.append(f'<h2 id="file-{index}">{html.escape(skab_file.name)}: F1 {c.f1:.3f}, FAR {c.far:.1%}, '
                     f'MAR {c.mar:.1%} <small>(TP {c.tp}, FP {c.fp}, FN {c.fn}, TN {c.tn})</small></h2>')
        parts.append(_file_plot(index, skab_file, file_result.flags, file_result.ratios, train_rows))
    stamp = (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M:%SZ")
    keys = ((LABEL_COLOUR, "labelled anomaly (red only: missed)"), (FLAG_COLOUR, "flagged (blue only: false alarm)"),
            ("#6a4c93", "both: caught"), (TRAIN_COLOUR, "training rows"))
    legend = "".join(f'<span><span class="swatch" style="background:{colour}"></span>{text}</span>'
                     for colour, text in keys)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>SKAB evaluation: {result.model}</title>'
        f"<style>{_CSS}</style></head><body>\n<h1>SKAB evaluation: {html.escape(result.model)}</h1>\n"
        f'<p class="meta">{len(files)} files, point-wise over the test rows: F1 {total.f1:.3f}, FAR {total.far:.2%}, '
        f"MAR {total.mar:.2%} (TP {total.tp}, FP {total.fp}, FN {total.fn}, TN {total.tn}); training "
        f"{result.train_seconds:.1f} s; generated {stamp}</p>\n<p class=\"legend\">{legend}</p>\n"
        + "\n".join(parts) + "\n</body></html>\n"
    )


def write_evaluation_html(path: Path, result: EvaluationResult, files: Sequence[SkabFile]) -> Path:
    """Render to ``path`` (UTF-8); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_evaluation_html(result, files), encoding="utf-8")
    return path
