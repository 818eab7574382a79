"""Retention on both databases: old window scores, skipped windows and resolved alerts go in batches, what a restarted
pipeline rebuilds its state from stays, a dry run deletes nothing; ``sensorwatch db prune`` and the scheduler's job."""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import func, select
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.retention import PrunePlan, prune, prune_assets, prune_bundles
from pipeline.scheduler import JOB_ID, PRUNE_JOB_ID, build_scheduler, stop_when_running
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.store.tables import Alert, ModelVersion, SkippedWindowRow, WindowScore
from pipeline.types import Score, SkippedWindow, ms_to_datetime
from tests.integration.alert_data import LENGTH_MS, STRIDE_MS, T0, config_dict, populate, scores

RETENTION = {"scores_days": 0.05, "alerts_days": 0.05, "batch_rows": 100}  # 72 minutes: 86 of pump-1's windows
RETRAIN = {"lookback_days": 0.01}


def _config(db_url: str, **retention: object):  # type: ignore[no-untyped-def]
    raw = config_dict(db_url)
    raw["retention"] = {**RETENTION, **retention}
    raw["retrain"] = RETRAIN
    return parse_config(raw, env={})


def _stored(db_url: str) -> tuple[dict[str, int], int, list[tuple[str, str]]]:
    """(scores per asset, skipped windows, (asset, status) of every alert by opening)."""
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as s:
        per_asset = dict(s.execute(select(WindowScore.asset, func.count()).group_by(WindowScore.asset)).all())
        skipped = s.scalar(select(func.count()).select_from(SkippedWindowRow)) or 0
        alerts = [(a.asset, a.status) for a in s.scalars(select(Alert).order_by(Alert.asset, Alert.opened_at))]
    engine.dispose()
    return per_asset, skipped, alerts


def _populate(db_url: str) -> None:
    """pump-1: 300 windows with an old resolved incident, a recent resolved one and an open one, and skipped windows
    old and new; pump-2: 50 old windows (silent since), its last three scored again by a second model version."""
    upgrade(db_url)
    config = _config(db_url)
    populate(db_url, config, scores("pump-1", 300, [(20, 30, 3.0, "vibration"), (250, 255, 3.0, "speed"),
                                                    (290, 299, 3.0, "speed")]))
    populate(db_url, config, scores("pump-2", 50, []))
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        rescored = [Score(x.asset, x.group, x.start_ms, x.end_ms, x.score, x.threshold, x.sensor_errors, "pumps-v2")
                    for x in scores("pump-2", 50, [])[-3:]]
        repo.insert_scores(session=s, scores=rescored)
        repo.insert_skipped(session=s, skipped=[
            SkippedWindow("pump-1", "pumps", T0 + i * STRIDE_MS, T0 + i * STRIDE_MS + LENGTH_MS, 7) for i in (5, 295)])
        repo.save_asset_progress(session=s, progress={"pump-1": ("pumps", T0 + 300 * STRIDE_MS),
                                                      "pump-2": ("pumps", T0 + 50 * STRIDE_MS)})
    engine.dispose()


def test_prune_deletes_old_history_in_batches_and_keeps_what_a_restart_needs(db_url: str) -> None:
    _populate(db_url)
    config = _config(db_url)
    last_end = T0 + 299 * STRIDE_MS + LENGTH_MS
    plan = PrunePlan.of(config, ms_to_datetime(last_end + 60_000))
    assert plan.keep_latest >= 6 and plan.batch_rows == 100
    cutoff = plan.scores_before
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        assets = prune_assets(s, config)
        before = repo.recent_scores(session=s, assets=assets, limit=plan.keep_latest)
    assert assets == ["pump-1", "pump-2", "pump-3"]
    old_pump1 = sum(1 for x in scores("pump-1", 300, []) if ms_to_datetime(x.end_ms) < cutoff)
    assert old_pump1 == 214

    counted = prune(sessions, plan, assets=assets, dry_run=True)
    assert _stored(db_url)[0] == {"pump-1": 300, "pump-2": 53}  # a dry run deletes nothing
    done = prune(sessions, plan, assets=assets)
    assert (done.scores, done.skipped, done.alerts) == (counted.scores, counted.skipped, counted.alerts)
    # pump-2 keeps its latest windows (the three rescored ones are three windows, six rows); pump-1 its recent ones
    assert done.per_asset == {"pump-1": 214, "pump-2": 53 - (plan.keep_latest + 3)}
    per_asset, skipped, alerts = _stored(db_url)
    assert per_asset == {"pump-1": 86, "pump-2": plan.keep_latest + 3}
    assert (done.skipped, skipped) == (1, 1)  # the old skipped window went, the recent one stayed
    assert done.alerts == 1 and alerts == [("pump-1", "resolved"), ("pump-1", "open")]  # the old resolved one went
    with sessions() as s:
        oldest = s.scalar(select(func.min(WindowScore.window_end)).where(WindowScore.asset == "pump-1"))
        assert oldest is not None and oldest >= cutoff
        after = repo.recent_scores(session=s, assets=assets, limit=plan.keep_latest)
    assert {a: [r.id for r in rows] for a, rows in after.items()} == \
        {a: [r.id for r in rows] for a, rows in before.items()}  # a restart rebuilds the same state

    again = prune(sessions, plan, assets=assets)
    assert (again.scores, again.skipped, again.alerts) == (0, 0, 0)
    engine.dispose()


