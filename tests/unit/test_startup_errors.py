"""The pipeline's startup problems end in one line that says what to do: a metrics port another process holds, and
Kafka brokers that cannot be reached (a real client against a port nothing listens on)."""

from __future__ import annotations

import functools
import socket
from pathlib import Path

import pytest

from pipeline import kafka_io
from pipeline.config import parse_config
from pipeline.errors import TransientError
from pipeline.metrics import PipelineMetrics
from pipeline.runner import _connect, _serve_metrics


def _config(**sections: object):  # type: ignore[no-untyped-def]
    return parse_config({**sections, "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}, env={})


def _trained(tmp_path: Path, **sections: object):  # type: ignore[no-untyped-def]
    """A configuration on a migrated SQLite database in ``tmp_path`` whose group has an active model (one epoch)."""
    import numpy as np

    from pipeline.store.db import session_scope, upgrade
    from pipeline.train import register_trained, train_group
    from pipeline.types import Window

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    config = _config(database={"url": url}, model_dir=str(tmp_path), **sections)
    upgrade(url)
    group = config.groups[0].model_copy(update={"model": config.groups[0].model.model_copy(update={"epochs": 1})})
    rng = np.random.default_rng(0)
    windows = [Window("a", "g", i * 5000, i * 5000 + 30000, rng.normal(size=(30, 1))) for i in range(200)]
    with session_scope(url, write=True) as session:
        register_trained(session=session, trained=train_group(windows, group, progress=False), group=group,
                         model_dir=tmp_path)
    return config


def test_a_metrics_port_another_process_holds_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TransientError, match=rf"cannot listen on 127\.0\.0\.1:{port} .*its own metrics\.port"):
            _serve_metrics(PipelineMetrics(60.0), _config(metrics={"host": "127.0.0.1", "port": port}))
    server = _serve_metrics(PipelineMetrics(60.0), _config(metrics={"host": "127.0.0.1", "port": port}))
    server.shutdown()  # free again: it serves


def test_unreachable_brokers_are_a_clear_error() -> None:
    config = _config(kafka={"bootstrap_servers": "127.0.0.1:1"})  # nothing listens on port 1
    quick = functools.partial(kafka_io.make_producer, bootstrap_timeout_ms=2000)
    with pytest.raises(TransientError, match=r"cannot connect to Kafka at 127\.0\.0\.1:1 \(.*Unable to bootstrap.*; "
                       r"last connection error: .*ECONNREFUSED\)"):
        _connect(quick, config.kafka)


def test_a_failed_start_frees_the_metrics_port(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore
    # the producer cannot reach its brokers after the metrics endpoint is up: run_pipeline stops with one line and
    # leaves the port free (a restarted process, or a supervisor's retry in the same process, can listen again)
    import threading

    from kafka.errors import KafkaTimeoutError

    from pipeline.runner import run_pipeline

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = _trained(tmp_path, metrics={"host": "127.0.0.1", "port": port})

    def unreachable(*_: object, **__: object) -> None:
        raise KafkaTimeoutError("Unable to bootstrap from [127.0.0.1:1]")

    monkeypatch.setattr(kafka_io, "make_producer", unreachable)
    with pytest.raises(TransientError, match="cannot connect to Kafka"):
        run_pipeline(config, stop=threading.Event(), serve_metrics=True)
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # free: the server was shut down and its socket closed


def test_a_security_failure_explains_more_than_a_refused_connection() -> None:
    seen = ["Bootstrap connection to bootstrap-0 failed: [Error 34] IllegalSaslStateError",
            "Bootstrap connection to bootstrap-0 failed: KafkaConnectionError: 111 ECONNREFUSED",  # another client
            "Bootstrap failed: KafkaTimeoutError: Unable to bootstrap"]
    assert kafka_io.last_failure(seen) == ("; last connection error: Bootstrap connection to bootstrap-0 failed: "
                                           "[Error 34] IllegalSaslStateError")
    assert kafka_io.last_failure(seen[1:]).endswith("111 ECONNREFUSED")
    assert kafka_io.last_failure(seen[2:]) == ""


def test_a_dropped_connection_under_sasl_says_the_credentials_may_have_been_refused() -> None:
    seen = ["Sending username and password in the clear",
            "Bootstrap connection to bootstrap-0 failed: KafkaConnectionError: socket disconnected"]
    assert kafka_io.last_failure(seen).endswith("socket disconnected")  # no SASL configured: no hint
    assert kafka_io.last_failure(seen, sasl=True).endswith(
        "socket disconnected (a broker that refuses the SASL credentials closes the connection, and so does a TLS "
        "listener: check kafka.security's protocol, sasl_mechanism, sasl_username and sasl_password)")


def test_a_tls_record_read_as_a_kafka_frame_says_the_broker_speaks_tls() -> None:
    tls_alert = "Bootstrap connection to bootstrap-0 failed: InvalidReceiveError: Invalid frame length: 352518912"
    assert 352518912 == 0x15030300  # a TLS alert record, version 3.x: what a TLS listener sends a plaintext client
    assert kafka_io.last_failure([tls_alert], sasl=True).endswith(
        "Invalid frame length: 352518912 (the broker answered in TLS: set kafka.security.protocol to SSL or SASL_SSL)")
    other = "Bootstrap connection to bootstrap-0 failed: InvalidReceiveError: Invalid frame length: 2000000000"
    assert kafka_io.last_failure([other]).endswith("Invalid frame length: 2000000000")  # no hint


def test_a_failed_start_removes_its_pipeline_instances_row(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore
    # the row is written before the consumer connects; a start that then fails (brokers unreachable, wrong
    # credentials: `run` exits 1, a supervisor restarts it) must not leave a row behind per attempt
    import threading

    from kafka.errors import KafkaTimeoutError

    from pipeline.runner import run_pipeline
    from pipeline.store import repo
    from pipeline.store.db import session_scope

    config = _trained(tmp_path, metrics={"enabled": False})
    url = config.database.url

    class Producer:
        def close(self, timeout: float | None = None) -> None:
            pass

    def unreachable(*_: object, **__: object) -> None:
        raise KafkaTimeoutError("Unable to bootstrap from [127.0.0.1:1]")

    monkeypatch.setattr(kafka_io, "make_producer", lambda *_a, **_k: Producer())
    monkeypatch.setattr(kafka_io, "make_consumer", unreachable)
    with pytest.raises(TransientError, match="cannot connect to Kafka"):
        run_pipeline(config, stop=threading.Event())
    with session_scope(url) as session:
        assert repo.list_instances(session=session) == []
