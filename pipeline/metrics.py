"""Prometheus metrics and health endpoints for one pipeline process.

Each ``PipelineMetrics`` owns its own registry (no import-time globals), so tests and several runners in one process
do not collide. ``serve`` exposes, on a daemon thread, ``/metrics`` (Prometheus text format) and three probes that
answer 200 or 503 with a one-line reason:

- ``/livez``: the process works. 503 only when the consume loop, once started, has not completed an iteration within
  ``unhealthy_after_s`` (hung). Waiting on a dependency or starting up is alive: restarting would not help.
- ``/readyz``: the process does its work. 503 until the consumer has joined its group and the loop polled (starting:
  connecting, waiting for the topic, joining), while the database or broker is failing, and when the loop is hung.
- ``/healthz`` (the original probe, kept): 503 when the loop is hung or a dependency is failing; 200 while starting.

A database or broker call that has not returned for ``BLOCKED_CALL_S`` counts as a failing dependency before it
fails (an offset commit waits up to 30 s for a coordinator that went away).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

BLOCKED_CALL_S = 10.0  # a database or broker call waiting this long: /readyz and /healthz report it


class PipelineMetrics:
    """The pipeline's counters, gauges and histograms, plus the state behind the health probes."""

    def __init__(self, unhealthy_after_s: float = 60.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.readings = Counter("sensorwatch_readings", "Valid readings consumed", registry=r)
        self.windows_scored = Counter("sensorwatch_windows_scored", "Windows scored", ["group"], registry=r)
        self.windows_skipped = Counter("sensorwatch_windows_skipped", "Windows skipped for gaps", ["group"], registry=r)
        self.windows_unscored = Counter("sensorwatch_windows_unscored", "Windows dropped: their group has no usable "
                                        "model", ["group"], registry=r)
        self.rejects = Counter("sensorwatch_rejects", "Messages sent to the dead-letter topic", ["reason"], registry=r)
        self.late = Counter("sensorwatch_late_readings", "Readings that arrived after their window closed", registry=r)
        self.alerts = Counter("sensorwatch_alert_events", "Alert events", ["kind"], registry=r)
        self.lag = Gauge("sensorwatch_consumer_lag", "Records behind the log end", ["partition"], registry=r)
        self.batch_seconds = Histogram(
            "sensorwatch_batch_seconds", "Time to process one polled batch (decode to commit)", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.model_info = Gauge("sensorwatch_active_model", "Active model version (value 1)", ["group", "version"],
                                registry=r)
        self.dependency_down = Gauge("sensorwatch_dependency_down", "1 while the database or broker is failing",
                                     registry=r)
        self._unhealthy_after = unhealthy_after_s
        self._heartbeat = time.monotonic()
        self._degraded = False
        self._degraded_reason = ""
        self._broker_silent = False
        self._database_unread = ""  # why the last model reload could not read the database ("": it could)
        self._started = False  # polling with the group joined: ready
        self._starting = "connecting to the brokers and joining the consumer group"  # what a start waits for
        self._call_since: float | None = None  # a database or broker call in flight since (monotonic)
        self._polling = False  # polling, the join possibly still in flight: a silent loop counts as hung from here

    def watch_sinks(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        """Expose the alert sinks' counters (``stats()``: sink label -> ``SinkStats``, read at each scrape) as
        ``sensorwatch_alert_sink_events_total{sink, outcome}``, outcome delivered, failed (refused, or given up after
        the sink's max_age_h) or retried (a try failed; the event stays in the outbox), and the sink's pending outbox
        events as ``sensorwatch_alert_sink_pending{sink}`` (counted by the process delivering it; 0 elsewhere).
        A failing sink does not make ``/healthz`` unhealthy (the pipeline itself is fine): alert on these instead."""
        self.registry.register(_SinkCollector(stats))

    def set_degraded(self, degraded: bool, reason: str = "") -> None:
        """Mark the database or broker as failing (True, with the failure's one-line ``reason`` for ``/healthz``) or
        answering again (False): a step that raised."""
        self._degraded = degraded
        self._degraded_reason = reason if degraded else ""
        self._update_down()

    @property
    def degraded(self) -> bool:
        """Whether the last database or broker step failed and has not succeeded since."""
        return self._degraded

    def set_broker_silent(self, silent: bool) -> None:
        """Mark the broker as not answering a probe (True) or answering again (False): polls do not raise while no
        broker answers, they only come back empty."""
        self._broker_silent = silent
        self._update_down()

    @property
    def database_unread(self) -> bool:
        """Whether the last model reload could not read the database (``set_database_unread``)."""
        return bool(self._database_unread)

    def set_database_unread(self, reason: str) -> None:
        """Mark the database as failing the model reloads (``reason``, one line) or read again (""): a process with
        no readings to write meets an outage only there, and a poll that succeeds says nothing of the database."""
        self._database_unread = reason
        self._update_down()

    def _update_down(self) -> None:
        self.dependency_down.set(int(self._degraded or self._broker_silent or bool(self._database_unread)))

    def beat(self) -> None:
        """Record that the consume loop completed an iteration."""
        self._heartbeat = time.monotonic()

    def mark_polling(self) -> None:
        """Record that the consume loop polled the brokers (``/livez`` judges its silence from now on), its group
        join possibly still in flight."""
        if not self._polling:
            self._polling = True
            self.beat()

    @contextlib.contextmanager
    def dependency_call(self) -> Iterator[None]:
        """Around one database or broker step: one still in flight after ``BLOCKED_CALL_S`` makes ``healthy`` and
        ``ready`` report it."""
        self._call_since = time.monotonic()
        try:
            yield
        finally:
            self._call_since = None

    def starting(self, step: str) -> None:
        """Record what the start is waiting for (``/readyz`` names it until the group is joined)."""
        self._starting = step

    def mark_started(self) -> None:
        """Record that the consume loop polled the brokers with its group joined (``/readyz`` may answer 200 now)."""
        self.mark_polling()
        self._started = True

    def live(self) -> tuple[bool, str]:
        """Whether the process works (``/livez``): False only when the started loop is hung, with a one-line reason.
        A loop retrying a failed database or broker step is waiting, not hung, however long one attempt blocks (a
        commit waits up to 30 s for the coordinator, then the backoff up to 30 s more)."""
        if not self._polling:
            return True, "starting"
        silent = time.monotonic() - self._heartbeat
        if silent > self._unhealthy_after:
            if self._degraded:
                return True, f"waiting on the database or broker for {silent:.0f}s"
            return False, f"consume loop silent for {silent:.0f}s"
        return True, "ok"

    def healthy(self) -> tuple[bool, str]:
        """Whether the loop is alive and its dependencies answer (``/healthz``), with a one-line reason. True while
        starting, unless a dependency failed already."""
        alive, reason = self.live()
        if not alive:
            return alive, reason
        if self._degraded:
            return False, "database or broker unavailable" + (f": {self._degraded_reason}" if self._degraded_reason
                                                               else "")
        if self._broker_silent:
            return False, "no Kafka broker answers"
        if self._database_unread:
            return False, f"database unavailable to the model reloads: {self._database_unread}"
        since = self._call_since
        if since is not None and (waited := time.monotonic() - since) >= BLOCKED_CALL_S:
            return False, f"a database or broker call has not returned for {waited:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Whether the process does its work (``/readyz``): started, alive and its dependencies answer."""
        ok, reason = self.healthy()
        if ok and not self._started:
            return False, f"starting: {self._starting}"
        return ok, reason

    def set_models(self, versions: Mapping[str, str]) -> None:
        """Publish the active model version of each group."""
        self.model_info.clear()
        for group, version in versions.items():
            self.model_info.labels(group=group, version=version).set(1)


class _SinkCollector(Collector):
    """Reads the alert sinks' counters at scrape time (they are kept by the sinks' own threads)."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily("sensorwatch_alert_sink_events", "Alert events per sink by outcome: delivered, "
                                     "failed (refused or too old), retried (a try failed)", labels=["sink", "outcome"])
        pending = GaugeMetricFamily("sensorwatch_alert_sink_pending", "Alert events waiting in the outbox per sink "
                                    "(in the process that delivers it)", labels=["sink"])
        for name, s in self._stats().items():
            for outcome in ("delivered", "failed", "retried"):
                events.add_metric([name, outcome], getattr(s, outcome))
            pending.add_metric([name], s.pending)
        yield events
        yield pending


REQUEST_TIMEOUT_S = 10.0
PROBES: dict[str, Callable[[PipelineMetrics], tuple[bool, str]]] = {
    "/livez": PipelineMetrics.live, "/readyz": PipelineMetrics.ready, "/healthz": PipelineMetrics.healthy,
}


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def serve(metrics: PipelineMetrics, host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``/metrics``, ``/livez``, ``/readyz`` and ``/healthz`` on a daemon thread; returns the server
    (``server_address`` has the port)."""

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S  # a client that stalls is dropped, not kept for ever ...

        def handle(self) -> None:
            # ... and so is one that trickles its request: the whole exchange has REQUEST_TIMEOUT_S
            deadline = threading.Timer(REQUEST_TIMEOUT_S, _shut, args=(self.connection,))
            deadline.daemon = True
            deadline.start()
            try:
                super().handle()
            finally:
                deadline.cancel()

        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                body, status, ctype = generate_latest(metrics.registry), 200, CONTENT_TYPE_LATEST
            elif (probe := PROBES.get(self.path.split("?", 1)[0])) is not None:
                ok, reason = probe(metrics)
                body, status, ctype = reason.encode(), 200 if ok else 503, "text/plain; charset=utf-8"
            else:
                body, status, ctype = b"not found", 404, "text/plain; charset=utf-8"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
