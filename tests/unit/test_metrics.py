"""Prometheus metrics and the health probes (/livez, /readyz, /healthz) over real HTTP."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from pipeline.metrics import PipelineMetrics, serve


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_and_health_endpoints() -> None:
    metrics = PipelineMetrics(unhealthy_after_s=30)
    server = serve(metrics, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        metrics.readings.inc(5)
        metrics.rejects.labels(reason="late").inc()
        metrics.lag.labels(partition="0").set(42)
        metrics.batch_seconds.observe(0.02)
        metrics.set_models({"pumps": "pumps-1"})
        status, body = _get(f"{base}/metrics")
        assert status == 200
        for line in ('sensorwatch_readings_total 5.0', 'sensorwatch_rejects_total{reason="late"} 1.0',
                     'sensorwatch_consumer_lag{partition="0"} 42.0', "sensorwatch_batch_seconds_count 1.0",
                     'sensorwatch_active_model{group="pumps",version="pumps-1"} 1.0'):
            assert line in body
        assert _get(f"{base}/healthz") == (200, "ok")
        metrics.set_degraded(True)
        assert _get(f"{base}/healthz")[0] == 503
        metrics.set_degraded(True, "TransientError: not allowed to write the dead-letter topic d")
        assert _get(f"{base}/healthz") == (503, "database or broker unavailable: TransientError: not allowed to write "
                                                "the dead-letter topic d")
        metrics.set_degraded(False)
        assert _get(f"{base}/healthz") == (200, "ok")
        assert _get(f"{base}/nope")[0] == 404
    finally:
        server.shutdown()


def test_silent_loop_is_unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = PipelineMetrics(unhealthy_after_s=10)
    metrics.mark_started()
    import pipeline.metrics as module

    now = module.time.monotonic()
    monkeypatch.setattr(module.time, "monotonic", lambda: now + 11)
    ok, reason = metrics.healthy()
    assert not ok and "silent" in reason
    assert metrics.live() == (False, "consume loop silent for 11s")  # hung: a restart is what helps
    assert metrics.ready() == (False, "consume loop silent for 11s")


def test_liveness_readiness_and_health_probes() -> None:
    """/livez fails only for a hung loop (a restart helps), /readyz also while starting or waiting on a dependency
    (hold traffic back, do not restart), /healthz as before: hung or a dependency failing, 200 while starting."""
    metrics = PipelineMetrics(unhealthy_after_s=30)
    server = serve(metrics, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        starting = "starting: connecting to the brokers and joining the consumer group"
        assert _get(f"{base}/livez") == (200, "starting")
        assert _get(f"{base}/readyz") == (503, starting)
        assert _get(f"{base}/readyz?verbose") == (503, starting)
        assert _get(f"{base}/healthz") == (200, "ok")
        metrics.mark_started()
        for probe in ("/livez", "/readyz", "/healthz"):
            assert _get(f"{base}{probe}") == (200, "ok"), probe
        metrics.set_degraded(True, "OperationalError: connection refused")
        down = "database or broker unavailable: OperationalError: connection refused"
        assert _get(f"{base}/livez") == (200, "ok")  # waiting on the database is not hung
        assert _get(f"{base}/readyz") == (503, down)
        assert _get(f"{base}/healthz") == (503, down)
        metrics.set_degraded(False)
        metrics.set_broker_silent(True)
        assert _get(f"{base}/livez") == (200, "ok")
        assert _get(f"{base}/readyz") == (503, "no Kafka broker answers")
        metrics.set_broker_silent(False)
        assert _get(f"{base}/readyz") == (200, "ok")
        assert _get(f"{base}/livezz")[0] == 404
    finally:
        server.shutdown()


def test_a_dependency_failing_at_the_first_poll_shows_before_start() -> None:
    metrics = PipelineMetrics(unhealthy_after_s=30)
    metrics.set_degraded(True, "KafkaError: boom")
    assert metrics.live() == (True, "starting")
    assert metrics.ready() == (False, "database or broker unavailable: KafkaError: boom")
    assert metrics.healthy() == (False, "database or broker unavailable: KafkaError: boom")


def test_a_long_start_is_not_a_hung_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting for the topic can take longer than unhealthy_after_s; the loop's silence counts from its first poll."""
    metrics = PipelineMetrics(unhealthy_after_s=10)
    import pipeline.metrics as module

    now = module.time.monotonic()
    monkeypatch.setattr(module.time, "monotonic", lambda: now + 600)
    assert metrics.live() == (True, "starting") and metrics.healthy() == (True, "ok")
    metrics.mark_started()
    assert metrics.live() == (True, "ok") and metrics.ready() == (True, "ok")


def test_a_stalled_client_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that sends nothing (or trickles its request) held a server thread for as long as it liked."""
    import socket
    import time

    import pipeline.metrics as module

    monkeypatch.setattr(module, "REQUEST_TIMEOUT_S", 0.3)
    server = serve(PipelineMetrics(unhealthy_after_s=30), "127.0.0.1", 0)
    try:
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5) as stalled:
            stalled.sendall(b"GET /metr")  # and nothing more
            started = time.monotonic()
            assert stalled.recv(1024) == b""  # closed by the server
            assert time.monotonic() - started < 3
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5) as trickling:
            started = time.monotonic()
            try:
                for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                    trickling.sendall(bytes([byte]))  # a byte every 0.1 s: never idle for the 0.3 s timeout
                    time.sleep(0.1)
                    if time.monotonic() - started > 3:
                        break
                got = trickling.recv(1024)
            except OSError:  # reset by the server
                got = b""
            assert got == b"" and time.monotonic() - started < 3
        assert _get(f"http://127.0.0.1:{server.server_address[1]}/healthz") == (200, "ok")
    finally:
        server.shutdown()
