"""Store on both databases: migrations, idempotent score inserts, alert upserts, restore queries, model registry."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from sqlalchemy import inspect, select, text
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.store import repo
from pipeline.store.db import (
    SchemaError,
    current_revision,
    make_engine,
    make_sessionmaker,
    pending_migrations,
    schema_problem,
    upgrade,
)
from pipeline.store.tables import ConsumerProgress, ModelVersion, WindowScore
from pipeline.types import AlertRecord, Score, datetime_to_ms, ms_to_datetime


def _score(asset: str, i: int, value: float = 1.0, version: str = "m1") -> Score:
    return Score(asset, "g", i * 1000, i * 1000 + 5000, value, 2.0, {"x": value}, version)


def test_migrations_create_schema_and_writes_are_idempotent(db_url: str) -> None:
    engine = make_engine(db_url)
    assert pending_migrations(engine)
    upgrade(db_url)
    upgrade(db_url)  # running it twice is harmless
    assert not pending_migrations(engine)
    assert {"model_versions", "window_scores", "alerts"} <= set(inspect(engine).get_table_names())
    sessions = make_sessionmaker(engine)
    scores = [_score("a", i, float(i)) for i in range(10)]
    with sessions.begin() as s:
        repo.insert_scores(session=s, scores=scores)
    with sessions.begin() as s:
        repo.insert_scores(session=s, scores=[*scores[5:], _score("a", 11)])  # replay + one new
        repo.insert_scores(session=s, scores=[_score("a", 3, version="m2")])  # a second model may rescore
    with sessions() as s:
        assert repo.count_scores(session=s) == 12
        recent = repo.recent_scores(session=s, assets=["a", "b"], limit=3)
        assert [repo.score_of(r).end_ms for r in recent["a"]] == [13000, 14000, 16000]
        assert "b" not in recent
        assert recent["a"][0].window_end.tzinfo is not None
        # an asset with fewer windows than asked for has no k-th latest (SQLite answers a DISTINCT ... OFFSET
        # subquery with its oldest instead); others have theirs
        assert repo.scores_prune_bound(session=s, asset="a", before=datetime.now(UTC), keep_latest=50,
                                       keep_span=timedelta(0)) is None
        assert repo.scores_prune_bound(session=s, asset="a", before=datetime.now(UTC), keep_latest=3,
                                       keep_span=timedelta(0)) == ms_to_datetime(13_000)
        everything = repo.recent_scores(session=s, assets=["a"], limit=50)["a"]  # fewer windows than asked for
        assert len(everything) == 11 and [r.model_version for r in everything].count("m1") == 11  # m2: a replay
    engine.dispose()


def test_alert_upsert_updates_one_row_per_incident(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    base = AlertRecord("a", "g", 1000, 5000, None, 3.0, 2.0, "warning", "open", 2,
                       [{"sensor": "x", "share": 1.0, "error": 3.0}], "m1")
    with sessions.begin() as s:
        repo.upsert_alerts(session=s, alerts=[base])
    later = AlertRecord("a", "g2", 1000, 9000, 9000, 9.0, 2.0, "critical", "resolved", 4,
                        [{"sensor": "x", "share": 1.0, "error": 9.0}], "m1")  # the group was renamed meanwhile
    with sessions.begin() as s:
        repo.upsert_alerts(session=s, alerts=[base, later])
    with sessions() as s:
        rows = repo.list_alerts(session=s)
        assert len(rows) == 1
        assert (rows[0].status, rows[0].severity, rows[0].window_count) == ("resolved", "critical", 4)
        assert repo.alert_record(rows[0]) == later
        assert repo.open_alerts(session=s, assets=["a"]) == []
        assert repo.list_alerts(session=s, status="open") == []
        assert [r.id for r in repo.list_alerts(session=s, group="g2")] == [rows[0].id]
    engine.dispose()


def test_activating_a_model_retires_the_previous_one(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    now = datetime.now(UTC)
    with sessions.begin() as s:
        for v in ("v1", "v2"):
            repo.add_model_version(session=s, version=ModelVersion(
                version=v, group_name="g", model_type="dense", status="candidate", created_at=now,
                artifact_path=f"/m/{v}", checksum="0" * 64, config_hash="h", threshold=1.0,
                threshold_method="percentile", windows_used=10, metrics={}))
        repo.activate_model_version(session=s, version="v1")
    with sessions.begin() as s:
        repo.activate_model_version(session=s, version="v2")
    with sessions() as s:
        assert repo.active_model_versions(session=s)["g"].version == "v2"
        statuses = {r.version: r.status for r in repo.list_model_versions(session=s)}
        assert statuses == {"v1": "retired", "v2": "active"}
        with pytest.raises(KeyError):
            repo.activate_model_version(session=s, version="nope")
    engine.dispose()


def test_migration_0004_adds_smoothed_scores_and_rolls_back(db_url: str) -> None:
    from dataclasses import replace


    upgrade(db_url)
    engine = make_engine(db_url)
    assert "smoothed_score" in {c["name"] for c in inspect(engine).get_columns("window_scores")}
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        repo.insert_scores(session=s, scores=[_score("a", 1, 3.0), replace(_score("a", 2, 3.0), smoothed=1.5)])
    with sessions() as s:
        stored = [repo.score_of(r) for r in repo.recent_scores(session=s, assets=["a"], limit=5)["a"]]
    assert [(x.smoothed, x.is_anomaly) for x in stored] == [(None, True), (1.5, False)]  # threshold 2.0
    engine.dispose()
    _assert_downgrade_drops(db_url, "0003", "smoothed_score")


def test_migration_0005_stores_aftermath_floors_and_finds_excursions(db_url: str) -> None:
    from dataclasses import replace

    from pipeline.types import ms_to_datetime

    upgrade(db_url)
    engine = make_engine(db_url)
    assert "aftermath_floor" in {c["name"] for c in inspect(engine).get_columns("window_scores")}
    sessions = make_sessionmaker(engine)
    scores = [
        _score("a", 1, 9.0),  # 4.5x the threshold of 2.0: an excursion for relative 0.3 (beyond 1 / 0.3)...
        replace(_score("a", 2, 3.0), smoothed=8.0),  # ...and so is a smoothed level of 4x (the level counts)
        _score("a", 3, 6.0),  # 3x: cannot raise the bar at relative 0.3
        replace(_score("a", 4, 8.0), aftermath_floor=9.0),  # 4x but under its raised bar: not an exceeding window
        _score("a", 5, 2.5, version="m1"), _score("a", 5, 12.0, version="m2"),  # the first row counts, not the replay
        _score("a", 6, 20.0),  # 10x, but in no incident (a lone window)
        _score("b", 1, 50.0),
    ]
    incidents = [AlertRecord("a", "g", 1_000, 10_000, None, 12.0, 2.0, "critical", "open", 5, [], "m1"),
                 AlertRecord("b", "g", 1_000, 6_000, 7_000, 50.0, 2.0, "critical", "resolved", 1, [], "m1")]
    with sessions.begin() as s:
        repo.insert_scores(session=s, scores=scores)
        repo.upsert_alerts(session=s, alerts=incidents)
    with sessions() as s:
        stored = [repo.score_of(r) for r in repo.recent_scores(session=s, assets=["a"], limit=4)["a"]]
        found = repo.excursions(session=s, since={"a": ms_to_datetime(5_000)}, relative=0.3)
        since = {"a": ms_to_datetime(7_000), "b": ms_to_datetime(6_000)}
        later = repo.excursions(session=s, since=since, relative=0.3)
        chunked = repo.excursions(session=s, since=since, relative=0.3, chunk=1)
        loose = repo.excursions(session=s, since={"a": ms_to_datetime(0)}, relative=0.6)
    assert [(x.end_ms, x.score, x.aftermath_floor, x.is_anomaly) for x in stored] == [
        (8_000, 6.0, None, True), (9_000, 8.0, 9.0, False), (10_000, 2.5, None, True),  # the first row: what was judged
        (11_000, 20.0, None, True)]
    assert [(datetime_to_ms(r.window_end), r.model_version) for r in found["a"]] == [(6_000, "m1"), (7_000, "m1")]
    assert {a: [datetime_to_ms(r.window_end) for r in rows] for a, rows in later.items()} == {
        "a": [7_000], "b": [6_000]}  # each asset from its own start
    assert {a: [r.id for r in rows] for a, rows in chunked.items()} == {a: [r.id for r in rows]
                                                                         for a, rows in later.items()}
    assert [datetime_to_ms(r.window_end) for r in loose["a"]] == [6_000, 7_000, 8_000]  # above 1 / 0.6 = 1.67x
    engine.dispose()
    _assert_downgrade_drops(db_url, "0004", "aftermath_floor")


def test_migration_0006_round_trips_drift_offsets_exactly(db_url: str) -> None:
    from dataclasses import replace

    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    offset = {"x": 0.1 + 0.2, "y": -1234.5678901234567, "z": 1e-300}  # values a decimal rounding would change
    with sessions.begin() as s:
        repo.insert_scores(session=s, scores=[_score("a", 1), replace(_score("a", 2), drift_offset=offset)])
    with sessions() as s:
        stored = [repo.score_of(r) for r in repo.recent_scores(session=s, assets=["a"], limit=5)["a"]]
    assert [x.drift_offset for x in stored] == [None, offset]  # bit for bit: a restart resumes from it
    engine.dispose()
    _assert_downgrade_drops(db_url, "0005", "drift_offset")


def test_flagged_and_last_scored_windows_for_the_retrain(db_url: str) -> None:
    from dataclasses import replace

    from pipeline.types import ms_to_datetime

    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    scores = [
        _score("a", 1, 1.0),  # below the threshold of 2.0
        _score("a", 2, 3.0),  # anomalous
        replace(_score("a", 3, 3.0), aftermath_floor=4.0),  # held back by the aftermath rule: above the threshold
        replace(_score("a", 4, 1.0), smoothed=2.5),  # its smoothed level above the threshold
        replace(_score("a", 5, 3.0), smoothed=1.0),  # its raw score above, the smoothed level (what counts) below
        _score("b", 9, 1.0),
        replace(_score("c", 1, 9.0), group="other"),
    ]
    with sessions.begin() as s:
        repo.insert_scores(session=s, scores=scores)
    with sessions() as s:
        flagged = repo.flagged_windows(session=s, group="g", assets=["a", "b", "c"], start=ms_to_datetime(0),
                                       end=ms_to_datetime(20_000))
        last = repo.last_scored_windows(session=s, group="g", assets=["a", "b", "c"])
    assert flagged == {("a", 7_000), ("a", 8_000), ("a", 9_000)}
    assert last == {"a": 10_000, "b": 14_000}
    engine.dispose()


def test_migration_0008_marks_deleted_bundles_and_rolls_back(db_url: str) -> None:
    """Rows registered before 0008 read as bundles still on disk; the column goes with a downgrade and comes back."""
    upgrade(db_url, "0007")
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO model_versions (version, group_name, model_type, status, created_at, artifact_path, checksum,"
            " config_hash, threshold, threshold_method, windows_used, metrics) VALUES ('g-1', 'g', 'dense', 'retired',"
            " '2026-01-01 00:00:00+00:00', '/m/g/g-1', 'c', 'h', 1.0, 'percentile', 10, '{}')"))
    engine.dispose()
    upgrade(db_url)
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as s:
        row = repo.get_model_version(session=s, version="g-1")
        assert row is not None and row.bundle_deleted_at is None
        assert [r.version for r in repo.bundle_prune_candidates(session=s, keep=1, now=datetime.now(UTC))] == []
        assert [r.version for r in repo.bundle_prune_candidates(session=s, keep=0, now=datetime.now(UTC))] == ["g-1"]
    engine.dispose()
    _assert_downgrade_drops(db_url, "0007", "bundle_deleted_at", table="model_versions")


def test_migration_0009_keeps_alert_error_sums_unrounded(db_url: str) -> None:
    """Alerts written before 0009 read without error sums (they resume from their listed sensors); after it, every
    sensor's sum round-trips exactly, and an update replaces it."""
    upgrade(db_url, "0008")
    _insert_old_alert(db_url)
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    sums = {"x": 0.1 + 0.2, "y": 1 / 3, "z": 2.4691280000000003e-07}
    record = AlertRecord("a", "g", 1000, 5000, None, 3.0, 2.0, "warning", "open", 2,
                         [{"sensor": "x", "share": 0.47, "error": 0.3}], "m1", error_sums=sums)
    with sessions.begin() as s:
        repo.upsert_alerts(session=s, alerts=[record])
    with sessions() as s:
        stored = {r.asset: repo.alert_record(r) for r in repo.open_alerts(session=s, assets=["a", "old"])}
    assert stored["old"].error_sums is None
    assert stored["a"] == record and stored["a"].error_sums == sums  # exact, not rounded
    with sessions.begin() as s:
        repo.upsert_alerts(session=s, alerts=[replace(record, last_seen_ms=6000, error_sums={"x": 1.5, "y": 0.5})])
    with sessions() as s:
        assert repo.alert_record(repo.open_alerts(session=s, assets=["a"])[0]).error_sums == {"x": 1.5, "y": 0.5}
    engine.dispose()
    _assert_downgrade_drops(db_url, "0008", "sensor_error_sums", table="alerts")


