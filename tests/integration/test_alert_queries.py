"""Alert queries on both databases: migration 0002 (ack columns and views), list filters, acknowledgement, the SQL
views, and the ``alerts list/show/ack`` commands."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alert_data import T0, fleet, make_config, write_config
from sqlalchemy import inspect, text
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.store import repo
from pipeline.store.db import alembic_config, make_engine, make_sessionmaker, upgrade
from pipeline.types import ms_to_datetime

VIEWS = {"open_alerts", "alerts_per_asset_day", "alert_top_sensors"}
ACK_COLUMNS = {"acknowledged_by", "acknowledged_at", "ack_comment"}
START = ms_to_datetime(T0)


@pytest.fixture
def loaded(db_url: str) -> tuple[str, int, int, int]:
    """A database at head holding the synthetic fleet, and the ids of its alerts: A (pump-1, warning, resolved),
    B (pump-1, critical, resolved), C (pump-2, warning, open). Ids are not 1, 2, 3 on PostgreSQL: every upsert
    draws from the sequence."""
    upgrade(db_url)
    events = fleet(db_url, make_config(db_url))
    assert [(e.alert.asset, e.alert.severity) for e in events if e.kind == "opened"] == [
        ("pump-1", "warning"), ("pump-1", "critical"), ("pump-2", "warning")]
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as s:
        c, b, a = (r.id for r in repo.list_alerts(session=s))
    engine.dispose()
    return db_url, a, b, c


def test_migration_0002_adds_ack_columns_and_views_and_downgrades(db_url: str) -> None:
    upgrade(db_url, "0001")
    engine = make_engine(db_url)
    assert not VIEWS & set(inspect(engine).get_view_names())
    upgrade(db_url)
    engine.dispose()
    engine = make_engine(db_url)
    assert set(inspect(engine).get_view_names()) >= VIEWS
    assert {c["name"] for c in inspect(engine).get_columns("alerts")} >= ACK_COLUMNS
    engine.dispose()
    command.downgrade(alembic_config(db_url), "0001")
    engine = make_engine(db_url)
    assert not VIEWS & set(inspect(engine).get_view_names())
    assert not ACK_COLUMNS & {c["name"] for c in inspect(engine).get_columns("alerts")}
    engine.dispose()
    upgrade(db_url)  # and up again


def test_list_filters(loaded: tuple[str, int, int, int]) -> None:
    url, a, b, c = loaded
    engine = make_engine(url)
    with make_sessionmaker(engine)() as s:
        def ids(**filters: Any) -> list[int]:
            return [r.id for r in repo.list_alerts(session=s, **filters)]

        assert a < b < c  # newest first:
        assert ids(asset="pump-1") == [b, a] and ids(asset="pump-3") == []
        assert ids(group="pumps") == [c, b, a] and ids(group="fans") == []
        assert ids(status="open") == [c] and ids(status="resolved") == [b, a]
        assert ids(severity="critical") == [b]
        assert ids(since=START + timedelta(hours=3)) == [c]  # active since: last seen at or after
        assert ids(until=START + timedelta(hours=1)) == [a]  # opened before
        assert ids(since=START + timedelta(hours=2), until=START + timedelta(hours=3)) == [b]
        assert ids(limit=2) == [c, b] and len(repo.list_alerts(session=s, limit=None)) == 3
        assert ids(acknowledged=True) == [] and ids(acknowledged=False) == [c, b, a]
    engine.dispose()


def test_acknowledge_survives_pipeline_updates(loaded: tuple[str, int, int, int]) -> None:
    url, _, _, c = loaded
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    when = datetime(2026, 3, 1, 4, 30, tzinfo=UTC)
    with sessions.begin() as s:
        row = repo.acknowledge_alert(session=s, alert_id=c, by="alice", comment="checking the coupling", now=when)
        assert row.acknowledged_by == "alice"
        with pytest.raises(KeyError):
            repo.acknowledge_alert(session=s, alert_id=10**9, by="bob")
    with sessions.begin() as s:  # the pipeline updates the open alert: the ack stays
        stored = repo.get_alert(session=s, alert_id=c)
        assert stored is not None
        record = repo.alert_record(stored)
        repo.upsert_alerts(session=s, alerts=[replace(record, window_count=record.window_count + 1)])
    with sessions() as s:
        row = repo.get_alert(session=s, alert_id=c)
        assert row is not None and row.window_count == record.window_count + 1
        assert (row.acknowledged_by, row.acknowledged_at, row.ack_comment) == ("alice", when, "checking the coupling")
        assert [r.id for r in repo.list_alerts(session=s, acknowledged=True)] == [c]
    engine.dispose()


def test_views(loaded: tuple[str, int, int, int]) -> None:
    url, a, b, c = loaded
    engine = make_engine(url)
    with make_sessionmaker(engine).begin() as s:
        repo.acknowledge_alert(session=s, alert_id=b, by="bob", comment="bearing replaced")
    with engine.connect() as conn:
        open_rows = conn.execute(text("SELECT * FROM open_alerts")).mappings().all()
        assert [(r["id"], r["asset"], r["top_sensor"], r["acknowledged"]) for r in open_rows] == [
            (c, "pump-2", "speed", 0)]
        row = open_rows[0]
        assert row["peak_ratio"] == pytest.approx(row["peak_score"] / row["threshold"])
        assert row["duration_s"] == pytest.approx((row["window_count"] - 1) * 50 + 300, abs=1)  # first start to end
        assert 0.5 < row["top_share"] <= 1

        per_day = conn.execute(text(
            "SELECT asset, day, alerts, still_open, acknowledged, critical, windows, max_peak_ratio "
            "FROM alerts_per_asset_day ORDER BY asset")).mappings().all()
        assert [(r["asset"], str(r["day"])[:10], r["alerts"], r["still_open"], r["acknowledged"], r["critical"])
                for r in per_day] == [("pump-1", "2026-03-01", 2, 0, 1, 1), ("pump-2", "2026-03-01", 1, 1, 0, 0)]
        assert per_day[0]["max_peak_ratio"] > 5 and per_day[0]["windows"] == 21 + 41

        sensors = conn.execute(text(
            "SELECT alert_id, rank, sensor, share FROM alert_top_sensors ORDER BY alert_id, rank")).all()
        assert [(a, r, name) for a, r, name, _ in sensors] == [
            (a, 1, "vibration"), (a, 2, "speed"), (b, 1, "bearing_temp"), (b, 2, "vibration"), (c, 1, "speed"),
            (c, 2, "vibration")]
        # the documented example: which sensors cause most alert time
        top = conn.execute(text(
            "SELECT sensor, COUNT(*) AS alerts FROM alert_top_sensors WHERE rank = 1 GROUP BY sensor "
            "ORDER BY alerts DESC, sensor")).all()
        assert [tuple(t) for t in top] == [("bearing_temp", 1), ("speed", 1), ("vibration", 1)]
    engine.dispose()


def test_restore_queries(loaded: tuple[str, int, int, int]) -> None:
    url, _, b, _ = loaded
    engine = make_engine(url)
    with make_sessionmaker(engine)() as s:
        last = repo.last_resolved_alerts(session=s, assets=["pump-1", "pump-2", "pump-3"])
        assert [(r.asset, r.id) for r in last] == [("pump-1", b)]
        window = repo.scores_between(session=s, asset="pump-1", start=START + timedelta(minutes=10),
                                     end=START + timedelta(minutes=20))
        assert [r.window_end for r in window] == [START + timedelta(minutes=10, seconds=50 * i) for i in range(13)]
    engine.dispose()


def test_cli_list_show_ack(loaded: tuple[str, int, int, int], tmp_path: Path) -> None:
    url, a, b, c = loaded
    config = str(write_config(tmp_path / "c.yaml", url))
    cli = CliRunner()

    listed = cli.invoke(app, ["alerts", "list", "-c", config, "--format", "json", "--asset", "pump-1",
                              "--severity", "critical"])
    assert listed.exit_code == 0, listed.output
    (alert,) = json.loads(listed.output)
    assert alert["id"] == b and alert["status"] == "resolved" and alert["top_sensors"][0]["sensor"] == "bearing_temp"

    as_csv = cli.invoke(app, ["alerts", "list", "-c", config, "--format", "csv", "--status", "open"])
    lines = as_csv.output.strip().splitlines()
    assert lines[0].startswith("id,asset,group,status,severity,opened_at") and len(lines) == 2
    assert lines[1].startswith(f"{c},pump-2,pumps,open,warning,")

    table = cli.invoke(app, ["alerts", "list", "-c", config, "--since", "2026-03-01T02:00:00", "--until",
                             "2026-03-01T03:00"])
    assert table.exit_code == 0 and "pump-1" in table.output and "bearing_temp 95%" in table.output
    assert "alerts (1)" in table.output

    bad = cli.invoke(app, ["alerts", "list", "-c", config, "--status", "closed"])
    assert bad.exit_code == 2
    typo = cli.invoke(app, ["alerts", "list", "-c", config, "--asset", "pmup-1"])
    assert typo.exit_code == 0 and "asset 'pmup-1' is in no group" in " ".join(typo.output.split())
    quiet = cli.invoke(app, ["alerts", "list", "-c", config, "--asset", "pump-3"])  # configured, no alerts: no note
    assert quiet.exit_code == 0 and "note" not in quiet.output

    comment = "on site at 10:00 [motor]"
    acked = cli.invoke(app, ["alerts", "ack", "-c", config, str(c), "--by", "carol", "--comment", comment])
    assert acked.exit_code == 0, acked.output
    assert cli.invoke(app, ["alerts", "ack", "-c", config, "424242", "--by", "carol"]).exit_code == 2
    unacked = cli.invoke(app, ["alerts", "list", "-c", config, "--format", "json", "--unacknowledged"])
    assert [x["id"] for x in json.loads(unacked.output)] == [b, a]

    shown = cli.invoke(app, ["alerts", "show", "-c", config, str(c), "--format", "json", "--context", "4"])
    assert shown.exit_code == 0, shown.output
    detail = json.loads(shown.output)
    assert detail["alert"]["acknowledged_by"] == "carol" and detail["alert"]["ack_comment"] == comment
    history = detail["history"]
    inside = [h for h in history if h["in_alert"]]
    assert len(history) == len(inside) + 4  # 4 windows of context before; the alert is still open at the end
    assert all(h["above"] for h in inside) and not any(h["above"] for h in history[:4])
    assert inside[0]["window_start"] == detail["alert"]["opened_at"]
    assert inside[-1]["window_end"] == detail["alert"]["last_seen_at"]

    text_out = cli.invoke(app, ["alerts", "show", "-c", config, str(b), "--max-rows", "10"])
    assert text_out.exit_code == 0
    for expected in (f"alert #{b}", "critical", "bearing_temp", "score history", "...", "top sensors"):
        assert expected in text_out.output
    assert cli.invoke(app, ["alerts", "show", "-c", config, "424242"]).exit_code == 2
    acked_out = cli.invoke(app, ["alerts", "show", "-c", config, str(c)])
    assert "carol" in acked_out.output and comment in acked_out.output  # shown as text, not as rich markup

    # names and comments are shown as written: a "[/red]" is not markup (it broke every alerts list), and a comment
    # that starts like a spreadsheet formula is quoted in CSV
    marked = cli.invoke(app, ["alerts", "ack", "-c", config, str(a), "--by", "[/red]",
                              "--comment", "=cmd|'/c calc'!A1"])
    assert marked.exit_code == 0, marked.output
    listed = cli.invoke(app, ["alerts", "list", "-c", config])
    assert listed.exit_code == 0, listed.output
    assert "[/red]" in listed.output
    assert "[/red]" in cli.invoke(app, ["alerts", "show", "-c", config, str(a)]).output
    as_csv = cli.invoke(app, ["alerts", "list", "-c", config, "--format", "csv"]).output
    assert "'=cmd|'/c calc'!A1" in as_csv and ",=cmd" not in as_csv

    # the sensors far outside their training data: shown under the top sensors, in the list, in CSV and JSON
    engine = make_engine(url)
    with make_sessionmaker(engine).begin() as s:
        (row,) = [r for r in repo.open_alerts(session=s, assets=["pump-2"]) if r.id == c]
        repo.upsert_alerts(session=s, alerts=[replace(repo.alert_record(row), off_training={
            "vibration": 39.5, "speed": -57.9})])
    engine.dispose()
    shown_text = " ".join(cli.invoke(app, ["alerts", "show", "-c", config, str(c)], env={"COLUMNS": "200"})
                          .output.split())
    assert "far outside training" in shown_text and "speed -57.9 std, vibration +39.5 std" in shown_text
    wide = " ".join(cli.invoke(app, ["alerts", "list", "-c", config, "--status", "open"], env={"COLUMNS": "250"})
                    .output.split())
    assert "far outside training: speed -57.9 std, vibration +39.5 std" in wide
    open_csv = cli.invoke(app, ["alerts", "list", "-c", config, "--format", "csv", "--status", "open"]).output
    header, line = open_csv.strip().splitlines()
    assert "top_sensors,off_training,model_version" in header and "speed -57.9 std, vibration +39.5 std" in line
    (as_json,) = json.loads(cli.invoke(app, ["alerts", "list", "-c", config, "--format", "json", "--status",
                                             "open"]).output)
    assert as_json["off_training"] == {"vibration": 39.5, "speed": -57.9}


def test_the_documented_example_queries_run(loaded: tuple[str, int, int, int]) -> None:
    """Every SQL example in docs/alerts.md runs on this database (the dialect-specific ones on theirs)."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "alerts.md").read_text()
    block = doc.split("```sql\n", 1)[1].split("```", 1)[0]
    statements = [s.strip() for s in block.split(";") if s.strip()]
    url = loaded[0]
    engine = make_engine(url)
    ran = 0
    with engine.connect() as conn:
        for statement in statements:
            comment = " ".join(line for line in statement.splitlines() if line.startswith("--"))
            if ("(PostgreSQL)" in comment and engine.dialect.name != "postgresql") or (
                    "SQLite" in comment and engine.dialect.name != "sqlite"):
                continue
            conn.execute(text(statement)).all()
            ran += 1
    engine.dispose()
    assert ran == len(statements) - 1


