"""``sensorwatch check``'s own checks without a broker: the model directory by trying to write, database problems as
one line (a missing driver, an echoed password), and a bundle that fails to verify."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from pipeline.config import parse_config
from pipeline.preflight import _database_and_models, _model_dir


def _config(url: str):  # type: ignore[no-untyped-def]
    return parse_config({"database": {"url": url}, "groups": [{"name": "g", "assets": ["a"],
                                                                "sensors": [{"name": "x"}]}]}, env={})


def test_the_model_directory_is_judged_by_writing_there(tmp_path: Path) -> None:
    assert _model_dir(tmp_path).status == "ok" and _model_dir(tmp_path).detail.endswith("writable")
    assert _model_dir(tmp_path / "new" / "dir").detail == f"{tmp_path / 'new' / 'dir'}: will be created (in {tmp_path})"
    file = tmp_path / "file"
    file.write_text("")
    assert (_model_dir(file).status, _model_dir(file).detail) == ("fail", f"{file}: exists and is not a directory")
    assert _model_dir(file / "below").status == "fail"  # its nearest existing parent is a file
    proc = _model_dir(Path("/proc/sensorwatch-models"))  # not writable even for root
    assert proc.status == "fail" and "cannot write in /proc" in proc.detail
    assert not list(tmp_path.glob(".sensorwatch-check-*"))  # the probe leaves nothing behind


def test_database_problems_are_one_line_without_the_password(tmp_path: Path) -> None:
    database, models = _database_and_models(_config("postgresql+pg8000://sw:s3cr3tpw@db.example/sw"))
    assert database.status == "fail" and database.detail.startswith("postgresql+pg8000://sw:***@db.example/sw: ")
    assert "s3cr3tpw" not in database.detail and models.status == "fail"  # no driver: no traceback either
    database, _ = _database_and_models(_config("postgresql+psycopg://sw:s3cr3tpw@127.0.0.1:1/sw"))
    assert database.status == "fail" and "s3cr3tpw" not in database.detail and "127.0.0.1" in database.detail


def test_a_bundle_that_fails_to_verify_fails_the_models_check(tmp_path: Path) -> None:
    import numpy as np

    from pipeline.store.db import session_scope, upgrade
    from pipeline.train import register_trained, train_group
    from pipeline.types import Window

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    config = _config(url)
    upgrade(url)
    group = config.groups[0].model_copy(update={"model": config.groups[0].model.model_copy(update={"epochs": 1})})
    rng = np.random.default_rng(0)
    windows = [Window("a", "g", i * 5000, i * 5000 + 30000, rng.normal(size=(30, 1))) for i in range(100)]
    with session_scope(url, write=True) as session:
        row = register_trained(session=session, trained=train_group(windows, group, progress=False), group=group,
                               model_dir=tmp_path / "models")
    assert _database_and_models(config)[1].status == "ok"
    raw = {"database": {"url": url}, "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}],
                                                 "model": {"type": "conv"}, "threshold": {"method": "pot"}}]}
    changed = _database_and_models(parse_config(raw, env={}))[1]  # served as it is, until the next trained model
    assert changed.status == "warn" and "it is a dense model, model.type is conv" in changed.detail
    assert "its threshold was fitted with method=percentile" in changed.detail
    weights = Path(row.artifact_path) / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    models = _database_and_models(config)[1]
    assert models.status == "fail" and f"g: {row.version} refused" in models.detail


def test_a_missing_sqlite_file_is_named_not_created(tmp_path: Path, monkeypatch) -> None:  # type: ignore
    monkeypatch.chdir(tmp_path)
    database, _ = _database_and_models(_config("sqlite:///sensorwatch.db"))
    assert database.status == "fail" and not (tmp_path / "sensorwatch.db").exists()
    assert database.detail == (f"database file {tmp_path / 'sensorwatch.db'} does not exist (a relative path is read "
                               f"from the current directory, {tmp_path}): run 'sensorwatch db upgrade --config FILE'")
    assert _database_and_models(_config("sqlite://"))[0].status == "fail"  # in memory: exists, but has no schema


def test_a_missing_topic_to_produce_to_fails_only_where_the_brokers_do_not_create_it() -> None:
    from pipeline.preflight import produced_topic_check

    assert produced_topic_check("dead-letter topic", "dlq", 3, None).status == "ok"
    created = produced_topic_check("dead-letter topic", "dlq", 0, True)
    assert created.status == "warn" and "create it on the first send" in created.detail
    stalls = produced_topic_check("dead-letter topic", "dlq", 0, False)
    assert stalls.status == "fail" and "stalls the pipeline" in stalls.detail
    waits = produced_topic_check("alert topic", "alerts", 0, False)  # in the outbox, until sinks.kafka.max_age_h
    assert waits.status == "fail" and "wait in the outbox" in waits.detail and "stalls" not in waits.detail
    unknown = produced_topic_check("alert topic", "alerts", 0, None)
    assert unknown.status == "warn" and "could not be read" in unknown.detail


def test_a_taken_metrics_port_fails_the_check() -> None:
    import socket

    from pipeline.preflight import _metrics_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = parse_config({"metrics": {"host": "127.0.0.1", "port": port},
                               "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}, env={})
        busy = _metrics_port(config)
        assert busy.status == "fail" and "its own metrics.port" in busy.detail
    assert _metrics_port(config).status == "ok"  # free again


def test_the_metrics_port_of_a_running_pipeline_is_no_failure() -> None:
    """`check` beside a running deployment: the port is taken by that pipeline's own endpoint, which is where it
    should be (it failed the check, exit 1, for a healthy deployment)."""
    from pipeline.metrics import PipelineMetrics, serve
    from pipeline.preflight import _metrics_port

    server = serve(PipelineMetrics(), "127.0.0.1", 0)
    try:
        port = server.server_address[1]
        config = parse_config({"metrics": {"host": "127.0.0.1", "port": port},
                               "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}, env={})
        running = _metrics_port(config)
        assert running.status == "ok" and "in use by a running sensorwatch pipeline" in running.detail
    finally:
        server.shutdown()
        server.server_close()


def test_the_alert_sinks_line_warns_of_failed_stale_and_orphaned_events(sessions) -> None:  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import delete

    from pipeline.preflight import _alert_sinks
    from pipeline.sinks import summarize_outbox
    from pipeline.store import repo
    from pipeline.store.tables import AlertOutbox

    groups = [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]
    plain = parse_config({"groups": groups}, env={})
    hooked = parse_config({"groups": groups, "sinks": {"webhook": {"url": "https://h.example/TOKEN"}}}, env={})
    now = datetime.now(UTC)

    def line(config, queued: dict[str, list[tuple[str, datetime]]]):  # type: ignore[no-untyped-def]
        """The check's lines for an outbox holding ``queued``: per sink, (status, queued at) of each event."""
        with sessions.begin() as session:
            session.execute(delete(AlertOutbox))
            for sink, events in queued.items():
                for i, (status, at) in enumerate(events):
                    key = f"{sink}-{i}"
                    repo.enqueue_outbox(session=session, rows=[{"sink": sink, "event_key": key, "asset": "a",
                                                                "document": {}}], now=at)
                    if status != "pending":
                        session.execute(AlertOutbox.__table__.update().where(AlertOutbox.event_key == key)
                                        .values(status=status, finished_at=at))
        with sessions() as session:
            return _alert_sinks(summarize_outbox(session, config, now))

    assert line(plain, {}) == []  # nothing configured, nothing queued: no line
    ok = line(hooked, {"webhook": [("pending", now)] * 2 + [("delivered", now)] * 9})
    assert [(c.status, c.detail) for c in ok] == [("ok", "webhook:h.example: 2 pending, 0 failed")]
    stale = line(hooked, {"webhook": [("pending", now - timedelta(minutes=12))] * 2})[0]
    assert stale.status == "warn" and "the oldest for 12 min" in stale.detail
    failed = line(hooked, {"webhook": [("failed", now)]})[0]
    assert failed.status == "warn" and "sinks status --failed" in failed.detail
    orphaned = line(plain, {"kafka": [("pending", now - timedelta(hours=2))] * 3})[0]
    assert orphaned.status == "warn" and "kafka: 3 pending, 0 failed (not configured" in orphaned.detail
    assert "TOKEN" not in ok[0].detail + stale.detail