def test_migration_0011_keeps_the_sensors_far_outside_training(db_url: str) -> None:
    """Alerts written before 0011 read with none; after it the signed distances round-trip, an update replaces
    them, and `alerts show`'s dict gives them as data and as text, farthest first."""
    from pipeline.alert_format import alert_dict

    upgrade(db_url, "0010")
    _insert_old_alert(db_url)
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    record = AlertRecord("a", "g", 1000, 5000, None, 3.0, 2.0, "warning", "open", 2,
                         [{"sensor": "current", "share": 0.33, "error": 0.3}], "m1", off_training={
                             "vibration": 39.5, "flow": -57.9})
    with sessions.begin() as s:
        repo.upsert_alerts(session=s, alerts=[record])
    with sessions() as s:
        rows = {r.asset: r for r in repo.open_alerts(session=s, assets=["a", "old"])}
        assert repo.alert_record(rows["old"]).off_training is None and repo.alert_record(rows["a"]) == record
        assert alert_dict(rows["a"])["off_training"] == {"vibration": 39.5, "flow": -57.9}
        assert alert_dict(rows["a"], flat=True)["off_training"] == "flow -57.9 std, vibration +39.5 std"
        assert alert_dict(rows["old"], flat=True)["off_training"] == ""
    with sessions.begin() as s:
        repo.upsert_alerts(session=s, alerts=[replace(record, last_seen_ms=6000, off_training={"flow": -60.2})])
    with sessions() as s:
        assert repo.alert_record(repo.open_alerts(session=s, assets=["a"])[0]).off_training == {"flow": -60.2}
    engine.dispose()
    _assert_downgrade_drops(db_url, "0010", "off_training", table="alerts")


