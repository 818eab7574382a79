"""The pipeline's startup problems end in one line that says what to do: a metrics port another process holds, and
Kafka brokers that cannot be reached (a real client against a port nothing listens on)."""

from __future__ import annotations

import functools
import socket

import pytest

from pipeline import kafka_io
from pipeline.config import parse_config
from pipeline.errors import TransientError
from pipeline.metrics import PipelineMetrics
from pipeline.runner import _connect, _serve_metrics


def _config(**sections: object):  # type: ignore[no-untyped-def]
    return parse_config({**sections, "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}, env={})


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
    with pytest.raises(TransientError, match=r"cannot connect to Kafka at 127\.0\.0\.1:1 \(.*Unable to bootstrap"):
        _connect(quick, config.kafka)
