"""Alert sinks beyond the database: a Kafka topic and an HTTP webhook, delivered at least once from a database
outbox, never in the pipeline's way.

The database is the record of truth. The runner writes each alert event that a sink selects into ``alert_outbox``
in the same transaction as the alert itself (``AlertSinks.outbox_rows``), so an event is queued exactly when its alert
is stored, and a crash loses none. One background thread per sink (``OutboxDeliverer``) delivers the outbox:
- only the pipeline process holding the sink's lease (``sink_leases``) delivers, so events go out once per try and in
  the order queued. The lease lasts ``LEASE_S`` plus the longest stretch between two of its checks
  (``Sink.worst_item_s``) and is renewed before every try once a third of ``LEASE_S`` has passed, so a try, which
  its sink bounds as a whole, cannot outlive it; when the holder dies another process takes over within the lease
  plus ``LEASE_S / 3``;
- a try that fails in a way worth retrying (connection errors, timeouts, 408/425/429 and 5xx other than 501/505;
  on Kafka every error but those about the record itself: a broker that is down, no leader for the partition, and
  also no authorization for the topic or a failed login, which an operator fixes on the cluster) leaves the event
  pending and holds back the ones after it (order is kept), to be tried again after a backoff that doubles from
  ``RETRY_BASE_S`` to ``RETRY_MAX_S``; after the sink's ``max_age_h`` it is given up (failed);
- an answer that retrying cannot fix (other 4xx, 501, 505; on Kafka, an event larger than the topic's
  ``max.message.bytes`` or one the broker finds invalid) fails the event at once, and the next ones go on (those of
  the same asset too: the receiver never gets the failed one);
- finished events are deleted after ``KEEP_DAYS``; ``sensorwatch sinks`` shows and re-queues them (``max_age_h``
  then counts from the re-queueing).
Delivery is at least once: a process that dies, or cannot reach the database, after a send and before recording it
sends that event again, and so does a Kafka batch that failed part way (the events behind the failed one that the
broker took already are sent again, after it), so receivers should treat ``incident`` + ``event`` +
``alert.last_seen_at`` as the event's identity. In order, then, means: every try starts at the oldest pending event
and sends in the order queued, so the last copy of an asset's event comes after those of the asset's events queued
before it (on Kafka they share a partition); an early copy may come sooner. Nothing raises into the pipeline;
failures are logged (without secrets) and counted.

Every event is one JSON document (``event_document``), keyed by asset on Kafka so one asset's events stay in order.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import orjson
from kafka.errors import KafkaError
from sqlalchemy.orm import Session, sessionmaker

from pipeline import kafka_io
from pipeline.config import Config, KafkaConfig, KafkaSinkConfig, WebhookSinkConfig
from pipeline.store import repo
from pipeline.types import AlertEvent, ms_to_datetime

if TYPE_CHECKING:
    from kafka import KafkaProducer

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_MAX_BACKOFF_S = 30.0
LEASE_S = 30.0  # a sink's delivery lease, on top of the longest one delivery may take
RETRY_BASE_S = 5.0  # backoff before a failed event is tried again, doubling per failed try ...
RETRY_MAX_S = 300.0  # ... up to this
KEEP_DAYS = 7.0  # delivered and failed events are deleted this long after they finished
POLL_S = 1.0  # how often an idle deliverer looks for events (new events wake it at once in this process)
BATCH = 200  # events taken per round


def retryable_http(code: int) -> bool:
    """Whether an HTTP answer may go away by itself: 408, 425, 429 and 5xx, except 501 and 505 (the server does not
    support the request: retrying would only hold back the events behind it)."""
    return code in (408, 425, 429) or (500 <= code <= 599 and code not in (501, 505))


def _first_line(exc: BaseException) -> str:
    """The exception's type and the first line of its text, for a log line. For a Kafka error the text is its
    message, or the library's description of the broker's error code when the broker sent none (kafka-python's
    ``str`` repeats the class name and shows a missing message as ``None``); they name topics and sizes, no
    credentials."""
    if isinstance(exc, KafkaError):
        text = next((str(a) for a in exc.args if a is not None and str(a).strip()), "") or str(
            getattr(exc, "description", "") or "")
    else:
        text = str(exc)
    lines = text.strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


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
            "top_sensors": a.top_sensors, "off_training": a.off_training or {}, "model_version": a.model_version,
        },
    }


def event_key(event: AlertEvent) -> str:
    """What makes an event distinct within its sink's outbox (a replayed batch produces the same keys)."""
    a = event.alert
    return f"{a.asset}@{a.opened_ms}|{event.kind}|{a.last_seen_ms}|{a.window_count}|{a.severity}|{a.status}"