def test_migration_0010_records_pipeline_processes_and_rolls_back(db_url: str) -> None:
    """A process's row is written once and updated in place (its start kept), removed when it stops; rows not seen
    for a week go with the next write; a downgrade drops the table and an upgrade brings it back."""
    from alembic import command

    from pipeline.store.db import alembic_config

    upgrade(db_url, "0009")
    assert "pipeline_instances" not in inspect(make_engine(db_url)).get_table_names()
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    start = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
    with sessions.begin() as s:
        repo.report_instance(session=s, instance="old-host-1-aa", consumer_group="sw", started_at=start - timedelta(
            days=9), now=start - timedelta(days=8), serving={"g": "g-0"}, unserved={})
        repo.report_instance(session=s, instance="h-1-bb", consumer_group="sw", started_at=start, now=start,
                             serving={"g": "g-1"}, unserved={"f": "no active model (sensorwatch train)"})
    with sessions.begin() as s:
        repo.report_instance(session=s, instance="h-1-bb", consumer_group="sw", started_at=start + timedelta(hours=1),
                             now=start + timedelta(seconds=30), serving={"g": "g-2", "f": "f-1"}, unserved={})
    with sessions() as s:
        (row,) = repo.list_instances(session=s)  # the week-old row went with the write
        assert (row.instance, row.started_at, row.seen_at, row.serving, row.unserved) == (
            "h-1-bb", start, start + timedelta(seconds=30), {"g": "g-2", "f": "f-1"}, {})
    with sessions.begin() as s:
        repo.remove_instance(session=s, instance="h-1-bb")
    with sessions() as s:
        assert repo.list_instances(session=s) == []
    engine.dispose()
    command.downgrade(alembic_config(db_url), "0009")
    engine = make_engine(db_url)
    assert "pipeline_instances" not in inspect(engine).get_table_names() and pending_migrations(engine)
    engine.dispose()
    upgrade(db_url)
    engine = make_engine(db_url)
    assert "pipeline_instances" in inspect(engine).get_table_names()
    engine.dispose()


