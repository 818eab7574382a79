"""Alert sinks beyond the database: a Kafka topic and an HTTP webhook, best effort and never in the pipeline's way.

The database is the record of truth: the runner writes alerts in the transaction that holds the scores, then hands the
events to ``AlertSinks.publish``, which only puts them on each sink's bounded queue and returns at once. One background
thread per sink delivers them. A full queue drops the event and counts it; delivery failures are logged (without
secrets), retried where that makes sense, and counted; nothing raises into the pipeline. Delivery is at most once:
events still queued when the process dies are lost (the database has them).

Every event is one JSON document (``event_document``), keyed by asset on Kafka so one asset's events stay in order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from pipeline import kafka_io
from pipeline.config import Config, KafkaConfig, KafkaSinkConfig, WebhookSinkConfig
from pipeline.types import AlertEvent, ms_to_datetime

if TYPE_CHECKING:
    from kafka import KafkaProducer

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_MAX_BACKOFF_S = 30.0
_RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}


def _iso(ms: int | None) -> str | None:
    return None if ms is None else ms_to_datetime(ms).isoformat().replace("+00:00", "Z")


def event_document(event: AlertEvent) -> dict[str, Any]:
    """The JSON document of one alert event. ``incident`` (asset@opened) identifies the alert across its events."""
    a = event.alert
    return {
        "schema": SCHEMA_VERSION,
        "event": event.kind,
        "escalated": event.escalated,
        "previous_severity": event.previous_severity,
        "incident": f"{a.asset}@{_iso(a.opened_ms)}",
        "alert": {
            "asset": a.asset, "group": a.group, "status": a.status, "severity": a.severity,
            "opened_at": _iso(a.opened_ms), "last_seen_at": _iso(a.last_seen_ms), "closed_at": _iso(a.closed_ms),
            "peak_score": a.peak_score, "threshold": a.threshold, "window_count": a.window_count,
            "top_sensors": a.top_sensors, "model_version": a.model_version,
        },
    }


def selected(kinds: Sequence[str], event: AlertEvent) -> bool:
    """True when a sink configured for ``kinds`` takes ``event`` (``escalated`` selects severity-raising updates)."""
    return event.kind in kinds or ("escalated" in kinds and event.escalated)


@dataclass
class SinkStats:
    """Counters of one sink: events accepted onto the queue, delivered, failed after retries, dropped (queue full
    or still queued at close), and the size of the batch being delivered (``in_flight``; after ``close`` it is what
    a delivery that outlived the deadline still holds)."""

    queued: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    in_flight: int = 0


Item = tuple[bytes, dict[str, Any]]  # (key, document)


class QueuedSink(ABC):
    """A bounded queue and one daemon thread that hands batches (up to ``batch_size`` items) to ``deliver``; at most
    ``queue_size + batch_size`` events are held.

    ``offer`` never blocks; ``close`` waits up to a deadline for the queue to drain. Subclasses implement ``deliver``
    (count ``delivered``/``failed`` there) and may implement ``shutdown``. An exception escaping ``deliver`` is
    logged and counts the batch as failed; the thread carries on.
    """

    def __init__(self, name: str, kinds: Sequence[str], queue_size: int, batch_size: int = 1) -> None:
        self.name = name
        self.batch_size = batch_size
        self.kinds = tuple(kinds)
        self.stats = SinkStats()
        self._queue: queue.Queue[Item] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.aborted = threading.Event()  # set when close() runs out of time: stop waiting on retries
        self._thread = threading.Thread(target=self._run, name=f"alert-sink-{name}", daemon=True)
        self._thread.start()

    def offer(self, item: Item) -> bool:
        """Queue an item; False (and counted as dropped) when the queue is full or the sink is closing."""
        if self._closing.is_set():
            self._count(dropped=1)
            return False
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            dropped = self._count(dropped=1)
            if dropped == 1 or dropped % 1000 == 0:
                log.warning("alert sink %s: queue full (%d), %d event(s) dropped so far", self.name,
                            self._queue.maxsize, dropped)
            return False
        self._count(queued=1)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued within ``timeout_s``, then stop; whatever is left counts as dropped."""
        self._closing.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.aborted.set()
            self._thread.join(2.0)
        left = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            left += 1
        if left:
            self._count(dropped=left)
            log.warning("alert sink %s: %d event(s) undelivered at shutdown", self.name, left)

    @abstractmethod
    def deliver(self, batch: list[Item]) -> None:
        """Send a batch; called on the sink's thread only."""

    def shutdown(self) -> None:  # noqa: B027 (optional hook: most sinks hold nothing to release)
        """Release clients; called on the sink's thread when it stops. Nothing to do by default."""

    def _count(self, *, queued: int = 0, delivered: int = 0, failed: int = 0, dropped: int = 0) -> int:
        with self._lock:
            s = self.stats
            s.queued += queued
            s.delivered += delivered
            s.failed += failed
            s.dropped += dropped
            return s.dropped

    def _run(self) -> None:
        try:
            while not self.aborted.is_set():
                try:
                    batch = [self._queue.get(timeout=0.1)]
                except queue.Empty:
                    if self._closing.is_set():
                        break
                    continue
                while len(batch) < self.batch_size:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                self.stats.in_flight = len(batch)
                try:
                    self.deliver(batch)
                except Exception:
                    log.exception("alert sink %s: delivery of %d event(s) failed", self.name, len(batch))
                    self._count(failed=len(batch))
                finally:
                    self.stats.in_flight = 0
        finally:
            try:
                self.shutdown()
            except Exception:
                log.exception("alert sink %s: shutdown failed", self.name)


