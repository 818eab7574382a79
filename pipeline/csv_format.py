"""CSV files of readings: their separator and their ``ts`` column. Pure apart from reading a file's start."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd


def separator(path: Path, sample_bytes: int = 64 * 1024) -> str:
    """The field separator of the CSV at ``path`` (``,``, ``;``, tab or ``|``), sniffed from its first lines; ``,``
    when they do not tell. (pandas sniffs only with its python parser, many times slower than its C parser.)"""
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        sample = f.read(sample_bytes)
    lines = sample.splitlines()
    if len(sample) == sample_bytes and len(lines) > 1:
        lines = lines[:-1]  # the last line read may be cut short
    try:
        return csv.Sniffer().sniff("\n".join(lines[:50]), delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def data_rows(path: Path, block_bytes: int = 1 << 20) -> int | None:
    """The data rows of the CSV at ``path`` as its lines after the header (a progress bar's total: a quoted cell
    that holds a line break counts twice); None when it cannot be read."""
    lines, last = 0, b"\n"
    try:
        with path.open("rb") as f:
            while block := f.read(block_bytes):
                lines, last = lines + block.count(b"\n"), block[-1:]
    except OSError:
        return None
    return max(lines + (last != b"\n") - 1, 0)


def timestamps_ms(column: pd.Series) -> np.ndarray:
    """Epoch ms per row of a ``ts`` column: numbers are epoch ms, text ISO-8601 (naive means UTC); -1 where a value
    cannot be read. In a column of text (pandas reads a CSV column that holds any text as text), a number or the
    text of one is epoch ms too, so a row reads the same whether its file is read whole or in pieces."""
    if pd.api.types.is_numeric_dtype(column):
        ts = pd.to_datetime(column, unit="ms", utc=True, errors="coerce")
    elif pd.api.types.is_object_dtype(column) or pd.api.types.is_string_dtype(column):
        numbers = pd.to_numeric(column, errors="coerce")
        ts = pd.to_datetime(column.where(numbers.isna()), utc=True, format="mixed", errors="coerce")
        ts = ts.fillna(pd.to_datetime(numbers, unit="ms", utc=True, errors="coerce"))
    else:
        ts = pd.to_datetime(column, utc=True, format="mixed", errors="coerce")
    out = np.full(len(column), -1, dtype=np.int64)
    readable = ts.notna().to_numpy()
    out[readable] = ts[readable].astype("datetime64[ns, UTC]").astype("int64").to_numpy() // 1_000_000
    return out