def _insert_old_alert(db_url: str) -> None:
    """An open alert of asset ``old`` with only the columns every revision has (one written before an upgrade)."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO alerts (asset, group_name, opened_at, last_seen_at, peak_score, threshold, severity, status,"
            " window_count, top_sensors, model_version, updated_at) VALUES ('old', 'g', '2026-01-01 00:00:00+00:00',"
            " '2026-01-01 00:01:00+00:00', 3.0, 1.0, 'warning', 'open', 2, '[]', 'm1', '2026-01-01 00:01:00+00:00')"))
    engine.dispose()


def _assert_downgrade_drops(db_url: str, revision: str, column: str, table: str = "window_scores") -> None:
    """Downgrading to ``revision`` drops ``table.column`` and leaves migrations pending; upgrading again restores
    head."""
    from alembic import command

    from pipeline.store.db import alembic_config

    command.downgrade(alembic_config(db_url), revision)
    engine = make_engine(db_url)
    assert column not in {c["name"] for c in inspect(engine).get_columns(table)}
    assert pending_migrations(engine)
    engine.dispose()
    upgrade(db_url)
    engine = make_engine(db_url)
    assert column in {c["name"] for c in inspect(engine).get_columns(table)}
    engine.dispose()


def test_recent_scores_and_history_keep_the_judged_row_of_rescored_windows(db_url: str) -> None:
    """Windows re-scored by three later model versions (replays the alert engine skipped): the restore and the
    history read the first row of each window, and still as many windows as asked for."""
    from pipeline.types import ms_to_datetime

    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        repo.insert_scores(session=s, scores=[_score("a", i, 1.0, "v1") for i in range(10)])
    with sessions.begin() as s:
        for version in ("v2", "v3", "v4"):
            repo.insert_scores(session=s, scores=[_score("a", i, 9.0, version) for i in range(10)])
    with sessions() as s:
        recent = repo.recent_scores(session=s, assets=["a"], limit=5)["a"]
        history = repo.scores_between(session=s, asset="a", start=ms_to_datetime(0), end=ms_to_datetime(20_000))
    assert [(datetime_to_ms(r.window_end), r.model_version) for r in recent] == [(i * 1000 + 5000, "v1")
                                                                                 for i in range(5, 10)]
    assert [r.model_version for r in history] == ["v1"] * 10
    engine.dispose()


def _db_cli(db_url: str, tmp_path: Path, *args: str) -> tuple[int, str]:
    """Run ``sensorwatch db ARGS`` on a one-group configuration of ``db_url``; (exit code, output on one line)."""
    path = tmp_path / "sensorwatch.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": db_url},
                                    "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}))
    result = CliRunner().invoke(app, ["db", *args, "--config", str(path)])
    return result.exit_code, " ".join(result.output.split())


def test_a_failed_upgrade_rolls_back_whole_and_can_run_again(db_url: str, tmp_path: Path) -> None:
    """Two active versions of one group (possible before 0003) break 0003's unique index half way through the
    upgrade: the database stays at 0002 with none of the new tables (SQLite commits DDL by itself unless told not
    to), and once the rows are mended the same command reaches head."""
    upgrade(db_url, "0002")
    engine = make_engine(db_url)
    before = set(inspect(engine).get_table_names())
    now = datetime.now(UTC)
    row = {"group_name": "g", "model_type": "dense", "status": "active", "created_at": now, "activated_at": now,
           "artifact_path": "/m", "checksum": "c", "config_hash": "h", "threshold": 1.0, "threshold_method": "p",
           "data_start": now, "data_end": now, "windows_used": 1, "metrics": {}}
    with engine.begin() as conn:
        conn.execute(ModelVersion.__table__.insert(), [{**row, "version": "g-v1"}, {**row, "version": "g-v2"}])
    code, out = _db_cli(db_url, tmp_path, "upgrade")
    assert code == 1 and "the upgrade failed and was rolled back, the database stays at revision 0002" in out, out
    assert set(inspect(engine).get_table_names()) == before and current_revision(engine) == "0002"
    with engine.begin() as conn:
        conn.execute(ModelVersion.__table__.update().where(ModelVersion.version == "g-v1").values(status="retired"))
    code, out = _db_cli(db_url, tmp_path, "upgrade")
    assert code == 0 and "(the newest revision), upgraded from 0002" in " ".join(out.split()), out
    assert not pending_migrations(engine)
    code, out = _db_cli(db_url, tmp_path, "upgrade")
    assert code == 0 and "(the newest revision), already there" in " ".join(out.split()), out
    engine.dispose()


def test_an_upgrade_across_several_migrations_that_fails_in_the_last_keeps_none(db_url: str, tmp_path: Path) -> None:
    """0003-0006 succeed, 0007 meets a table in its way: the database stays at 0002, as on PostgreSQL (Alembic
    commits after every SQLite migration unless told that its DDL is transactional)."""
    upgrade(db_url, "0002")
    engine = make_engine(db_url)
    before = set(inspect(engine).get_table_names())
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE alert_outbox (id INTEGER PRIMARY KEY)"))
    code, out = _db_cli(db_url, tmp_path, "upgrade")
    assert code == 1 and "the database stays at revision 0002" in out, out
    assert set(inspect(engine).get_table_names()) == before | {"alert_outbox"} and current_revision(engine) == "0002"
    engine.dispose()


def test_a_schema_newer_than_this_code_or_a_downgrade_target_is_named(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url, "0002")
    upgrade(db_url, "+1")  # relative targets go up as Alembic's do
    code, out = _db_cli(db_url, tmp_path, "upgrade", "--revision", "0003+1")
    assert code == 0 and "database at 0004" in out, out
    upgrade(db_url)
    code, out = _db_cli(db_url, tmp_path, "upgrade", "--revision", "0003")
    assert code == 2 and "past 0003: 'db upgrade' never goes back" in out, out
    for target in ("0099", "base", "-1"):
        code, out = _db_cli(db_url, tmp_path, "upgrade", "--revision", target)
        assert code == 2 and f"unknown revision '{target}' (known: 0001, 0002," in out, out
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    problem = schema_problem(engine)
    assert problem is not None and "revision 0099, which this version of sensorwatch does not know" in problem
    code, out = _db_cli(db_url, tmp_path, "upgrade")
    assert code == 2 and "a newer sensorwatch upgraded it" in out, out
    with pytest.raises(SchemaError, match="0099"):
        upgrade(db_url)
    engine.dispose()


def test_sqlite_write_ahead_log_is_cut_back_after_it_grew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader holding an old snapshot while rows are written grows SQLite's log; once the reader is done and a
    checkpoint has run, the next write cuts the file back to the limit instead of keeping its size for ever."""
    monkeypatch.setattr("pipeline.store.db.SQLITE_WAL_LIMIT_BYTES", 256 * 1024)
    path = tmp_path / "wal.db"
    engine = make_engine(f"sqlite:///{path}")
    wal = Path(f"{path}-wal")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB)"))
        with engine.connect() as reader:
            reader.execute(text("BEGIN"))
            reader.execute(text("SELECT count(*) FROM t")).scalar()  # holds its snapshot until the rollback
            for _ in range(40):
                with engine.begin() as conn:
                    conn.execute(text("INSERT INTO t (payload) VALUES (:p)"), {"p": b"x" * 100_000})
            reader.execute(text("ROLLBACK"))
        grown = wal.stat().st_size
        assert grown > 3_000_000
        with engine.begin() as conn:
            conn.execute(text("PRAGMA wal_checkpoint(PASSIVE)"))
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t (payload) VALUES (:p)"), {"p": b"y"})
        assert wal.stat().st_size <= 256 * 1024, (grown, wal.stat().st_size)
    finally:
        engine.dispose()


