"""Alert sinks: the event document, event selection, and a webhook against a local HTTP server (failures, retries,
timeouts, a full queue). Nothing here may block or raise into the caller."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from pipeline.config import WebhookSinkConfig
from pipeline.sinks import AlertSinks, WebhookAlertSink, event_document, selected
from pipeline.types import AlertEvent, AlertRecord

T0 = 1772326800000  # 2026-03-01T01:00:00Z


def _record(status: str = "open", severity: str = "warning", asset: str = "pump-1") -> AlertRecord:
    return AlertRecord(asset, "pumps", T0, T0 + 60_000, T0 + 90_000 if status == "resolved" else None, 2.5, 1.0,
                       severity, status, 3, [{"sensor": "vibration", "share": 0.8, "error": 6.0}], "pumps-v1")


def _lifecycle(asset: str = "pump-1") -> list[AlertEvent]:
    return [
        AlertEvent("opened", _record(asset=asset)),
        AlertEvent("updated", _record(asset=asset), previous_severity="warning"),
        AlertEvent("updated", _record(severity="critical", asset=asset), previous_severity="warning"),
        AlertEvent("resolved", _record("resolved", "critical", asset=asset)),
    ]


class _Server:
    """A local HTTP server; ``answer(n)`` gives (status, delay_s) for the n-th request (0-based)."""

    def __init__(self, answer: Callable[[int], tuple[int, float]]) -> None:
        self.requests: list[tuple[int, dict[str, str], dict[str, Any]]] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                n = len(outer.requests)
                status, delay = answer(n)
                outer.requests.append((status, dict(self.headers), json.loads(body)))
                if delay:
                    outer.release.wait(delay)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook/secret-token"

    def delivered(self) -> list[dict[str, Any]]:
        return [doc for status, _, doc in self.requests if status < 300]

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory() -> Iterator[Callable[[Callable[[int], tuple[int, float]]], _Server]]:
    servers: list[_Server] = []

    def make(answer: Callable[[int], tuple[int, float]]) -> _Server:
        servers.append(_Server(answer))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _webhook(url: str, **options: Any) -> WebhookAlertSink:
    return WebhookAlertSink(WebhookSinkConfig.model_validate(
        {"url": url, "timeout_s": 1.0, "retries": 3, "backoff_s": 0.05, **options}))


def test_event_document_and_selection() -> None:
    opened, update, escalation, resolved = _lifecycle()
    doc = event_document(escalation)
    assert doc["event"] == "updated" and doc["escalated"] is True and doc["previous_severity"] == "warning"
    assert doc["incident"] == "pump-1@2026-03-01T01:00:00Z"
    assert doc["alert"]["opened_at"] == "2026-03-01T01:00:00Z" and doc["alert"]["closed_at"] is None
    assert doc["alert"]["top_sensors"] == [{"sensor": "vibration", "share": 0.8, "error": 6.0}]
    assert event_document(resolved)["alert"]["closed_at"] == "2026-03-01T01:01:30Z"
    json.dumps(doc)  # plain JSON types only
    kinds = ["opened", "escalated", "resolved"]
    assert [selected(kinds, e) for e in _lifecycle()] == [True, False, True, True]
    assert [selected(["updated"], e) for e in (opened, update, escalation)] == [False, True, True]


def test_webhook_retries_after_failures_then_delivers_each_event_once(server_factory: Any) -> None:
    server = server_factory(lambda n: (503, 0) if n < 2 else (200, 0))  # the first two tries fail
    sink = _webhook(server.url, headers={"Authorization": "Bearer s3cret"})
    sinks = AlertSinks([sink])
    sinks.publish(_lifecycle())
    sinks.close(timeout_s=10)
    assert [d["event"] for d in server.delivered()] == ["opened", "updated", "resolved"]  # plain update filtered
    assert server.delivered()[1]["escalated"] is True
    assert [status for status, _, _ in server.requests] == [503, 503, 200, 200, 200]
    assert server.requests[0][1]["Authorization"] == "Bearer s3cret"
    assert server.requests[0][1]["Content-Type"] == "application/json"
    stats = sink.stats
    assert (stats.queued, stats.delivered, stats.failed, stats.dropped) == (3, 3, 0, 0)


def test_webhook_timeout_is_retried(server_factory: Any) -> None:
    server = server_factory(lambda n: (200, 3.0) if n == 0 else (200, 0))  # the first answer comes too late
    sink = _webhook(server.url, timeout_s=0.3, events=["opened"])
    AlertSinks([sink]).publish(_lifecycle()[:1])
    deadline = time.monotonic() + 10
    while sink.stats.delivered < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    sink.close(5)
    assert sink.stats.delivered == 1 and sink.stats.failed == 0
    assert len(server.requests) == 2


def test_webhook_gives_up_on_client_errors_at_once_and_on_server_errors_after_retries(server_factory: Any,
                                                                                       caplog: Any) -> None:
    rejecting = server_factory(lambda n: (400, 0))
    failing = server_factory(lambda n: (500, 0))
    first, second = _webhook(rejecting.url, retries=3), _webhook(failing.url, retries=2)
    sinks = AlertSinks([first, second])
    sinks.publish(_lifecycle()[:1])
    sinks.close(10)
    assert len(rejecting.requests) == 1 and first.stats.failed == 1
    assert len(failing.requests) == 3 and second.stats.failed == 1
    assert "secret-token" not in caplog.text  # logs name the host, never the URL's token
    assert "gave up" in caplog.text


def test_unreachable_webhook_neither_blocks_nor_raises() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = _webhook(f"http://127.0.0.1:{port}/x", retries=1)
    started = time.monotonic()
    AlertSinks([sink]).publish(_lifecycle())
    assert time.monotonic() - started < 0.1
    sink.close(10)
    assert sink.stats.failed == 3 and sink.stats.delivered == 0


def test_a_full_queue_drops_and_counts_without_blocking(server_factory: Any) -> None:
    server = server_factory(lambda n: (200, 30.0))  # hangs until released
    sink = _webhook(server.url, queue_size=2, timeout_s=30, events=["opened", "updated", "resolved"])
    sinks = AlertSinks([sink])
    started = time.monotonic()
    for i in range(10):
        sinks.publish(_lifecycle(f"pump-{i}"))  # 40 events
    assert time.monotonic() - started < 0.5
    deadline = time.monotonic() + 5
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    s = sink.stats
    assert s.queued + s.dropped == 40 and s.queued <= 3  # two waiting (and perhaps one in flight), the rest dropped
    started = time.monotonic()
    sink.close(timeout_s=0.5)  # gives up waiting; what is still queued counts as dropped
    assert time.monotonic() - started < 5
    assert sink.stats.dropped == 39 and sink.stats.delivered == 0


def test_no_sinks_configured_is_a_no_op() -> None:
    sinks = AlertSinks([])
    sinks.publish(_lifecycle())
    sinks.close()
    assert sinks.stats() == {}


def test_sink_outcomes_are_metrics_a_monitoring_system_can_alert_on(server_factory: Any) -> None:
    from prometheus_client import generate_latest

    from pipeline.metrics import PipelineMetrics

    failing = server_factory(lambda n: (500, 0))
    sink = _webhook(failing.url, retries=1)
    sinks = AlertSinks([sink])
    metrics = PipelineMetrics()
    metrics.watch_sinks(sinks.stats)
    sinks.publish(_lifecycle())  # opened, escalated, resolved: three events, each failing after one retry
    sinks.close(10)
    text = generate_latest(metrics.registry).decode()
    assert f'sensorwatch_alert_sink_events_total{{outcome="failed",sink="{sink.name}"}} 3.0' in text
    assert f'sensorwatch_alert_sink_events_total{{outcome="delivered",sink="{sink.name}"}} 0.0' in text
    assert metrics.healthy()[0]  # a failing sink is a metric to alert on, not a reason to restart the pipeline
