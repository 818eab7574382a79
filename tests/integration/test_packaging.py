"""The built wheel is self-contained: installed away from the source tree, ``sensorwatch db upgrade`` finds the
migrations it ships (``sensorwatch_migrations``) and brings a new SQLite database to head."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from sqlalchemy import create_engine, inspect

ROOT = Path(__file__).resolve().parents[2]


def test_a_wheel_install_migrates_a_database_without_the_source_tree(tmp_path: Path) -> None:
    source = tmp_path / "src"  # build from a copy: a build writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                                "demo-output", "*.db"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(source)], check=True, capture_output=True, cwd=tmp_path)
    [wheel] = wheels.glob("sensorwatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    revisions = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("0*.py"))
    assert {"sensorwatch_migrations/env.py", "sensorwatch_migrations/script.py.mako"} <= names
    assert {f"sensorwatch_migrations/versions/{r}" for r in revisions} <= names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, cwd=tmp_path)
    config = ROOT / "config" / "example.yaml"  # its database URL is ${DATABASE_URL:-...}
    env = {**os.environ, "PYTHONPATH": str(target),  # the wheel's packages first, ahead of the editable checkout
           "DATABASE_URL": f"sqlite:///{tmp_path / 'sw.db'}"}
    where = subprocess.run([sys.executable, "-c", "import pipeline, sensorwatch_migrations as m; "
                            "print(pipeline.__file__); print(list(m.__path__)[0])"],
                           check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout.split()
    assert all(path.startswith(str(target)) for path in where), where
    script = target / "bin" / "sensorwatch"  # the console script pip wrote
    upgrade = subprocess.run([sys.executable, str(script), "db", "upgrade", "--config", str(config)],
                             capture_output=True, text=True, cwd=tmp_path, env=env)
    assert upgrade.returncode == 0 and "(the newest revision)" in upgrade.stderr, upgrade.stdout + upgrade.stderr
    engine = create_engine(f"sqlite:///{tmp_path / 'sw.db'}")
    assert {"window_scores", "alerts", "model_versions", "retrain_runs"} <= set(inspect(engine).get_table_names())
    assert "smoothed_score" in {c["name"] for c in inspect(engine).get_columns("window_scores")}
    engine.dispose()