def selected(kinds: Sequence[str], event: AlertEvent) -> bool:
    """True when a sink configured for ``kinds`` takes ``event`` (``escalated`` selects severity-raising updates)."""
    return event.kind in kinds or ("escalated" in kinds and event.escalated)


@dataclass
class SinkStats:
    """Counters of one sink's deliverer in this process: events delivered, failed (refused, or given up after
    ``max_age_h``), tries that failed and will be retried, and the sink's pending events at the last round."""

    delivered: int = 0
    failed: int = 0
    retried: int = 0
    pending: int = 0


Item = tuple[bytes, dict[str, Any]]  # (key, document)
# (what happened, error); "stopped": the try was given up because the lease went to another process or the deliverer
# is shutting down; nothing is recorded for it (the new holder, or the next process, takes the event as it is)
Outcome = tuple[Literal["delivered", "refused", "retry", "stopped"], str | None]


@dataclass
class RoundControl:
    """What a sink checks before each delivery of a round: the deliverer is not aborting, the round's time budget
    is not spent (the first delivery always goes), and the lease is still ours (``renew`` renews it when due)."""

    aborted: threading.Event
    deadline: float  # time.monotonic() after which no further delivery starts
    renew: Callable[[], bool]

    def go_on(self, first: bool) -> bool:
        """Whether to start the next delivery (``first``: none was made yet this round). False when the lease
        cannot be renewed, the database failing included (logged): what was sent so far is still recorded."""
        if self.aborted.is_set() or (not first and time.monotonic() > self.deadline):
            return False
        return self.still_ours()

    def still_ours(self) -> bool:
        """``renew()``, with a database error counting as "no" (the next round's lease check meets it again)."""
        try:
            return self.renew()
        except Exception as exc:
            log.warning("alert sink: cannot renew its delivery lease (%s); the round stops", _first_line(exc))
            return False


class Sink(ABC):
    """Where alert documents go. ``name`` keys the outbox and the lease ("kafka", "webhook"); ``label`` names it in
    logs and metrics (no secrets)."""

    name: str
    label: str
    kinds: tuple[str, ...]
    max_age_s: float
    worst_item_s: float  # the longest stretch between two lease checks: one try and the wait before it, or a batch

    @abstractmethod
    def send(self, items: Sequence[Item], control: RoundControl) -> list[Outcome]:
        """Try ``items`` in order; one outcome per item tried. Stops after the first ``retry`` or ``stopped`` (the
        items after it wait, to keep the order), and starts no delivery that ``control.go_on`` refuses (the rest stay
        due), so the list may be shorter than ``items``; a sink may also end a round early without an outcome for
        the rest (they stay due, and the next round starts at once). Never raises."""

    def shutdown(self) -> None:  # noqa: B027 (optional hook: most sinks hold nothing to release)
        """Release clients; called on the deliverer's thread when it stops."""