def test_migration_0012_keeps_each_scores_sensors_far_outside_training(db_url: str) -> None:
    """A score's off_training round-trips (none stored as NULL, read as none, as for rows written before 0012)."""
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    far = Score("a", "g", 0, 4000, 9.0, 1.0, {"x": 9.0}, "m1", off_training={"x": -12.5})
    near = Score("a", "g", 2000, 6000, 0.5, 1.0, {"x": 0.5}, "m1")
    with sessions.begin() as s:
        repo.insert_scores(session=s, scores=[far, near])
    with sessions() as s:
        rows = s.scalars(select(WindowScore).order_by(WindowScore.window_end)).all()
        assert [r.off_training for r in rows] == [{"x": -12.5}, None]
        assert [repo.score_of(r) for r in rows] == [far, near]
    engine.dispose()
    _assert_downgrade_drops(db_url, "0011", "off_training")


def test_migration_0013_ties_progress_to_the_topics_id(db_url: str) -> None:
    """Progress recorded under another topic id is forgotten (the topic was re-created), progress of the same id
    kept, and progress recorded before ids (NULL) stamped with the current one and reported as unsure; every
    consumer group's rows alike."""
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        for group, topic_id in (("old", "id-1"), ("older", None), ("new", "id-2")):
            repo.claim_partitions(session=s, consumer_group=group, topic="t", partitions=[0, 1, 2], owner=group,
                                  topic_id=topic_id)
            repo.save_consumer_progress(session=s, consumer_group=group, topic="t", owner=group,
                                        processed={0: 40, 1: 50, 2: 60})
    with sessions.begin() as s:
        forgotten, unsure = repo.reconcile_topic_id(session=s, topic="t", topic_id="id-2", partitions=[0, 1])
    assert forgotten == {0: 40, 1: 50} and unsure == {0, 1}
    with sessions() as s:
        rows = {(r.consumer_group, r.partition): (r.processed_upto, r.topic_id) for r in s.scalars(
            select(ConsumerProgress))}
    assert rows == {("old", 0): (-1, "id-2"), ("old", 1): (-1, "id-2"), ("old", 2): (60, "id-1"),
                    ("older", 0): (40, "id-2"), ("older", 1): (50, "id-2"), ("older", 2): (60, None),
                    ("new", 0): (40, "id-2"), ("new", 1): (50, "id-2"), ("new", 2): (60, "id-2")}
    engine.dispose()
    _assert_downgrade_drops(db_url, "0012", "topic_id", table="consumer_progress")


