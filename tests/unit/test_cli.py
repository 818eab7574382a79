"""The command line: help texts, configuration errors, and docker/compose.yaml commands that exist."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer.main
import yaml
from rich.console import Console
from typer.testing import CliRunner

from pipeline.cli import app, models_table

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _command_exists(args: list[str]) -> bool:
    """True when ``args`` (the container's command, without the entrypoint) parses as a sensorwatch command."""
    command = typer.main.get_command(app)
    words = [a for a in args if not a.startswith("-")]
    while getattr(command, "commands", None) is not None and words:
        sub = command.commands.get(words.pop(0))
        if sub is None:
            return False
        command = sub
    if getattr(command, "commands", None) is not None:
        return False  # a group, not a runnable command
    options = {opt for param in command.params for opt in getattr(param, "opts", [])}
    return all(a in options for a in args if a.startswith("--"))


def test_compose_services_run_existing_commands() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    ours = {name: svc["command"] for name, svc in compose["services"].items()
            if svc.get("image") == "sensorwatch:local"}  # services built from docker/Dockerfile (merge keys resolved)
    assert {"migrate", "pipeline"} <= set(ours)
    for name, command in ours.items():
        assert _command_exists(command), f"service {name}: 'sensorwatch {' '.join(command)}' is not a CLI command"
    assert not _command_exists(["no-such-command"])


def test_the_compose_health_check_asks_readiness_on_the_default_metrics_port() -> None:
    """docker/compose.yaml's pipeline health check, run as Docker would, against a live endpoint: unhealthy while
    the pipeline starts, healthy once it consumes, unhealthy while a dependency fails."""
    import subprocess
    import sys

    from pipeline.config import MetricsConfig
    from pipeline.metrics import PipelineMetrics, serve

    check = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["pipeline"]["healthcheck"]
    kind, program, flag, code = check["test"]
    assert (kind, program, flag) == ("CMD", "python", "-c")
    assert f"http://127.0.0.1:{MetricsConfig().port}/readyz" in code
    metrics = PipelineMetrics()
    server = serve(metrics, "127.0.0.1", 0)
    here = code.replace(f":{MetricsConfig().port}/", f":{server.server_address[1]}/")

    def status() -> int:
        return subprocess.run([sys.executable, "-c", here], capture_output=True, timeout=30).returncode

    try:
        assert status() != 0  # starting
        metrics.mark_started()
        assert status() == 0
        metrics.set_degraded(True, "OperationalError: connection refused")
        assert status() != 0
    finally:
        server.shutdown()


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["alerts", "list", "--help"], ["demo", "--help"],
                                  ["drift", "--help"], ["check", "--help"], ["sinks", "status", "--help"],
                                  ["sinks", "retry", "--help"], ["backtest", "--help"]])