def test_the_permissions_check_says_what_each_missing_permission_costs() -> None:
    from pipeline.preflight import permissions_check

    costs = {"READ on topic r": "cannot consume", "WRITE on topic d": "stalls", "READ on group g": "cannot join"}
    assert permissions_check(dict.fromkeys(costs, True), costs).detail == (
        "allowed: READ on topic r, WRITE on topic d, READ on group g")
    unknown = permissions_check({**dict.fromkeys(costs, True), "READ on group g": None}, costs)
    assert unknown.status == "ok" and unknown.detail.endswith("; not reported: READ on group g (not known to the "
                                                              "brokers yet: it shows at the first start)")
    assert permissions_check(dict.fromkeys(costs), costs).status == "warn"  # no answer at all: not checked
    refused = permissions_check({"READ on topic r": False, "WRITE on topic d": True, "READ on group g": False}, costs)
    assert refused.status == "fail"
    assert refused.detail == ("not allowed: READ on topic r, READ on group g (cannot consume; cannot join); grant "
                              "them to the principal of kafka.security on the cluster (kafka-acls.sh --add)")


def test_permissions_are_not_reported_when_no_broker_answers_in_time() -> None:
    from pipeline import kafka_io
    from pipeline.config import KafkaConfig

    cfg = KafkaConfig(bootstrap_servers="127.0.0.1:1", group_id="g")  # nothing listens on port 1
    assert kafka_io.permissions(cfg, {"r": "READ"}, timeout_s=1) == {"READ on topic r": None, "READ on group g": None}


