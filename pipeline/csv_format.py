"""CSV files of readings: what their lines say of their format. Pure apart from reading the file's start."""

from __future__ import annotations

import csv
from pathlib import Path


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