def test_times_that_hosts_compare_are_on_the_database_clock(pg_database_url: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A process's seen_at and a model's activation time come from PostgreSQL's clock, not the writing host's: a
    host an hour behind would otherwise look gone to every `check`, and its activations an hour old."""
    class HourBehind(datetime):
        @classmethod
        def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
            return datetime.now(tz) - timedelta(hours=1)  # type: ignore[arg-type]

    upgrade(pg_database_url)
    engine = make_engine(pg_database_url)
    sessions = make_sessionmaker(engine)
    monkeypatch.setattr(repo, "datetime", HourBehind)
    with sessions.begin() as s:
        server = s.scalar(text("SELECT now()"))
        assert abs((repo.database_now(session=s) - server).total_seconds()) < 5
        repo.add_model_version(session=s, version=ModelVersion(
            version="v1", group_name="g", model_type="dense", status="candidate", created_at=server,
            artifact_path="/m/v1", checksum="0" * 64, config_hash="h", threshold=1.0,
            threshold_method="percentile", windows_used=10, metrics={}))
        activated = repo.activate_model_version(session=s, version="v1").activated_at
        repo.report_instance(session=s, instance="h-1", consumer_group="sw", started_at=server,
                             now=repo.database_now(session=s), serving={"g": "v1"}, unserved={})
    assert activated is not None and abs((activated - server).total_seconds()) < 5
    path = tmp_path / "sensorwatch.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": pg_database_url},
                                    "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}))
    result = CliRunner().invoke(app, ["models", "serving", "--format", "json", "--config", str(path)])
    engine.dispose()
    assert result.exit_code == 0, result.output
    assert [(p["instance"], p["live"]) for p in json.loads(result.output)] == [("h-1", True)]


def test_processes_and_commands_on_hosts_with_clocks_off_judge_by_the_database_clock(
        pg_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline on a host an hour behind writes seen_at from PostgreSQL's clock, and `models serving`, `models
    list` and `check` on a host an hour ahead judge it by that clock too: the process is live and serves v1."""
    import threading

    from pipeline import cli, preflight, runner
    from pipeline.config import parse_config
    from pipeline.runner import Runner

    def shifted(hours: int) -> type[datetime]:
        class Shifted(datetime):
            @classmethod
            def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
                return datetime.now(tz) + timedelta(hours=hours)  # type: ignore[arg-type]
        return Shifted

    upgrade(pg_database_url)
    engine = make_engine(pg_database_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        server = s.scalar(text("SELECT now()"))
        repo.add_model_version(session=s, version=ModelVersion(
            version="v1", group_name="g", model_type="dense", status="candidate", created_at=server,
            artifact_path="/m/v1", checksum="0" * 64, config_hash="h", threshold=1.0,
            threshold_method="percentile", windows_used=10, metrics={}))
        repo.activate_model_version(session=s, version="v1")
    raw = {"database": {"url": pg_database_url}, "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}
    monkeypatch.setattr(runner, "datetime", shifted(-1))
    monkeypatch.setattr(repo, "datetime", shifted(-1))
    process = Runner(parse_config(raw, env={}), sessions=sessions, detectors={"g": SimpleNamespace(version="v1")},
                     producer=None, stop=threading.Event())  # type: ignore[dict-item,arg-type]
    process.report_serving()
    with sessions() as s:
        (row,) = repo.list_instances(session=s)
        assert abs((row.seen_at - s.scalar(text("SELECT now()"))).total_seconds()) < 5
        assert abs((row.started_at - s.scalar(text("SELECT now()"))).total_seconds()) < 5  # started just now
    engine.dispose()

    for module in (cli, preflight, repo):
        monkeypatch.setattr(module, "datetime", shifted(1))
    path = tmp_path / "sensorwatch.yaml"
    path.write_text(yaml.safe_dump(raw))
    serving = CliRunner().invoke(app, ["models", "serving", "--format", "json", "--config", str(path)])
    listed = CliRunner().invoke(app, ["models", "list", "--format", "json", "--config", str(path)])
    assert serving.exit_code == 0 and listed.exit_code == 0, serving.output + listed.output
    assert [p["live"] for p in json.loads(serving.output)] == [True]
    assert [m["served_by"] for m in json.loads(listed.output)] == [1]
    (pipelines,) = [c for c in preflight._database_and_models(parse_config(raw, env={})) if c.name == "pipelines"]
    assert (pipelines.status, pipelines.detail) == ("ok", "1 running, serving g=v1")