def test_pipelines_check_names_a_process_that_does_not_serve_the_active_model() -> None:
    """A process that refused the active bundle (at once, once it reported the refusal after the activation), or
    still serves the previous version a reload interval after the activation, is a warning; a just-activated version
    no process has reported on, a stale row and a group outside a process's configuration are not judged."""
    from types import SimpleNamespace

    from pipeline.preflight import pipelines_check
    from pipeline.serving import behind, serving_counts, stale_after_s

    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    stale = stale_after_s(30)
    assert stale == 120

    def proc(name: str, seen_s: float, serving: dict[str, str], unserved: dict[str, str] | None = None) -> object:
        return SimpleNamespace(instance=name, seen_at=now - timedelta(seconds=seen_s), serving=serving,
                               unserved=unserved or {})

    def active(version: str, activated_s_ago: float) -> object:
        return SimpleNamespace(version=version, activated_at=now - timedelta(seconds=activated_s_ago))

    current = proc("h-1", 5, {"pumps": "p-2", "fans": "f-1"})
    lagging = proc("h-2", 20, {"pumps": "p-1"})
    refusing = proc("h-3", 20, {}, {"pumps": "model p-2 refused: weights checksum mismatch"})
    dead = proc("h-4", 121, {"pumps": "p-0"})
    rows = [current, lagging, refusing, dead]
    assert serving_counts(rows, now, stale) == {"p-2": 1, "f-1": 1, "p-1": 1}  # the stale row counts for nothing

    check = pipelines_check(rows, {"pumps": active("p-2", 600), "fans": active("f-1", 600)}, now, stale)
    assert check.status == "warn"
    assert check.detail == (
        "3 running; h-2 still serves p-1 for group pumps, not the active p-2; h-3 does not serve the active model "
        "p-2 of group pumps: model p-2 refused: weights checksum mismatch; 1 more not seen for over 120 s (1 of them "
        "within the hour: stopped without a clean exit, or hung: 'sensorwatch models serving')")
    just = {"pumps": ("p-2", now - timedelta(seconds=30)), "fans": ("f-1", now - timedelta(seconds=600))}
    # activated 30 s ago: h-2 has not reloaded yet, but h-3 reported its refusal since (waiting would not help)
    assert behind(rows, just, now, stale) == [
        "h-3 does not serve the active model p-2 of group pumps: model p-2 refused: weights checksum mismatch"]
    earlier = {"pumps": ("p-2", now - timedelta(seconds=10)), "fans": ("f-1", now - timedelta(seconds=600))}
    assert behind(rows, earlier, now, stale) == []  # h-3's refusal was reported before this activation
    fine = pipelines_check([current], {"pumps": active("p-2", 600), "fans": active("f-1", 600)}, now, stale)
    assert (fine.status, fine.detail) == ("ok", "1 running, serving fans=f-1, pumps=p-2")
    killed = pipelines_check([dead], {}, now, stale)  # killed two minutes ago, or hung: a warning
    assert killed.status == "warn" and killed.detail.startswith("none running; 1 more not seen")
    long_gone = pipelines_check([proc("h-5", 7200, {"pumps": "p-0"})], {}, now, stale)  # a row left last week
    assert (long_gone.status, long_gone.detail) == ("ok", "none running; 1 more not seen for over 120 s (0 of them "
                                                    "within the hour: stopped without a clean exit, or hung: "
                                                    "'sensorwatch models serving')")
    assert pipelines_check([], {}, now, stale).detail == "none running"