def test_help_texts(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_command_listings_flow_each_summary_as_one_paragraph() -> None:
    """The docstring's line breaks do not break the listing's lines (they did: "... gate: the job" then a new line)."""
    wide = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert wide.exit_code == 0
    assert "validation gate: the job the scheduler runs." in wide.output
    sinks = runner.invoke(app, ["sinks", "--help"], env={"COLUMNS": "200"})
    assert "original order: after a receiver's outage outlasted max_age_h" in sinks.output


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("groups:\n  - name: g\n    assets: [a]\n    sensors: [{name: x}]\n    window: {length: 1}\n")
    result = runner.invoke(app, ["alerts", "list", "--config", str(bad)])
    assert result.exit_code == 2
    assert "groups[0].window.length" in result.output


def test_simulate_train_and_list_on_sqlite(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert runner.invoke(app, ["simulate", "--out", str(data), "--hours", "3", "--anomalies", "0",
                               "--assets", "pump-1,pump-2"]).exit_code == 0
    config = tmp_path / "config.yaml"
    text = (ROOT / "config" / "example.yaml").read_text()
    config.write_text(text.replace("epochs: 40", "epochs: 3"))
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'sw.db'}", "SENSORWATCH_MODEL_DIR": str(tmp_path / "models")}
    assert runner.invoke(app, ["db", "upgrade", "--config", str(config)], env=env).exit_code == 0
    trained = runner.invoke(app, ["train", "--config", str(config), "--csv", str(data / "readings.csv")], env=env)
    assert trained.exit_code == 0, trained.output
    listed = runner.invoke(app, ["models", "list", "--config", str(config)], env=env)
    assert "active" in listed.output
    alerts = runner.invoke(app, ["alerts", "list", "--config", str(config), "--format", "json"], env=env)
    assert alerts.exit_code == 0 and alerts.output.strip() == "[]"


def test_drift_shows_each_assets_latest_offsets_largest_first(tmp_path: Path) -> None:
    from dataclasses import replace

    from pipeline.store import repo
    from pipeline.store.db import make_engine, make_sessionmaker, upgrade
    from pipeline.types import Score

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    groups = [{"name": "pumps", "assets": ["p1", "p2", "p3"], "sensors": [{"name": "flow"}, {"name": "temp"}],
               "drift": {"span_s": 3600, "max_offset": 3}},
              {"name": "fans", "assets": ["f1"], "sensors": [{"name": "rpm"}]}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": url}, "groups": groups}))
    upgrade(url)
    engine = make_engine(url)

    def score(asset: str, end_s: int, offsets: dict[str, float] | None) -> Score:
        return replace(Score(asset, "pumps", end_s * 1000 - 30_000, end_s * 1000, 0.1, 1.0, {"flow": 0.1},
                             "v1"), drift_offset=offsets)

    with make_sessionmaker(engine).begin() as s:
        repo.insert_scores(session=s, scores=[
            score("p1", 100, {"flow": 0.2, "temp": 0.1}), score("p1", 130, {"flow": 0.5, "temp": -2.5}),
            score("p2", 130, None),  # drift turned on after its latest window
            replace(score("f1", 130, None), group="fans"),
        ])
    engine.dispose()
    result = runner.invoke(app, ["drift", "--config", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = yaml.safe_load(result.stdout)
    assert [(r["asset"], r["offsets"], r["largest"], r["max_offset"]) for r in rows] == [
        ("p1", {"temp": -2.5, "flow": 0.5}, 2.5, 3.0),  # the latest window's, largest first
        ("p2", {}, None, 3.0)]  # p3 has no score yet; f1's group does not follow drift
    table = runner.invoke(app, ["drift", "--config", str(path)])
    assert table.exit_code == 0 and "temp -2.50, flow +0.50" in table.stdout and "none yet" in table.stdout
    nobody = tmp_path / "nobody.yaml"
    nobody.write_text(yaml.safe_dump({"database": {"url": url}, "groups": [groups[1]]}))
    none_json = runner.invoke(app, ["drift", "--config", str(nobody), "--format", "json"])
    assert none_json.exit_code == 0 and none_json.stdout.strip() == "[]"  # a document for scripts, even then
    refused = runner.invoke(app, ["drift", "--config", str(path), "--group", "fans"])
    assert refused.exit_code == 2 and "does not follow drift" in refused.output
    unknown = runner.invoke(app, ["drift", "--config", str(path), "--group", "nosuch"])
    assert unknown.exit_code == 2 and "no group named 'nosuch'" in unknown.output
    moved = [{**groups[0], "assets": ["p1", "p2", "p3", "f1"]}, {**groups[1], "assets": ["f2"]}]
    path.write_text(yaml.safe_dump({"database": {"url": url}, "groups": moved}))  # f1 now follows drift
    result = runner.invoke(app, ["drift", "--config", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [(r["asset"], r["group"]) for r in yaml.safe_load(result.stdout)] == [
        ("f1", "fans"), ("p1", "pumps"), ("p2", "pumps")]  # the group its latest row was scored in


def _sqlite_config(tmp_path: Path, url: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": url}, "model_dir": str(tmp_path / "models"),
                                    "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}))
    return str(path)


def test_database_problems_are_one_line_errors_and_train_checks_before_training(tmp_path: Path) -> None:
    missing_dir = _sqlite_config(tmp_path, f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'sw.db'}")
    for args in (["alerts", "list"], ["models", "list"], ["alerts", "show", "1"], ["db", "upgrade"]):
        result = runner.invoke(app, [*args, "--config", missing_dir])
        text = " ".join(result.output.split())
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.output)
        if args[0] == "db":  # creating it: the directory is missing
            assert "cannot use the database" in text and "unable to open database file" in text
        else:  # reading it: said before connecting, which would create an empty file
            assert f"database file {tmp_path / 'no' / 'such' / 'dir' / 'sw.db'} does not exist" in text
    assert not (tmp_path / "no").exists()
    (tmp_path / "empty.db").touch()  # an empty SQLite database: no schema yet
    unmigrated = _sqlite_config(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}")
    listed = runner.invoke(app, ["models", "list", "--config", unmigrated])
    assert listed.exit_code == 1 and "database schema is not up to date" in listed.output
    csv = tmp_path / "r.csv"
    csv.write_text("ts,x\n" + "".join(f"{i * 1000},{i % 7}\n" for i in range(500)))
    trained = runner.invoke(app, ["train", "--config", unmigrated, "--csv", str(csv)])
    assert trained.exit_code == 1 and "database schema is not up to date" in trained.output
    assert not (tmp_path / "models").exists()  # refused before training: no orphan bundle
    secret = _sqlite_config(tmp_path, "postgresql+psycopg://sw:s3cr%40t@127.0.0.1:1/sw")  # nothing listens on :1
    refused = runner.invoke(app, ["alerts", "list", "--config", secret])
    text = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "cannot use the database postgresql+psycopg://sw:***@127.0.0.1:1/sw" in text
    assert "s3cr" not in refused.output
    no_driver = _sqlite_config(tmp_path, "postgresql+pg8000://sw:s3cr%40t@db.example/sw")  # pg8000 not installed
    result = runner.invoke(app, ["models", "list", "--config", no_driver])
    assert result.exit_code == 1 and "No module named 'pg8000'" in " ".join(result.output.split())


def test_bracketed_text_is_shown_as_written(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("groups:\n  - name: g\n    assets: [a]\n    sensors: [{name: x, valid_range: [5, 1]}]\n")
    result = runner.invoke(app, ["alerts", "list", "--config", str(bad)])
    assert result.exit_code == 2 and "valid_range must be [low, high]" in result.output
    helped = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "ts, [asset,] one column per sensor" in helped.output
    from pipeline.store.db import upgrade

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    bracketed = tmp_path / "[/x]"
    bracketed.mkdir(parents=True)
    config = _sqlite_config(bracketed, url)  # its model_dir holds "[/x]": the train line printed it as markup
    csv = tmp_path / "r.csv"
    csv.write_text("ts,x\n" + "".join(f"{i * 1000},{(i % 7) / 7}\n" for i in range(400)))
    trained = runner.invoke(app, ["train", "--config", config, "--csv", str(csv)], env={"COLUMNS": "300"})
    assert trained.exit_code == 0, trained.output
    assert f"bundle {bracketed / 'models' / 'g'}" in trained.output


def test_train_reads_a_long_history_in_pieces_and_thins_it_to_retrain_max_windows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CSV whose windows are more than ``retrain.max_windows`` trains on every k-th block of each asset's windows,
    as the nightly retrain does (memory stays bounded whatever the history's length), saying so. The CSV is read in
    pieces."""
    import pipeline.history
    from pipeline.store import repo
    from pipeline.store.db import session_scope, upgrade

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "database": {"url": url}, "model_dir": str(tmp_path / "models"),
        "retrain": {"max_windows": 1000, "min_windows": 100},
        "groups": [{"name": "g", "assets": ["a", "b"], "sensors": [{"name": "x"}],
                    "window": {"length": 8, "stride": 1},
                    "model": {"type": "dense", "hidden": [4, 2], "epochs": 1}}]}))
    csv = tmp_path / "r.csv"
    csv.write_text("ts,asset,x\n" + "".join(f"{i * 1000},{a},{(i % 7) / 7 + (a == 'b')}\n"
                                            for i in range(1500) for a in "ab"))
    monkeypatch.setattr(pipeline.history, "PIECE_ROWS", 400)
    trained = runner.invoke(app, ["train", "--config", str(config), "--csv", str(csv)])
    assert trained.exit_code == 0, trained.output
    assert "training data: 2986 windows, over retrain.max_windows = 1000: kept every 4th window of each asset" \
        in " ".join(trained.output.split())
    with session_scope(url) as session:
        (row,) = repo.list_model_versions(session=session)
    assert 600 < row.windows_used <= 1000  # of 2,986


def test_models_list_shows_whole_versions_and_json(tmp_path: Path) -> None:
    from pipeline.store.db import upgrade

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    config = _sqlite_config(tmp_path, url)
    upgrade(url)
    csv = tmp_path / "r.csv"
    csv.write_text("ts,x\n" + "".join(f"{i * 1000},{(i % 7) / 7}\n" for i in range(400)))
    trained = runner.invoke(app, ["train", "--config", config, "--csv", str(csv)])
    assert trained.exit_code == 0, trained.output
    (row,) = yaml.safe_load(runner.invoke(app, ["models", "list", "--config", config, "--format", "json"]).stdout)
    assert row["group"] == "g" and row["status"] == "active" and row["version"].startswith("g-")
    from pipeline.store import repo
    from pipeline.store.db import session_scope

    with session_scope(url) as session:
        rows = repo.list_model_versions(session=session)
    narrow = Console(width=60, file=io.StringIO())
    narrow.print(models_table(rows))
    assert row["version"] in narrow.file.getvalue()  # the id 'models activate' takes, never cut short
    assert row["served_by"] == 0  # no pipeline runs

    # two pipeline processes: one serves the active version; one was killed ten minutes ago (its row went stale)
    now = datetime.now(UTC)
    with session_scope(url, write=True) as session:
        for name, seen, serving in (("host-1-11-aa", now, {"g": row["version"]}),
                                    ("host-2-22-bb", now - timedelta(minutes=10), {"g": "g-old"})):
            repo.report_instance(session=session, instance=name, consumer_group="sw", started_at=now - timedelta(
                hours=1), now=seen, serving=serving, unserved={})
    (row,) = yaml.safe_load(runner.invoke(app, ["models", "list", "--config", config, "--format", "json"]).stdout)
    assert row["served_by"] == 1
    assert "1 process" in runner.invoke(app, ["models", "list", "--config", config], env={"COLUMNS": "200"}).stdout
    processes = yaml.safe_load(runner.invoke(app, ["models", "serving", "--config", config, "--format",
                                                   "json"]).stdout)
    assert [(p["instance"], p["live"], p["serving"]) for p in processes] == [
        ("host-1-11-aa", True, {"g": row["version"]}), ("host-2-22-bb", False, {"g": "g-old"})]
    table = " ".join(runner.invoke(app, ["models", "serving", "--config", config],
                                   env={"COLUMNS": "250"}).stdout.split())
    assert "600 s ago (gone or hung)" in table and f"g=g-old (active: {row['version']})" in table
    lstm = tmp_path / "lstm.yaml"
    lstm.write_text(yaml.safe_dump({"database": {"url": url}, "model_dir": str(tmp_path / "models"), "groups": [
        {"name": "g", "assets": ["a"], "sensors": [{"name": "x"}], "model": {"type": "lstm"}}]}))
    rolled = runner.invoke(app, ["models", "activate", "--config", str(lstm), row["version"]])
    text = " ".join(rolled.output.split())
    assert rolled.exit_code == 0 and "is a dense model, the configuration's model.type is lstm" in text
    assert "the scheduled retrain (0 2 * * * UTC) may promote a new model over it" in text  # a rollback may not last


def test_bad_command_line_values_are_refused_without_a_traceback(tmp_path: Path) -> None:
    for args, expected in ((["--hours", "0"], "--hours"), (["--period", "0"], "--period"),
                           (["--start", "notadate"], "not an ISO-8601 time"), (["--anomalies", "-1"], "--anomalies"),
                           (["--hours", "0.01"], "do not fit")):
        result = runner.invoke(app, ["simulate", "--out", str(tmp_path / "sim"), *args])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (args, result.output)
        assert expected in " ".join(result.output.split()), (args, result.output)
    config = _sqlite_config(tmp_path, f"sqlite:///{tmp_path / 'sw.db'}")
    swapped = runner.invoke(app, ["alerts", "list", "--config", config, "--since", "1h", "--until", "2h"])
    assert swapped.exit_code == 2 and "--until must be after --since" in " ".join(swapped.output.split())
    assert runner.invoke(app, ["alerts", "list", "--config", config, "--limit", "0"]).exit_code == 2
    from pipeline.store.db import upgrade

    upgrade(f"sqlite:///{tmp_path / 'sw.db'}")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    result = runner.invoke(app, ["train", "--config", config, "--csv", str(empty)])
    assert result.exit_code == 2 and "the file is empty" in " ".join(result.output.split())


def test_a_database_error_never_shows_the_password(tmp_path: Path) -> None:
    from sqlalchemy.exc import OperationalError

    from pipeline.cli import _database_problem
    from pipeline.config import load_config

    config = load_config(_sqlite_config(tmp_path, "postgresql+psycopg://sw:p%40ss:w0rd@db.example:5432/sw"))
    echoed = OperationalError("connect", {}, Exception("password p@ss:w0rd (or p%40ss%3Aw0rd) rejected\ndetail"))
    text = _database_problem(echoed, config)
    assert text == ("cannot use the database postgresql+psycopg://sw:***@db.example:5432/sw: "
                    "password *** (or ***) rejected")
    short = load_config(_sqlite_config(tmp_path, "postgresql+psycopg://sw:12@127.0.0.1:5432/sw"))
    assert "127.0.0.1" in _database_problem(OperationalError("c", {}, Exception("to 127.0.0.1 failed")), short)


def test_only_the_first_send_to_a_produced_topic_is_quietened() -> None:
    import logging

    from pipeline.cli import _TopicsBeingCreated

    keep = _TopicsBeingCreated({"dlq"})

    def record(topic: str, msg: str = "Topic %s not found in cluster metadata") -> logging.LogRecord:
        return logging.LogRecord("kafka.cluster", logging.ERROR, __file__, 1, msg, (topic,), None)

    assert not keep.filter(record("dlq"))
    assert keep.filter(record("sensor-readings"))  # the topic being consumed: still an error
    assert keep.filter(record("dlq", "Topic %s is not authorized for this client"))


def test_check_reports_each_problem_of_a_deployment_that_cannot_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"kafka": {"bootstrap_servers": "127.0.0.1:1"}, "database": {"url": url},
                                    "model_dir": str(tmp_path / "models"),
                                    "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}))
    args = ["check", "--config", str(path), "--kafka-timeout-s", "1", "--format", "json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 1
    status = {c["name"]: (c["status"], c["detail"]) for c in yaml.safe_load(first.stdout)}
    assert status["database"] == ("fail", f"database file {tmp_path / 'sw.db'} does not exist: run 'sensorwatch db "
                                  "upgrade --config FILE'")
    assert not (tmp_path / "sw.db").exists()  # the check creates nothing
    assert status["model_dir"] == ("ok", f"{tmp_path / 'models'}: will be created (in {tmp_path})")
    assert status["kafka"][0] == "fail" and "127.0.0.1:1: no broker could be used" in status["kafka"][1]
    from pipeline.store.db import upgrade

    upgrade(url)
    second = {c["name"]: (c["status"], c["detail"]) for c in yaml.safe_load(runner.invoke(app, args).stdout)}
    assert second["database"][0] == "ok" and second["models"] == ("fail", "g: no active model (sensorwatch train)")
    table = runner.invoke(app, ["check", "--config", str(path), "--kafka-timeout-s", "1"])
    assert table.exit_code == 1 and "FAIL" in table.stdout and "configuration" in table.stdout


def test_sinks_status_shows_the_outbox_and_retry_queues_failed_events_again(tmp_path: Path) -> None:
    import json
    from dataclasses import replace
    from datetime import UTC, datetime

    from pipeline.config import WebhookSinkConfig
    from pipeline.sinks import AlertSinks, OutboxDeliverer, WebhookAlertSink
    from pipeline.store import repo
    from pipeline.store.db import make_engine, make_sessionmaker, upgrade
    from pipeline.types import AlertEvent, AlertRecord

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    config = tmp_path / "c.yaml"
    config.write_text(f"database: {{url: '{url}'}}\nsinks:\n  webhook: {{url: 'https://hooks.example.com/x/TOKEN'}}\n"
                      "groups:\n  - {name: g, assets: [pump-1], sensors: [{name: x}]}\n")
    status = runner.invoke(app, ["sinks", "status", "--config", str(config), "--format", "json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.output) == {"sinks": [
        {"sink": "webhook", "configured": "webhook:hooks.example.com", "pending": 0, "delivered": 0, "failed": 0,
         "oldest_pending_s": None, "delivered_by": None}]}
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    sink = WebhookAlertSink(WebhookSinkConfig(url="https://hooks.example.com/x/TOKEN"))
    record = AlertRecord("pump-1", "g", 0, 60_000, None, 2.0, 1.0, "warning", "open", 2, [], "v1")
    events = [AlertEvent("opened", record), AlertEvent("resolved", replace(record, status="resolved"))]
    now = datetime.now(UTC)
    with sessions.begin() as session:
        repo.enqueue_outbox(session=session, rows=AlertSinks([OutboxDeliverer(sink, sessions, start=False)])
                            .outbox_rows(events), now=now)
        repo.mark_outbox_failed(session=session, failures={1: "HTTP 400"}, now=now)
    status = runner.invoke(app, ["sinks", "status", "--config", str(config), "--format", "json", "--failed", "5"])
    doc = json.loads(status.output)
    assert doc["sinks"][0]["pending"] == 1 and doc["sinks"][0]["failed"] == 1
    assert doc["sinks"][0]["oldest_pending_s"] is not None and doc["sinks"][0]["delivered_by"] is None
    assert [(f["id"], f["event"], f["error"]) for f in doc["failed"]] == [(1, "opened", "HTTP 400")]
    table = runner.invoke(app, ["sinks", "status", "--config", str(config), "--failed", "5"])
    assert "no running pipeline" in table.output and "HTTP 400" in table.output and "TOKEN" not in table.output
    assert runner.invoke(app, ["sinks", "retry", "--config", str(config), "--sink", "nope"]).exit_code == 2
    retried = runner.invoke(app, ["sinks", "retry", "--config", str(config), "--sink", "webhook"])
    assert retried.exit_code == 0 and "1 failed event(s) queued again" in retried.output
    with sessions() as session:
        assert repo.count_outbox(session=session) == {("webhook", "pending"): 2}
    assert "none matched" in runner.invoke(app, ["sinks", "retry", "--config", str(config)]).output
    engine.dispose()


def test_an_empty_report_says_where_the_assets_windows_are(tmp_path: Path) -> None:
    """`report --since 24h` (the README's example) on history replayed from an older time wrote an empty page and
    '0 windows' without a hint; it now names the span of the asset's stored windows, or that it has none."""
    from pipeline.store import repo
    from pipeline.store.db import session_scope, upgrade
    from pipeline.types import Score

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": url}, "groups": [
        {"name": "g", "assets": ["a", "b"], "sensors": [{"name": "x"}]}]}))
    t0 = 1_583_748_000_000  # 2020-03-09T10:00:00Z
    with session_scope(url, write=True) as session:
        repo.insert_scores(session=session, scores=[Score("a", "g", t0 + i * 5000, t0 + i * 5000 + 30_000, 1.0, 2.0,
                                                          {"x": 1.0}, "m1") for i in range(3)])
    old = runner.invoke(app, ["report", "-c", str(config), "--asset", "a", "--out", str(tmp_path / "a.html")],
                        env={"COLUMNS": "300"})
    assert old.exit_code == 0, old.output
    assert "0 windows" in old.output and "no window scores of a between" in old.output
    assert "2020-03-09T10:00:30+00:00 and 2020-03-09T10:00:40+00:00" in old.output
    none = runner.invoke(app, ["report", "-c", str(config), "--asset", "b", "--out", str(tmp_path / "b.html")],
                         env={"COLUMNS": "300"})
    assert none.exit_code == 0 and "it has no window scores at all" in none.output
    inside = runner.invoke(app, ["report", "-c", str(config), "--asset", "a", "--out", str(tmp_path / "c.html"),
                                 "--since", "2020-03-09"], env={"COLUMNS": "300"})
    assert inside.exit_code == 0 and "3 windows" in inside.output and "no window scores" not in inside.output
