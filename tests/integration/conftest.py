"""Fixtures for tests that must hold on both databases the product supports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: SQLite (the embedded default) and a fresh PostgreSQL database, one test run each."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sw.db'}"
    else:
        yield request.getfixturevalue("pg_database_url")