class KafkaAlertSink(Sink):
    """Alert events as JSON on a Kafka topic, keyed by asset, a batch at a time. The producer is created on the
    deliverer's thread, so an unreachable broker delays only this sink.

    Each event's own answer decides: the events before the first failure are delivered; a failure is retried, the
    events after it waiting (some of them may have been written already: they are written again after it, at least
    once), unless the broker refused the record itself (``kafka_io.record_refused``: larger than the topic's
    ``max.message.bytes``, invalid). Such a refusal ends the round there, and that event is tried again alone with a
    new producer, since kafka-python fails the other records in flight with the same error: only an event that is
    refused alone fails."""

    name = "kafka"

    def __init__(self, kafka: KafkaConfig, cfg: KafkaSinkConfig) -> None:
        self._kafka = kafka
        self._cfg = cfg
        self._producer: KafkaProducer | None = None
        self._alone = False  # the last round ended on a refusal that may not be its event's own: try that one alone
        self.label = f"kafka:{cfg.topic}"
        self.kinds = tuple(cfg.events)
        self.max_age_s = cfg.max_age_h * 3600
        self.worst_item_s = 3 * cfg.timeout_s  # creating the producer, its metadata, then the batch

    def send(self, items: Sequence[Item], control: RoundControl) -> list[Outcome]:
        if not control.go_on(first=True):
            return []
        alone, self._alone = self._alone, False
        tried = list(items[:1] if alone else items)
        try:  # one batch, bounded by timeout_s
            if self._producer is None:
                timeout_ms = round(self._cfg.timeout_s * 1000)
                self._producer = kafka_io.make_producer(self._kafka, max_block_ms=timeout_ms,
                                                        request_timeout_ms=timeout_ms,
                                                        bootstrap_timeout_ms=timeout_ms)
            results = kafka_io.send_json_each(self._producer, self._cfg.topic, tried, timeout_s=self._cfg.timeout_s)
        except Exception as exc:  # no producer (no broker answers), or a bug: the whole batch is tried again
            self._drop_producer()
            return [("retry", _first_line(exc))]
        outcomes: list[Outcome] = []
        for (_key, doc), error in zip(tried, results, strict=False):
            if error is None:
                outcomes.append(("delivered", None))
                continue
            self._drop_producer()  # what it still holds must not be written later, behind newer events
            if not kafka_io.record_refused(error):
                outcomes.append(("retry", _first_line(error)))
            elif len(tried) == 1:  # its own answer: no other record of this producer was in flight
                outcomes.append(("refused", f"{_first_line(error)} ({len(orjson.dumps(doc))} bytes)"))
            else:  # the round ends here; the next one takes this event alone
                self._alone = True
            break
        return outcomes

    def _drop_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=0)
            except Exception as exc:
                log.debug("alert sink %s: closing the producer: %s", self.label, _first_line(exc))
            self._producer = None

    def shutdown(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)