class KafkaAlertSink(QueuedSink):
    """Alert events as JSON on a Kafka topic, keyed by asset. The producer is created on the sink's thread, so an
    unreachable broker delays only this sink (batches that cannot be sent are counted as failed and logged)."""

    def __init__(self, kafka: KafkaConfig, cfg: KafkaSinkConfig) -> None:
        self._kafka = kafka
        self._cfg = cfg
        self._producer: KafkaProducer | None = None
        super().__init__(f"kafka:{cfg.topic}", cfg.events, cfg.queue_size, batch_size=500)

    def deliver(self, batch: list[Item]) -> None:
        try:
            if self._producer is None:
                timeout_ms = round(self._cfg.timeout_s * 1000)
                self._producer = kafka_io.make_producer(self._kafka, max_block_ms=timeout_ms,
                                                        request_timeout_ms=timeout_ms)
            kafka_io.send_json(self._producer, self._cfg.topic, batch, timeout_s=self._cfg.timeout_s)
        except Exception as exc:
            self._count(failed=len(batch))
            log.warning("alert sink %s: %d event(s) not delivered: %s: %s", self.name, len(batch),
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            self.aborted.wait(min(self._cfg.timeout_s, 5.0))  # do not spin against a broker that is down
            return
        self._count(delivered=len(batch))

    def shutdown(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)


class WebhookAlertSink(QueuedSink):
    """Alert events POSTed one by one as JSON. A try waits at most ``timeout_s``; connection errors, timeouts and
    408/425/429/5xx answers are retried ``retries`` times with doubling backoff (``Retry-After`` is honoured up to
    30 s); other answers are final. Logs name only the host: webhook URLs often carry a token."""

    def __init__(self, cfg: WebhookSinkConfig) -> None:
        self._cfg = cfg
        self._host = urlsplit(cfg.url).hostname or "?"
        self._headers = {"Content-Type": "application/json", "User-Agent": "sensorwatch-alerts",
                         **{k: v.get_secret_value() for k, v in cfg.headers.items()}}
        super().__init__(f"webhook:{self._host}", cfg.events, cfg.queue_size)

    def deliver(self, batch: list[Item]) -> None:
        for _key, doc in batch:
            if self.aborted.is_set():
                self._count(dropped=1)
                continue
            error = self._post_with_retries(orjson.dumps(doc))
            if error is None:
                self._count(delivered=1)
            else:
                self._count(failed=1)
                log.warning("alert sink %s: gave up on %s event of %s after %d tries: %s", self.name,
                            doc.get("event"), doc.get("incident"), self._cfg.retries + 1, error)

    def _post_with_retries(self, body: bytes) -> str | None:
        """None on success, else the last error (short text)."""
        error, wait_s = "not tried", 0.0
        for attempt in range(self._cfg.retries + 1):
            if attempt:
                delay = wait_s or min(self._cfg.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
                if self.aborted.wait(delay):
                    return f"{error} (shutting down)"
            retry, error, wait_s = self._post(body)
            if error is None:
                return None
            if not retry:
                return error
        return error

    def _post(self, body: bytes) -> tuple[bool, str | None, float]:
        """One try: (worth retrying, error or None, seconds the server asked us to wait or 0)."""
        request = urllib.request.Request(self._cfg.url, data=body, headers=self._headers, method="POST")
        started = time.monotonic()
        try:
            with _NO_REDIRECTS.open(request, timeout=self._cfg.timeout_s) as response:
                response.read(65536)
            return False, None, 0.0
        except urllib.error.HTTPError as exc:
            header = (exc.headers.get("Retry-After") or "") if exc.headers else ""
            wait_s = min(float(header), _MAX_BACKOFF_S) if header.strip().isdigit() else 0.0
            return exc.code in _RETRYABLE_HTTP, f"HTTP {exc.code}", wait_s
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return True, f"{type(reason).__name__} after {time.monotonic() - started:.1f}s", 0.0


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would turn the POST into a GET and send our headers (secrets) elsewhere: treat it as an error."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


class AlertSinks:
    """The configured sinks. ``publish`` is non-blocking and never raises; ``close`` flushes within a deadline."""

    def __init__(self, sinks: Sequence[QueuedSink]) -> None:
        self.sinks = list(sinks)

    def publish(self, events: Sequence[AlertEvent]) -> None:
        """Queue each event on every sink that selects its kind."""
        if not self.sinks or not events:
            return
        try:
            for event in events:
                wanted = [s for s in self.sinks if selected(s.kinds, event)]
                if wanted:
                    item = (event.alert.asset.encode(), event_document(event))
                    for sink in wanted:
                        sink.offer(item)
        except Exception:
            log.exception("alert sinks: publishing failed; the events stay in the database")

    def close(self, timeout_s: float = 10.0) -> None:
        """Give each sink up to ``timeout_s`` (in total) to deliver what it holds, then stop it."""
        deadline = time.monotonic() + timeout_s
        for sink in self.sinks:
            sink.close(max(deadline - time.monotonic(), 0.1))
            s = sink.stats
            log.info("alert sink %s: %d delivered, %d failed, %d dropped", sink.name, s.delivered, s.failed,
                     s.dropped)

    def stats(self) -> dict[str, SinkStats]:
        """Counters per sink name."""
        return {sink.name: sink.stats for sink in self.sinks}


def build_sinks(config: Config) -> AlertSinks:
    """The sinks enabled in ``config.sinks`` (none: an AlertSinks that does nothing). Starts their threads."""
    sinks: list[QueuedSink] = []
    if config.sinks.kafka is not None and config.sinks.kafka.enabled:
        sinks.append(KafkaAlertSink(config.kafka, config.sinks.kafka))
    if config.sinks.webhook is not None and config.sinks.webhook.enabled:
        sinks.append(WebhookAlertSink(config.sinks.webhook))
    return AlertSinks(sinks)