def test_aftermath_floors_are_stored_shown_and_plotted(db_url: str, tmp_path: Path) -> None:
    """pump-1 jumps to ~10x its threshold, then settles at ~2x for an hour: with the aftermath rule that is one
    incident that resolves once the level falls well below its peak, and the history shows the raised bar."""
    from alert_data import populate, scores

    from pipeline.report import load_report_data, render_html

    upgrade(db_url)
    rule = {"aftermath": {"relative": 0.3, "half_life_s": 6 * 3600}}
    config = make_config(db_url, **rule)
    stream = scores("pump-1", 140, [(40, 50, 10.0, "vibration"), (51, 110, 2.0, "vibration")], seed=4)
    events = populate(db_url, config, stream)
    assert [e.kind for e in events if e.kind != "updated"] == ["opened", "resolved"]
    resolved = events[-1].alert
    assert resolved.window_count == 11 and resolved.closed_ms == stream[53].end_ms  # 3 windows (clear_after) later
    config_path = write_config(tmp_path / "sw.yaml", db_url, **rule)
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as s:
        [alert] = repo.list_alerts(session=s)
        data = load_report_data(session=s, group=config.groups[0], asset="pump-1", start=START,
                                end=START + timedelta(hours=4))
    engine.dispose()
    cli = CliRunner()
    shown = cli.invoke(app, ["alerts", "show", "-c", str(config_path), str(alert.id), "--format", "json",
                             "--context", "12"])
    assert shown.exit_code == 0, shown.output
    history = json.loads(shown.output)["history"]
    settling = [h for h in history if 1.5 < h["ratio"] < 3.0]  # the ~2x windows after the peak
    assert settling and all(h["aftermath_floor"] > 2.5 and not h["above"] for h in settling)
    assert all(h["above"] and h["in_alert"] for h in history if h["ratio"] > 5)
    table = cli.invoke(app, ["alerts", "show", "-c", str(config_path), str(alert.id), "--context", "12"])
    assert table.exit_code == 0 and "aftermath floor" in table.output
    stored = [s for s in data.scores if s.aftermath_floor is not None]
    assert len(stored) >= 60 and not any(s.is_anomaly for s in stored if s.score < 3.0)
    assert "aftermath floor" in render_html(data)


