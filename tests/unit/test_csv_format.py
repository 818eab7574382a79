"""The separator of a readings CSV is sniffed from its first lines (so the fast C parser can read it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.csv_format import separator
from pipeline.history import read_readings_csv


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
def test_the_separator_is_sniffed_and_the_file_read_with_it(tmp_path: Path, sep: str) -> None:
    path = tmp_path / "r.csv"
    rows = [["ts", "asset", "flow", "note"], ["2026-01-01T00:00:00Z", "007", "1.5", '"a, b; c"'],
            ["2026-01-01T00:00:10Z", "007", "2.5", "x"]]
    path.write_text("\n".join(sep.join(r) for r in rows) + "\n")
    assert separator(path) == sep
    frame = read_readings_csv(path)
    assert list(frame.columns) == ["ts", "asset", "flow", "note"]
    assert frame["asset"].tolist() == ["007", "007"] and frame["flow"].tolist() == [1.5, 2.5]
    assert frame["note"].iloc[0] == "a, b; c"  # a quoted separator stays in its cell


def test_a_file_that_does_not_tell_is_read_as_commas(tmp_path: Path) -> None:
    path = tmp_path / "one.csv"
    path.write_text("ts\n2026-01-01T00:00:00Z\n")
    assert separator(path) == ","
    long = tmp_path / "long.csv"
    long.write_text("ts;flow\n" + "".join(f"2026-01-01T00:00:{i % 60:02d}Z;{i}.5\n" for i in range(20_000)))
    assert separator(long, sample_bytes=1000) == ";"  # the sample ends mid-line: that line is not judged