def test_the_aftermath_look_back_is_kept_too(db_url: str) -> None:
    _populate(db_url)
    raw = config_dict(db_url, aftermath={"relative": 0.3, "half_life_s": 600})
    raw["retention"], raw["retrain"] = RETENTION, RETRAIN
    plan = PrunePlan.of(parse_config(raw, env={}), ms_to_datetime(T0 + 100 * 86_400_000))  # long after everything
    assert plan.keep_span == timedelta(milliseconds=950_978)  # half-life x log2(critical multiple 3)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    prune(sessions, plan, assets=["pump-1"])
    with sessions() as s:
        ends = list(s.scalars(select(WindowScore.window_end).where(WindowScore.asset == "pump-1")))
    latest = ms_to_datetime(T0 + 299 * STRIDE_MS + LENGTH_MS)
    assert len(ends) == 20 > plan.keep_latest and min(ends) >= latest - plan.keep_span  # 19 strides of 50 s fit
    engine.dispose()


def test_db_prune_command(db_url: str, tmp_path: Path) -> None:
    """Data from March 2026, the default retention of 90 days: `db prune --dry-run` counts, `db prune` deletes."""
    _populate(db_url)
    raw = config_dict(db_url)
    path = tmp_path / "sensorwatch.yaml"
    path.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    dry = runner.invoke(app, ["db", "prune", "--config", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would delete" in dry.output and "resolved alerts before never" in " ".join(dry.output.split())
    assert _stored(db_url)[0] == {"pump-1": 300, "pump-2": 53}
    done = runner.invoke(app, ["db", "prune", "--config", str(path)])
    assert done.exit_code == 0, done.output
    per_asset, skipped, alerts = _stored(db_url)
    keep = PrunePlan.of(parse_config(raw, env={}), ms_to_datetime(T0)).keep_latest
    assert per_asset == {"pump-1": keep, "pump-2": keep + 3} and skipped == 0
    assert len(alerts) == 3  # alerts_days is unset: alerts are kept
    assert f"deleted {300 + 53 - 2 * keep - 3} window scores" in " ".join(done.output.split())
    first = runner.invoke(app, ["alerts", "show", "--config", str(path), "1"])
    assert first.exit_code == 0 and "no score history: its windows are older than retention.scores_days (90)" \
        in " ".join(first.output.split())

    raw["retention"] = {"enabled": False}
    path.write_text(yaml.safe_dump(raw))
    off = runner.invoke(app, ["db", "prune", "--config", str(path)])
    assert off.exit_code == 2 and "retention.enabled is false" in off.output


def test_the_scheduler_runs_the_prune_job(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    _populate(url)
    raw = config_dict(url)
    path = tmp_path / "sensorwatch.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = parse_config(raw, env={})
    engine = make_engine(url)
    every_second = CronTrigger(second="*")
    scheduler = build_scheduler(config, path, engine=engine, prune_trigger=every_second)
    assert {job.id for job in scheduler.get_jobs()} == {JOB_ID, PRUNE_JOB_ID}
    thread = threading.Thread(target=scheduler.start, name="scheduler", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while _stored(url)[0].get("pump-1") == 300 and time.monotonic() < deadline:
        time.sleep(0.2)
    stop_when_running(scheduler)
    thread.join(timeout=30)
    assert _stored(url)[0]["pump-1"] < 300  # the job fired and pruned

    raw["retrain"] = {"enabled": False}
    only_prune = build_scheduler(parse_config(raw, env={}), path, engine=engine)
    assert [job.id for job in only_prune.get_jobs()] == [PRUNE_JOB_ID]
    raw["retention"] = {"enabled": False}
    with pytest.raises(ConfigError, match="both false"):
        build_scheduler(parse_config(raw, env={}), path, engine=engine)
    from pipeline.store.tables import scheduler_jobs

    with engine.begin() as conn:  # the stored jobs of the disabled parts are removed
        assert conn.execute(select(func.count()).select_from(scheduler_jobs)).scalar_one() == 0
    engine.dispose()


class _Planted:
    """What someone with write access to the database could store as a pickled job: unpickling it runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "ran"))  # type: ignore[return-value]


def test_the_scheduler_never_unpickles_a_stored_job(db_url: str, tmp_path: Path) -> None:
    """A pickled row (APScheduler's own format, what older versions wrote, or a planted one) is replaced, not read:
    before, the scheduler unpickled it on start, which ran whatever it held."""
    import pickle

    from apscheduler.util import datetime_to_utc_timestamp
    from sqlalchemy import event as sa_event

    from pipeline.store.tables import scheduler_jobs

    upgrade(db_url)
    marker = tmp_path / "ran"
    engine = make_engine(db_url)
    with engine.begin() as conn:
        for job_id in (JOB_ID, "some-other-job"):  # the second: an id this scheduler never adds, overdue
            conn.execute(scheduler_jobs.insert().values(
                id=job_id, next_run_time=datetime_to_utc_timestamp(datetime.now(UTC)),
                job_state=pickle.dumps({"func": _Planted(marker)})))
    raw = config_dict(db_url)
    path = tmp_path / "sensorwatch.yaml"
    path.write_text(yaml.safe_dump(raw))
    yearly = CronTrigger(month=1, day=1, hour=0)  # nothing fires while the test runs
    scheduler = build_scheduler(parse_config(raw, env={}), path, engine=engine, trigger=yearly, prune_trigger=yearly)
    thread = threading.Thread(target=scheduler.start, name="scheduler", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    sa_event.listen(engine, "before_cursor_execute", count)
    time.sleep(1.0)  # idle: the overdue row of another id must not make it wake up again and again
    sa_event.remove(engine, "before_cursor_execute", count)
    idle_statements = len(statements)
    stop_when_running(scheduler)
    thread.join(timeout=30)
    assert scheduler.running is False and not marker.exists()
    assert idle_statements < 10, idle_statements
    with engine.begin() as conn:
        state = conn.execute(select(scheduler_jobs.c.job_state).where(scheduler_jobs.c.id == JOB_ID)).scalar_one()
    assert json.loads(state)["fingerprint"]  # written over as JSON
    engine.dispose()


# -- model bundles ---------------------------------------------------------------------------------------------------
def _version(session, name: str, status: str, minute: int, model_dir: Path, *,  # type: ignore[no-untyped-def]
             bundle: bool = True, group: str = "pumps", created_at: datetime | None = None) -> Path:
    """A registry row of ``group`` created ``minute`` minutes after T0 (or at ``created_at``), and (``bundle``) a
    directory holding what a bundle's files are named, its metadata naming the version."""
    path = model_dir / group / name
    if bundle:
        path.mkdir(parents=True)
        (path / "weights.pt").write_bytes(b"w")
        (path / "metadata.json").write_text(json.dumps({"version": name}))
    repo.add_model_version(session=session, version=ModelVersion(
        version=name, group_name=group, model_type="dense", status=status,
        created_at=created_at or ms_to_datetime(T0 + minute * 60_000), artifact_path=str(path), checksum="0" * 64,
        config_hash="0" * 64, threshold=1.0, threshold_method="percentile", windows_used=100, metrics={}))
    return path


def _registry(db_url: str, model_dir: Path) -> dict[str, Path]:
    """pumps: 1 active, 13 retired, 11 rejected and 1 failed candidate without a bundle, 1 candidate (a retrain
    running); fans: 2 retired. Oldest first within each status."""
    upgrade(db_url)
    engine = make_engine(db_url)
    paths: dict[str, Path] = {}
    with make_sessionmaker(engine).begin() as s:
        minute = 0
        for status, count in (("retired", 13), ("rejected", 11)):
            for i in range(count):
                minute += 1
                paths[f"{status}-{i}"] = _version(s, f"pumps-{status}-{i}", status, minute, model_dir)
        paths["failed"] = _version(s, "pumps-failed", "failed", 0, model_dir, bundle=False)  # the oldest candidate
        paths["active"] = _version(s, "pumps-active", "active", 100, model_dir)
        paths["candidate"] = _version(s, "pumps-candidate", "candidate", 101, model_dir, created_at=datetime.now(UTC))
        for i in range(2):
            paths[f"fans-{i}"] = _version(s, f"fans-retired-{i}", "retired", 200 + i, model_dir, group="fans")
    engine.dispose()
    return paths


def test_old_model_bundles_go_and_their_rows_stay_marked(db_url: str, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    model_dir = tmp_path / "models"
    paths = _registry(db_url, model_dir)
    (paths["retired-1"] / "notes.txt").write_text("an operator's file")  # stays, with its directory
    (paths["retired-2"] / "metadata.json").write_text(json.dumps({"version": "something-else"}))  # not this bundle
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)

    assert prune_bundles(sessions, model_dir, keep=10, dry_run=True) == 3  # counted as a prune would delete them
    assert all(p.exists() for name, p in paths.items() if name != "failed")

    with caplog.at_level(logging.WARNING, logger="pipeline.retention"):
        assert prune_bundles(sessions, model_dir, keep=10) == 3
    # retired: the newest 10 of 13 stay; rejected and failed: the newest 10 of 12 stay (rejected-0 and the failed
    # one go; the failed one has no bundle, so it is left unmarked)
    gone = {"retired-0", "retired-1", "rejected-0"}
    for name, path in paths.items():
        if name in gone:
            assert not (path / "weights.pt").exists() and not (path / "metadata.json").exists(), name
        elif name != "failed":
            assert (path / "weights.pt").exists(), name
    assert not paths["retired-0"].exists() and (paths["retired-1"] / "notes.txt").exists()
    assert "holds model 'something-else', not pumps-retired-2: not deleted" in caplog.text
    with sessions() as s:
        marked = {r.version for r in repo.bundle_deleted_versions(session=s, since=ms_to_datetime(0))}
    assert marked == {f"pumps-{name}" for name in gone}

    assert prune_bundles(sessions, model_dir, keep=10) == 0  # nothing new: marked rows are not counted again
    stamp = datetime.now(UTC)
    with sessions.begin() as s:  # a row marked by a run that died before deleting: the next run deletes its files
        assert repo.mark_bundle_deleted(session=s, version_id=repo.get_model_version(
            session=s, version="pumps-retired-3").id, now=stamp)
        assert not repo.mark_bundle_deleted(session=s, version_id=repo.get_model_version(
            session=s, version="pumps-active").id, now=stamp)  # never the active model
    assert prune_bundles(sessions, model_dir, keep=10) == 1 and not paths["retired-3"].exists()
    engine.dispose()


def test_undecided_candidates_a_day_old_are_kept_apart_from_the_rejected_ones(db_url: str, tmp_path: Path) -> None:
    """``train --no-activate`` candidates (and those of a retrain that died before deciding) are kept like rejected
    ones, the newest ``keep`` per group, once a day old, but counted apart: nightly rejections never push out an
    operator's candidate. A younger candidate (a retrain in progress) always stays."""
    upgrade(db_url)
    model_dir = tmp_path / "models"
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    now = ms_to_datetime(T0) + timedelta(days=30)
    with sessions.begin() as s:
        for i in range(3):
            _version(s, f"undecided-{i}", "candidate", 10 + i, model_dir)
        for i in range(3):  # rejected after the operator's candidates were made
            _version(s, f"rejected-{i}", "rejected", 20 + i, model_dir)
        _version(s, "running", "candidate", 0, model_dir, created_at=now - timedelta(hours=2))
    assert prune_bundles(sessions, model_dir, keep=2, now=now) == 2
    with sessions() as s:
        marked = {r.version for r in repo.bundle_deleted_versions(session=s, since=ms_to_datetime(0))}
    assert marked == {"rejected-0", "undecided-0"}  # one of each kind: two of each stay
    assert (model_dir / "pumps" / "running" / "weights.pt").exists()
    assert (model_dir / "pumps" / "undecided-2" / "weights.pt").exists()
    assert not (model_dir / "pumps" / "undecided-0" / "weights.pt").exists()
    with sessions.begin() as s, pytest.raises(repo.BundleDeleted):
        repo.activate_model_version(session=s, version="undecided-0")
    later = now + timedelta(days=1)  # the retrain died: its candidate is undecided now, the newest of three
    assert prune_bundles(sessions, model_dir, keep=2, now=later) == 1
    assert (model_dir / "pumps" / "running" / "weights.pt").exists()
    assert not (model_dir / "pumps" / "undecided-1" / "weights.pt").exists()
    engine.dispose()


def test_the_rollback_target_is_ranked_by_when_it_was_last_active(db_url: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """v1..v4 promoted in turn, the operator rolls back to v1, then v5 is promoted: with keep=2, v1 (active until
    just now) and v4 stay, v2 and v3 go. A bundle whose files cannot be deleted is unmarked again (it is whole).
    A staging directory left by a save that died goes once a day old."""
    import os

    upgrade(db_url)
    model_dir = tmp_path / "models"
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        for i in range(1, 6):
            _version(s, f"v{i}", "candidate", i, model_dir)
    for name in ("v1", "v2", "v3", "v4", "v1", "v5"):
        with sessions.begin() as s:
            repo.activate_model_version(session=s, version=name)
    staging = model_dir / "pumps" / ".v6.abc123"
    staging.mkdir()
    (staging / "weights.pt").write_bytes(b"half")
    fresh = model_dir / "pumps" / ".v7.def456"  # a save in progress
    fresh.mkdir()
    os.utime(staging, (time.time() - 2 * 86_400,) * 2)
    from pipeline import retention

    delete = retention._delete_bundle
    monkeypatch.setattr(retention, "_delete_bundle", lambda path, version: version != "v3" and delete(path, version))
    assert prune_bundles(sessions, model_dir, keep=2) == 1  # v2; v3's files stay
    with sessions() as s:
        status = {r.version: (r.status, r.bundle_deleted_at is not None) for r in repo.list_model_versions(session=s)}
    assert status == {"v5": ("active", False), "v1": ("retired", False), "v4": ("retired", False),
                      "v3": ("retired", False), "v2": ("retired", True)}
    assert not staging.exists() and fresh.exists()
    monkeypatch.undo()
    assert prune_bundles(sessions, model_dir, keep=2) == 1 and not (model_dir / "pumps" / "v3").exists()
    engine.dispose()


def test_a_version_without_its_bundle_is_not_activated(db_url: str, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    _registry(db_url, model_dir)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    prune_bundles(sessions, model_dir, keep=10)
    with sessions() as s:
        with pytest.raises(repo.BundleDeleted, match="pumps-retired-0's bundle was deleted by retention"):
            repo.activate_model_version(session=s, version="pumps-retired-0")
        s.rollback()
        assert repo.active_model_versions(session=s)["pumps"].version == "pumps-active"
    with sessions.begin() as s:  # activated first: a prune that comes after it leaves the bundle alone
        row = repo.activate_model_version(session=s, version="pumps-retired-5")
        assert row.status == "active" and row.bundle_deleted_at is None
    with sessions.begin() as s:
        assert not repo.mark_bundle_deleted(session=s, version_id=row.id, now=ms_to_datetime(T0))
    engine.dispose()

    raw = config_dict(db_url)
    raw["model_dir"] = str(model_dir)
    path = tmp_path / "sensorwatch.yaml"
    path.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    refused = runner.invoke(app, ["models", "activate", "--config", str(path), "pumps-retired-0"])
    assert refused.exit_code == 2 and "pumps-retired-0's bundle was deleted by retention" in \
        " ".join(refused.output.split()), refused.output
    listed = runner.invoke(app, ["models", "list", "--config", str(path), "--format", "json"])
    deleted = {d["version"] for d in json.loads(listed.output) if d["bundle_deleted"]}
    assert deleted == {"pumps-retired-0", "pumps-retired-1", "pumps-retired-2", "pumps-rejected-0"}
    shown = runner.invoke(app, ["models", "show", "--config", str(path), "pumps-retired-0", "--format", "json"])
    assert json.loads(shown.output)["bundle_deleted_at"] is not None
    pruned = runner.invoke(app, ["db", "prune", "--config", str(path)])
    assert pruned.exit_code == 0 and "0 model bundles" in " ".join(pruned.output.split()), pruned.output