def test_an_open_alert_of_a_removed_asset_is_named_by_check_and_resolved_by_hand(
        loaded: tuple[str, int, int, int], tmp_path: Path) -> None:
    """pump-2 (with open alert C) leaves the configuration: check names the alert, `alerts resolve` closes it at its
    last window and queues its 'resolved' event for the webhook; while pump-2 was configured it was refused."""
    import yaml

    from pipeline.config import parse_config
    from pipeline.preflight import _database_and_models

    url, _, _, c = loaded
    raw = yaml.safe_load(write_config(tmp_path / "c.yaml", url).read_text())
    cli = CliRunner()
    still = cli.invoke(app, ["alerts", "resolve", "-c", str(tmp_path / "c.yaml"), str(c), "--by", "dan"])
    assert still.exit_code == 2 and "still configured" in " ".join(still.output.split())
    assert "--force resolves it anyway" in " ".join(still.output.split())
    raw["groups"][0]["assets"] = ["pump-1", "pump-3"]
    raw["sinks"] = {"webhook": {"url": "https://hooks.example/T0KEN"}}
    path = tmp_path / "removed.yaml"
    path.write_text(yaml.safe_dump(raw))
    checks = {x.name: x for x in _database_and_models(parse_config(raw, env={}))}
    assert checks["open alerts"].status == "warn" and f"#{c} (pump-2)" in checks["open alerts"].detail

    done = cli.invoke(app, ["alerts", "resolve", "-c", str(path), str(c), "--by", "dan", "--comment", "scrapped"])
    assert done.exit_code == 0, done.output
    comment, queued = _resolved_by_hand(url, c, "dan")
    assert comment == "resolved by hand: scrapped"
    assert queued == [("webhook", "resolved", "resolved")]
    engine = make_engine(url)
    assert "open alerts" not in {x.name for x in _database_and_models(parse_config(raw, env={}))}
    again = cli.invoke(app, ["alerts", "resolve", "-c", str(path), str(c), "--by", "dan"])
    assert again.exit_code == 2 and "is resolved, not open" in " ".join(again.output.split())

    from dataclasses import replace

    from pipeline.types import datetime_to_ms

    with make_sessionmaker(engine).begin() as s:  # a pipeline still on the old configuration writes C as open
        stale = repo.alert_record(repo.get_alert(session=s, alert_id=c))
        later = replace(stale, status="open", closed_ms=None, last_seen_ms=stale.last_seen_ms + 60_000,
                        window_count=stale.window_count + 1)
        repo.upsert_alerts(session=s, alerts=[later])
    with make_sessionmaker(engine)() as s:
        kept = repo.get_alert(session=s, alert_id=c)
        assert kept is not None and kept.status == "resolved" and kept.acknowledged_by == "dan"
        assert datetime_to_ms(kept.last_seen_at) == stale.last_seen_ms  # not undone
    engine.dispose()