def test_a_missing_readings_topic_says_how_to_create_it(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A newcomer's first `check` fails on the readings topic: the line says what to do, not only what is wrong."""
    from pipeline import kafka_io
    from pipeline.preflight import _kafka

    config = parse_config({"kafka": {"topic": "plant-readings", "dead_letter_topic": "plant-dlq"},
                           "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}, env={})
    monkeypatch.setattr(kafka_io, "topic_partitions", lambda cfg, topics, timeout_s: dict.fromkeys(topics, 0))
    monkeypatch.setattr(kafka_io, "auto_creates_topics", lambda cfg: True)
    monkeypatch.setattr(kafka_io, "permissions", lambda cfg, needs, timeout_s: {})
    found = {c.name: c for c in _kafka(config, timeout_s=1)}
    readings = found["readings topic"]
    assert readings.status == "fail"
    assert "does not exist" in readings.detail and "kafka-topics.sh --create --topic plant-readings" in readings.detail


def test_no_permissions_reported_names_the_first_check_before_the_topics_exist() -> None:
    """On a first `check`, before the topics and the group exist, a broker reports nothing: the warning named only an
    older broker or a timeout, which sent a newcomer looking at the wrong thing."""
    from pipeline.preflight import permissions_check

    costs = {"READ on topic r": "cannot consume", "READ on group g": "cannot join"}
    nothing = permissions_check(dict.fromkeys(costs), costs)
    assert nothing.status == "warn" and "do not know yet" in nothing.detail and "run check again" in nothing.detail


def test_the_command_that_creates_a_missing_topic_names_the_brokers(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Copied as given, the suggested kafka-topics.sh command must work: since Kafka 3 it needs --bootstrap-server."""
    from pipeline import kafka_io
    from pipeline.preflight import _kafka

    config = parse_config({"kafka": {"bootstrap_servers": "b1:9092,b2:9092", "topic": "plant-readings",
                                     "dead_letter_topic": "plant-dlq"},
                           "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}, env={})
    monkeypatch.setattr(kafka_io, "topic_partitions", lambda cfg, topics, timeout_s: dict.fromkeys(topics, 0))
    monkeypatch.setattr(kafka_io, "auto_creates_topics", lambda cfg: True)
    monkeypatch.setattr(kafka_io, "permissions", lambda cfg, needs, timeout_s: {})
    readings = {c.name: c for c in _kafka(config, timeout_s=1)}["readings topic"]
    command = "kafka-topics.sh --create --topic plant-readings --partitions 3 --bootstrap-server b1:9092"
    assert command in readings.detail