class WebhookAlertSink(Sink):
    """Alert events POSTed one by one as JSON. A try, from connecting to the end of the answer, lasts at most about
    ``timeout_s`` (``_TryDeadline``; the host name's lookup aside): a receiver that trickles its answer is cut off.
    Connection errors, timeouts, broken answers and the answers ``retryable_http`` accepts are retried ``retries``
    times at once with doubling backoff (``Retry-After`` is honoured up to 30 s) before the event goes back to the
    outbox; other answers refuse it. Logs name only the host: webhook URLs often carry a token."""

    name = "webhook"

    def __init__(self, cfg: WebhookSinkConfig) -> None:
        self._cfg = cfg
        assert cfg.url is not None  # required while the webhook is enabled
        self._url = cfg.url
        self._host = urlsplit(cfg.url).hostname or "?"
        self._headers = {"Content-Type": "application/json", "User-Agent": "sensorwatch-alerts",
                         **{k: v.get_secret_value() for k, v in cfg.headers.items()}}
        self.label = f"webhook:{self._host}"
        self.kinds = tuple(cfg.events)
        self.max_age_s = cfg.max_age_h * 3600
        self.worst_item_s = _MAX_BACKOFF_S + cfg.timeout_s  # a wait before a try, then the try (renewed before each)

    def send(self, items: Sequence[Item], control: RoundControl) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for _key, doc in items:
            if not control.go_on(first=not outcomes):
                break
            outcome = self._post_with_retries(orjson.dumps(doc), control)
            outcomes.append(outcome)
            if outcome[0] in ("retry", "stopped"):
                break
        return outcomes

    def _post_with_retries(self, body: bytes, control: RoundControl) -> Outcome:
        """One event's outcome. The lease is renewed before each retry: a lease that is no longer ours, or a
        shutdown, stops the tries (``stopped``: the event stays as it is)."""
        error, wait_s = "not tried", 0.0
        for attempt in range(self._cfg.retries + 1):
            if attempt:
                delay = wait_s or min(self._cfg.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
                if control.aborted.wait(delay):
                    return "stopped", f"{error} (shutting down)"
                if not control.still_ours():
                    return "stopped", f"{error} (the delivery lease went to another process)"
            retry, err, wait_s = self._post(body)
            if err is None:
                return "delivered", None
            error = err
            if not retry:
                return "refused", error
        return "retry", error

    def _post(self, body: bytes) -> tuple[bool, str | None, float]:
        """One try: (worth retrying, error or None, seconds the server asked us to wait or 0)."""
        request = urllib.request.Request(self._url, data=body, headers=self._headers, method="POST")
        started = time.monotonic()
        deadline = _TryDeadline(self._cfg.timeout_s)
        try:
            # past a 2xx status line the receiver has the event, whatever its body does (cut off by the deadline,
            # or broken): it is delivered, not sent again
            with deadline, _NO_REDIRECTS.open(request, timeout=self._cfg.timeout_s) as response, \
                    contextlib.suppress(Exception):
                response.read(65536)
            return False, None, 0.0
        except urllib.error.HTTPError as exc:
            header = ((exc.headers.get("Retry-After") or "") if exc.headers else "").strip()
            wait_s = min(int(header), _MAX_BACKOFF_S) if header.isascii() and header.isdigit() else 0.0
            return retryable_http(exc.code), f"HTTP {exc.code}", wait_s
        except Exception as exc:  # URLError, timeouts, a broken answer (BadStatusLine): all worth another try
            if deadline.expired:
                return True, f"no whole answer within {self._cfg.timeout_s:g}s", 0.0
            reason = getattr(exc, "reason", exc)
            if isinstance(exc, (urllib.error.URLError, OSError)):
                return True, f"{type(reason).__name__} after {time.monotonic() - started:.1f}s", 0.0
            if isinstance(exc, (ValueError, http.client.InvalidURL)):  # could not be built: its text repeats a secret
                return True, f"{type(exc).__name__} building the request (check sinks.webhook.url and headers)", 0.0
            return True, _first_line(exc), 0.0


class _TryDeadline:
    """Bounds one webhook try as a whole: the sockets it connects (on this thread, through ``_NO_REDIRECTS``) are
    shut down once ``timeout_s`` has passed, which ends a read in progress. urllib's own timeout bounds each socket
    operation only, so a receiver trickling its answer a byte at a time could otherwise hold a try (and the lease)
    for as long as it likes."""

    _current = threading.local()

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer: threading.Timer | None = None
        self.expired = False

    def __enter__(self) -> _TryDeadline:
        self._timer = threading.Timer(self._timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()
        _TryDeadline._current.deadline = self
        return self

    def __exit__(self, *exc: object) -> None:
        _TryDeadline._current.deadline = None
        if self._timer is not None:
            self._timer.cancel()

    @classmethod
    def watch(cls, sock: socket.socket) -> None:
        """Put ``sock`` under the deadline of this thread's try, if there is one (shut at once if it has passed)."""
        deadline: _TryDeadline | None = getattr(cls._current, "deadline", None)
        if deadline is not None:
            with deadline._lock:
                deadline._sockets.append(sock)
                if not deadline.expired:
                    return
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # closed already
        sock.shutdown(socket.SHUT_RDWR)


class _DeadlineHTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _TryDeadline.watch(self.sock)


class _DeadlineHTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()  # the TLS socket, after the handshake (bounded per operation by the timeout)
        _TryDeadline.watch(self.sock)


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_DeadlineHTTPConnection, req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_DeadlineHTTPSConnection, req, context=self._context)


def retry_delay_s(attempts: int) -> float:
    """Seconds before an event whose ``attempts``-th try just failed is tried again."""
    return min(RETRY_BASE_S * 2 ** max(attempts - 1, 0), RETRY_MAX_S)


class OutboxDeliverer:
    """Delivers one sink's outbox on a daemon thread (see the module docstring); ``notify`` wakes it for events
    just committed, ``close`` stops it after the round in progress and hands the lease back. ``deliver_once`` is
    one round, on the caller's thread (tests call it directly with ``start=False``)."""

    def __init__(self, sink: Sink, sessions: sessionmaker[Session], *, holder: str | None = None,
                 clock: Callable[[], datetime] | None = None, start: bool = True) -> None:
        self.sink = sink
        self.stats = SinkStats()
        self._sessions = sessions
        self._holder = holder or repo.new_holder()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._wake = threading.Event()
        self._closing = threading.Event()
        self.aborted = threading.Event()  # set when close() runs out of time: stop waiting on retries
        self._next_prune = 0.0
        self._lease_renew_at: datetime | None = None  # while we hold the lease: when to renew it
        self._next_lease_try: datetime | None = None  # while another process holds it: when to try again
        self._failing_db = False
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name=f"alert-sink-{sink.name}", daemon=True)
            self._thread.start()

    def notify(self) -> None:
        """New events are committed: look now rather than at the next poll."""
        self._wake.set()

    def deliver_once(self) -> bool:
        """One round: take or renew the lease, try the due head of the outbox, record the outcomes. True when
        events are still due right away (another round would have work)."""
        sink, now = self.sink, self._clock()
        if not self._hold_lease(now):
            self.stats.pending = 0  # counted by the process that delivers the sink
            return False
        with self._sessions.begin() as session:
            rows = [(r.id, r.asset, r.document, r.attempts, r.created_at, r.next_attempt_at)
                    for r in repo.pending_outbox(session=session, sink=sink.name, limit=BATCH)]
            pending = len(rows) if len(rows) < BATCH else (  # counted only when the head is not all of it
                repo.count_outbox(session=session, sink=sink.name).get((sink.name, "pending"), 0))
        self.stats.pending = pending
        self._prune(now)
        if not rows or rows[0][5] > now:
            return False
        cutoff = now - timedelta(seconds=sink.max_age_s)
        expired = {r[0]: f"undelivered after {sink.max_age_s / 3600:g} h" for r in rows if r[4] < cutoff}
        todo = [r for r in rows if r[0] not in expired]
        control = RoundControl(self.aborted, time.monotonic() + LEASE_S / 3, lambda: self._hold_lease(self._clock()))
        try:
            outcomes = sink.send([(r[1].encode(), r[2]) for r in todo], control) if todo else []
        except Exception as exc:  # a sink bug: count it as a failed try of the head (what it sent is sent again)
            outcomes = [("retry", _first_line(exc))]
        delivered = [r[0] for r, (what, _) in zip(todo, outcomes, strict=False) if what == "delivered"]
        refused = {r[0]: error or "refused" for r, (what, error) in zip(todo, outcomes, strict=False)
                   if what == "refused"}
        retry = [(r, error or "failed") for r, (what, error) in zip(todo, outcomes, strict=False) if what == "retry"]
        done = self._clock()
        with self._sessions.begin() as session:
            repo.mark_outbox_delivered(session=session, ids=delivered, now=done)
            repo.mark_outbox_failed(session=session, failures=expired, now=done, attempted=False)
            repo.mark_outbox_failed(session=session, failures=refused, now=done)
            for r, error in retry:  # only while the lease is still ours: else the new holder decides
                repo.retry_outbox_later(session=session, event_id=r[0], error=error, sink=sink.name,
                                        holder=self._holder, at=done + timedelta(seconds=retry_delay_s(r[3] + 1)))
        self.stats.delivered += len(delivered)
        self.stats.failed += len(expired) + len(refused)
        self.stats.retried += len(retry)
        self.stats.pending = pending - len(delivered) - len(expired) - len(refused)
        for event_id, error in {**expired, **refused}.items():
            log.warning("alert sink %s: gave up on outbox event %d: %s", sink.label, event_id, error)
        for r, error in retry:
            log.warning("alert sink %s: %s; %d event(s) wait, the next try in %.0f s", sink.label, error,
                        self.stats.pending, retry_delay_s(r[3] + 1))
        stopped = any(what == "stopped" for what, _ in outcomes)
        return not retry and not stopped and (len(rows) == BATCH or len(outcomes) < len(todo))

    def _hold_lease(self, now: datetime) -> bool:
        """Whether this process delivers the sink now. The lease (``LEASE_S`` + the sink's ``worst_item_s``) is
        renewed once ``LEASE_S / 3`` has passed since it was last taken, so at least ``worst_item_s`` of it is left
        whenever a delivery starts (a renewal that itself took longer than ``LEASE_S / 3`` does not count); a process
        that does not hold it tries again every ``LEASE_S / 3`` (so idle rounds write nothing). Times are this host's
        clock, compared with other hosts' through the lease row: hosts' clocks must agree to well within
        ``LEASE_S / 3`` (NTP)."""
        if self._lease_renew_at is not None and now < self._lease_renew_at:
            return True
        if self._next_lease_try is not None and now < self._next_lease_try:
            return False
        with self._sessions.begin() as session:
            held = repo.take_sink_lease(session=session, sink=self.sink.name, holder=self._holder, now=now,
                                        ttl_s=self.lease_s)
        if held and (self._clock() - now).total_seconds() > LEASE_S / 3:  # too slow to rely on: renew again first
            self._lease_renew_at = self._next_lease_try = None
            return False
        self._lease_renew_at = now + timedelta(seconds=LEASE_S / 3) if held else None
        self._next_lease_try = None if held else now + timedelta(seconds=LEASE_S / 3)
        return held

    @property
    def lease_s(self) -> float:
        """How long a taken lease lasts: ``LEASE_S`` plus the longest stretch between two of its checks."""
        return LEASE_S + self.sink.worst_item_s

    def _prune(self, now: datetime) -> None:
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + 3600
        with self._sessions.begin() as session:
            gone = repo.prune_outbox(session=session, finished_before=now - timedelta(days=KEEP_DAYS))
        if gone:
            log.info("alert sink %s: %d finished outbox event(s) older than %g days deleted", self.sink.label, gone,
                     KEEP_DAYS)

    def _run(self) -> None:
        try:
            while not self.aborted.is_set():
                closing = self._closing.is_set()
                try:
                    more = self.deliver_once()
                    if self._failing_db:
                        log.info("alert sink %s: the database answers again", self.sink.label)
                    self._failing_db = False
                except Exception as exc:
                    if not self._failing_db:
                        log.warning("alert sink %s: outbox round failed (the events stay queued): %s",
                                    self.sink.label, _first_line(exc))
                    self._failing_db, more = True, False
                if closing and not more:
                    break
                if not more:
                    self._wake.wait(POLL_S)
                    self._wake.clear()
        finally:
            try:
                with self._sessions.begin() as session:
                    repo.release_sink_lease(session=session, sink=self.sink.name, holder=self._holder)
            except Exception:
                log.warning("alert sink %s: could not hand its lease back (it expires within %.0f s)",
                            self.sink.label, self.lease_s)
            try:
                self.sink.shutdown()
            except Exception:
                log.exception("alert sink %s: shutdown failed", self.sink.label)

    def begin_close(self) -> None:
        """Ask the thread to finish the round in progress and one more for events just committed, then stop."""
        self._closing.set()
        self._wake.set()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop within about ``timeout_s``: after it, a delivery in progress is given up (a request already sent
        may still take up to its own ``timeout_s``). Whatever is still pending stays in the outbox for the next
        process."""
        self.begin_close()
        self.join(time.monotonic() + timeout_s)
        if self.alive():
            self.abort()
            self.join(time.monotonic() + 1.0)

    def abort(self) -> None:
        """Give up the delivery in progress: no further try or wait starts."""
        self.aborted.set()

    def alive(self) -> bool:
        """Whether the thread still runs."""
        return self._thread is not None and self._thread.is_alive()

    def join(self, deadline: float) -> None:
        """Wait for the thread until ``deadline`` (``time.monotonic()``)."""
        if self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 0.0))


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would turn the POST into a GET and send our headers (secrets) elsewhere: treat it as an error."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects, _DeadlineHTTPHandler, _DeadlineHTTPSHandler)


class AlertSinks:
    """The configured sinks and their deliverers. ``outbox_rows`` (inside the alert's transaction) queues events;
    ``notify`` (after commit) wakes the deliverers; ``close`` stops them within a deadline."""

    def __init__(self, deliverers: Sequence[OutboxDeliverer]) -> None:
        self.deliverers = list(deliverers)

    def outbox_rows(self, events: Sequence[AlertEvent]) -> list[dict[str, Any]]:
        """One outbox row per (event, sink that selects its kind), for ``repo.enqueue_outbox``."""
        return outbox_rows([d.sink for d in self.deliverers], events)

    def notify(self) -> None:
        """Events were committed to the outbox: wake the deliverers."""
        for d in self.deliverers:
            d.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Give the deliverers up to ``timeout_s`` (together) to finish their rounds, then stop them."""
        deadline = time.monotonic() + timeout_s
        for d in self.deliverers:
            d.begin_close()
        for d in self.deliverers:
            d.join(deadline)
        late = [d for d in self.deliverers if d.alive()]
        for d in late:
            d.abort()
        grace = time.monotonic() + 1.0
        for d in late:
            d.join(grace)
        for d in self.deliverers:
            s = d.stats
            log.info("alert sink %s: %d delivered, %d failed, %d tries to retry, %d pending", d.sink.label,
                     s.delivered, s.failed, s.retried, s.pending)

    def stats(self) -> dict[str, SinkStats]:
        """Counters per sink label."""
        return {d.sink.label: d.stats for d in self.deliverers}


@dataclass(frozen=True)
class SinkSummary:
    """One sink's outbox as ``sinks status`` and ``check`` show it. ``label`` is None for a sink that is no longer
    configured; ``oldest_pending_s`` is None without pending events; ``delivered_by`` is the live lease holder."""

    sink: str
    label: str | None
    pending: int
    delivered: int
    failed: int
    oldest_pending_s: float | None
    delivered_by: str | None


def summarize_outbox(session: Session, config: Config, now: datetime) -> list[SinkSummary]:
    """Per sink configured in ``config`` or holding outbox events, by name: counts, oldest pending age, holder."""
    counts = repo.count_outbox(session=session)
    oldest = repo.oldest_pending_outbox(session=session)
    leases = repo.sink_leases(session=session)
    labels = {sink.name: sink.label for sink in configured_sinks(config)}
    out = []
    for name in sorted(set(labels) | {sink for sink, _ in counts}):
        lease = leases.get(name)
        out.append(SinkSummary(
            name, labels.get(name), counts.get((name, "pending"), 0), counts.get((name, "delivered"), 0),
            counts.get((name, "failed"), 0), (now - oldest[name]).total_seconds() if name in oldest else None,
            lease.holder if lease is not None and lease.expires_at > now else None))
    return out


def outbox_rows(sinks: Sequence[Sink], events: Sequence[AlertEvent]) -> list[dict[str, Any]]:
    """One outbox row per (event, sink that selects its kind), for ``repo.enqueue_outbox``."""
    rows = []
    for event in events:
        document = None
        for sink in sinks:
            if selected(sink.kinds, event):
                document = document or event_document(event)
                rows.append({"sink": sink.name, "event_key": event_key(event), "asset": event.alert.asset,
                             "document": document})
    return rows


def configured_sinks(config: Config) -> list[Sink]:
    """The sinks enabled in ``config.sinks`` (no threads, no connections)."""
    sinks: list[Sink] = []
    if config.sinks.kafka is not None and config.sinks.kafka.enabled:
        sinks.append(KafkaAlertSink(config.kafka, config.sinks.kafka))
    if config.sinks.webhook is not None and config.sinks.webhook.enabled:
        sinks.append(WebhookAlertSink(config.sinks.webhook))
    return sinks


def build_sinks(config: Config, sessions: sessionmaker[Session]) -> AlertSinks:
    """The sinks enabled in ``config.sinks``, each with its deliverer thread started (none: an AlertSinks that
    queues nothing)."""
    return AlertSinks([OutboxDeliverer(sink, sessions) for sink in configured_sinks(config)])