def test_an_open_alert_of_a_configured_asset_is_resolved_by_hand_with_force(
        loaded: tuple[str, int, int, int], tmp_path: Path) -> None:
    """pump-2 is taken out of service but still in the configuration: --force closes its open alert C at its last
    window, records who and why, and queues the 'resolved' event (a running pipeline then drops the incident at the
    asset's next window: tests/unit/test_runner_alert_sinks.py)."""
    import yaml


    url, _, _, c = loaded
    raw = yaml.safe_load(write_config(tmp_path / "c.yaml", url).read_text())
    raw["sinks"] = {"webhook": {"url": "https://hooks.example/T0KEN"}}
    path = tmp_path / "hooked.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = CliRunner().invoke(app, ["alerts", "resolve", "-c", str(path), str(c), "--by", "dan", "--force"])
    assert done.exit_code == 0, done.output
    comment, queued = _resolved_by_hand(url, c, "dan")
    assert comment == "resolved by hand: asset taken out of service"
    assert [q[:2] for q in queued] == [("webhook", "resolved")]


def _resolved_by_hand(url: str, alert_id: int, by: str) -> tuple[str | None, list[tuple[str, str, str]]]:
    """Asserts the alert is resolved at its last seen window and acknowledged by ``by``; returns its comment and the
    outbox's (sink, event, alert status) rows."""
    from sqlalchemy import select

    from pipeline.store.tables import AlertOutbox

    engine = make_engine(url)
    with make_sessionmaker(engine)() as s:
        row = repo.get_alert(session=s, alert_id=alert_id)
        assert row is not None and (row.status, row.closed_at, row.acknowledged_by) == ("resolved", row.last_seen_at,
                                                                                        by)
        queued = [(o.sink, o.document["event"], o.document["alert"]["status"]) for o in s.scalars(select(AlertOutbox))]
        comment = row.ack_comment
    engine.dispose()
    return comment, queued
