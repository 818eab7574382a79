"""Alert sinks: the event document, event selection, and the outbox delivering to a webhook on a local HTTP server
(in order, at least once, retried after an outage, refused events, too old events, the lease between processes,
re-queueing, pruning), on the embedded SQLite database. Rounds run on the test's thread with a fake clock, except
where the deliverer's own thread is the point. Nothing here may block or raise into the caller."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import WebhookSinkConfig
from pipeline.sinks import (
    LEASE_S,
    RETRY_BASE_S,
    AlertSinks,
    Item,
    OutboxDeliverer,
    Outcome,
    RoundControl,
    Sink,
    WebhookAlertSink,
    event_document,
    event_key,
    retryable_http,
    selected,
)
from pipeline.store import repo
from pipeline.store.tables import AlertOutbox, SinkLease
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
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a slow answer whose client timed out and went: what the delay is for

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
    assert doc["alert"]["off_training"] == {}  # none far outside training (an alert stored before: none either)
    far = AlertEvent("updated", replace(escalation.alert, off_training={"flow": -57.9}), "warning")
    assert event_document(far)["alert"]["off_training"] == {"flow": -57.9}
    json.dumps(doc)  # plain JSON types only
    kinds = ["opened", "escalated", "resolved"]
    assert [selected(kinds, e) for e in _lifecycle()] == [True, False, True, True]
    assert [selected(["updated"], e) for e in (opened, update, escalation)] == [False, True, True]


def test_event_keys_tell_every_event_of_an_incident_apart() -> None:
    events = _lifecycle()
    assert len({event_key(e) for e in events}) == len(events)
    assert event_key(events[0]) == event_key(AlertEvent("opened", _record()))  # a replay gives the same key


class _Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _deliverer(sink: WebhookAlertSink, sessions: sessionmaker[Session], clock: _Clock, holder: str = "a"
               ) -> OutboxDeliverer:
    return OutboxDeliverer(sink, sessions, holder=holder, clock=clock, start=False)


def _enqueue(sessions: sessionmaker[Session], deliverers: list[OutboxDeliverer], events: list[AlertEvent],
             now: datetime) -> None:
    with sessions.begin() as session:
        repo.enqueue_outbox(session=session, rows=AlertSinks(deliverers).outbox_rows(events), now=now)


def _statuses(sessions: sessionmaker[Session]) -> list[tuple[str, int, str | None]]:
    with sessions() as session:
        return [(r.status, r.attempts, r.last_error) for r in reversed(repo.outbox_events(session=session))]


def test_the_outbox_holds_events_through_an_outage_and_delivers_them_once_in_order(
        server_factory: Any, sessions: sessionmaker[Session]) -> None:
    down = threading.Event()
    down.set()
    server = server_factory(lambda n: (503, 0) if down.is_set() else (200, 0))
    clock = _Clock()
    d = _deliverer(_webhook(server.url, retries=1, headers={"Authorization": "Bearer s3cret"}), sessions, clock)
    _enqueue(sessions, [d], _lifecycle(), clock.now)
    _enqueue(sessions, [d], _lifecycle(), clock.now)  # a replayed batch queues nothing twice
    assert [s for s, _, _ in _statuses(sessions)] == ["pending"] * 3  # opened, escalated, resolved; no plain update

    assert d.deliver_once() is False  # the head fails (two tries); the two behind it are not even tried
    assert [doc["event"] for _, _, doc in server.requests] == ["opened", "opened"]
    assert _statuses(sessions) == [("pending", 1, "HTTP 503"), ("pending", 0, None), ("pending", 0, None)]
    assert (d.stats.delivered, d.stats.failed, d.stats.retried, d.stats.pending) == (0, 0, 1, 3)

    down.clear()
    assert d.deliver_once() is False and len(server.requests) == 2  # not due before the backoff has passed
    clock.advance(RETRY_BASE_S)
    d.deliver_once()
    assert [doc["event"] for doc in server.delivered()] == ["opened", "updated", "resolved"]
    assert server.delivered()[1]["escalated"] is True
    assert server.requests[-1][1]["Authorization"] == "Bearer s3cret"
    assert server.requests[-1][1]["Content-Type"] == "application/json"
    assert _statuses(sessions) == [("delivered", 2, None), ("delivered", 1, None), ("delivered", 1, None)]
    d.deliver_once()
    assert len(server.delivered()) == 3  # delivered once
    assert (d.stats.delivered, d.stats.failed, d.stats.retried, d.stats.pending) == (3, 0, 1, 0)


def test_a_webhook_timeout_is_retried_within_the_try(server_factory: Any, sessions: sessionmaker[Session]) -> None:
    server = server_factory(lambda n: (200, 3.0) if n == 0 else (200, 0))  # the first answer comes too late
    clock = _Clock()
    d = _deliverer(_webhook(server.url, timeout_s=0.3, events=["opened"]), sessions, clock)
    _enqueue(sessions, [d], _lifecycle(), clock.now)
    d.deliver_once()
    assert len(server.requests) == 2 and _statuses(sessions) == [("delivered", 1, None)]


def test_the_backoff_doubles_and_events_too_old_are_given_up(server_factory: Any, sessions: sessionmaker[Session],
                                                             caplog: Any) -> None:
    server = server_factory(lambda n: (500, 0))
    clock = _Clock()
    d = _deliverer(_webhook(server.url, retries=0, max_age_h=0.01), sessions, clock)  # 36 s
    _enqueue(sessions, [d], _lifecycle()[:1], clock.now)
    with sessions() as session:
        due = [session.get(AlertOutbox, 1).next_attempt_at]  # type: ignore[union-attr]
    for _ in range(3):
        d.deliver_once()
        with sessions() as session:
            due.append(session.get(AlertOutbox, 1).next_attempt_at)  # type: ignore[union-attr]
        clock.now = due[-1]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(due)]
    assert gaps == [RETRY_BASE_S, 2 * RETRY_BASE_S, 4 * RETRY_BASE_S]  # clock moved to each due time
    clock.advance(36)
    d.deliver_once()
    assert len(server.requests) == 3  # too old: given up without another try
    assert _statuses(sessions) == [("failed", 3, "undelivered after 0.01 h")]
    assert d.stats.failed == 1 and "gave up" in caplog.text and "secret-token" not in caplog.text


def test_a_refused_event_fails_at_once_and_the_next_ones_go_on(server_factory: Any, sessions: sessionmaker[Session]
                                                               ) -> None:
    server = server_factory(lambda n: (400, 0) if n == 0 else (200, 0))
    clock = _Clock()
    d = _deliverer(_webhook(server.url, retries=3), sessions, clock)
    _enqueue(sessions, [d], _lifecycle(), clock.now)
    d.deliver_once()
    assert len(server.requests) == 3  # the refusal is not retried
    assert _statuses(sessions) == [("failed", 1, "HTTP 400"), ("delivered", 1, None), ("delivered", 1, None)]
    with sessions.begin() as session:
        assert repo.requeue_outbox(session=session, now=clock.now, sink="webhook") == 1
    d.deliver_once()
    assert [doc["event"] for doc in server.delivered()] == ["updated", "resolved", "opened"]
    assert _statuses(sessions)[0] == ("delivered", 1, None)
    with sessions.begin() as session:
        assert repo.prune_outbox(session=session, finished_before=clock.now) == 0  # finished just now: kept
        assert repo.prune_outbox(session=session, finished_before=clock.now + timedelta(days=8)) == 3
        assert repo.count_outbox(session=session) == {}


def test_only_the_lease_holder_delivers_and_a_dead_holders_lease_is_taken_over(
        server_factory: Any, sessions: sessionmaker[Session]) -> None:
    server = server_factory(lambda n: (200, 0))
    clock = _Clock()
    a = _deliverer(_webhook(server.url), sessions, clock, holder="a")
    b = _deliverer(_webhook(server.url), sessions, clock, holder="b")
    with sessions.begin() as session:
        assert repo.take_sink_lease(session=session, sink="webhook", holder="a", now=clock.now, ttl_s=LEASE_S)
    _enqueue(sessions, [a], _lifecycle(), clock.now)
    assert b.deliver_once() is False and server.requests == []  # "a" holds the lease (and then dies)
    clock.advance(LEASE_S - 1)
    b.deliver_once()
    assert server.requests == []
    clock.advance(LEASE_S / 3 + 1)
    b.deliver_once()  # the lease has expired, and "b" tries again a third of a lease after its last try: it takes over
    assert len(server.delivered()) == 3
    assert a.deliver_once() is False  # "b" holds it now; "a" is back but waits its turn
    assert len(server.requests) == 3


def test_a_request_that_cannot_be_built_is_reported_without_its_headers() -> None:
    """The configuration refuses such a header; if one got through, http.client's error text (the header value, a
    secret) must not reach the logs and the outbox."""
    from pydantic import SecretStr

    cfg = WebhookSinkConfig.model_validate({"url": "http://127.0.0.1:9/x", "timeout_s": 1.0})
    sink = WebhookAlertSink(cfg.model_copy(update={"headers": {"Authorization": SecretStr("Bearer T0KEN\n")}}))
    retry, error, _ = sink._post(b"{}")
    assert retry and error is not None and "T0KEN" not in error
    assert error == "ValueError building the request (check sinks.webhook.url and headers)"


def test_an_unreachable_webhook_blocks_neither_the_caller_nor_close(sessions: sessionmaker[Session]) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = OutboxDeliverer(_webhook(f"http://127.0.0.1:{port}/x", retries=1), sessions)  # its own thread
    sinks = AlertSinks([d])
    started = time.monotonic()
    _enqueue(sessions, [d], _lifecycle(), datetime.now(UTC))
    sinks.notify()
    assert time.monotonic() - started < 0.5
    deadline = time.monotonic() + 10
    while d.stats.retried < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    sinks.close(timeout_s=5)
    assert time.monotonic() - started < 5
    assert [status for status, _, _ in _statuses(sessions)] == ["pending"] * 3  # kept for the next process
    with sessions() as session:
        assert session.get(SinkLease, "webhook") is None  # handed back at close


def test_no_sinks_configured_queues_nothing() -> None:
    sinks = AlertSinks([])
    assert sinks.outbox_rows(_lifecycle()) == []
    sinks.notify()
    sinks.close()
    assert sinks.stats() == {}


def test_sink_outcomes_are_metrics_a_monitoring_system_can_alert_on(server_factory: Any,
                                                                     sessions: sessionmaker[Session]) -> None:
    from prometheus_client import generate_latest

    from pipeline.metrics import PipelineMetrics

    server = server_factory(lambda n: (400, 0) if n == 0 else (503, 0))
    clock = _Clock()
    d = _deliverer(_webhook(server.url, retries=0), sessions, clock)
    metrics = PipelineMetrics()
    metrics.watch_sinks(AlertSinks([d]).stats)
    _enqueue(sessions, [d], _lifecycle(), clock.now)
    d.deliver_once()  # opened refused, escalated retried later, resolved waits
    text = generate_latest(metrics.registry).decode()
    label = d.sink.label
    assert f'sensorwatch_alert_sink_events_total{{outcome="failed",sink="{label}"}} 1.0' in text
    assert f'sensorwatch_alert_sink_events_total{{outcome="retried",sink="{label}"}} 1.0' in text
    assert f'sensorwatch_alert_sink_events_total{{outcome="delivered",sink="{label}"}} 0.0' in text
    assert f'sensorwatch_alert_sink_pending{{sink="{label}"}} 2.0' in text
    assert metrics.healthy()[0]  # a failing sink is a metric to alert on, not a reason to restart the pipeline


def test_a_round_ends_within_its_time_budget_and_says_more_is_due(server_factory: Any, sessions: sessionmaker[Session],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.sinks

    monkeypatch.setattr(pipeline.sinks, "LEASE_S", 1.5)  # a round's budget is a third of it: 0.5 s
    server = server_factory(lambda n: (200, 0.3))  # each answer takes 0.3 s
    clock = _Clock()
    d = _deliverer(_webhook(server.url), sessions, clock)
    _enqueue(sessions, [d], _lifecycle(), clock.now)
    assert d.deliver_once() is True  # two sent within the budget; the third is still due
    assert _statuses(sessions) == [("delivered", 1, None), ("delivered", 1, None), ("pending", 0, None)]
    assert d.deliver_once() is False
    assert [doc["event"] for doc in server.delivered()] == ["opened", "updated", "resolved"]


class _SlowSink(Sink):
    """Each delivery moves the fake clock on by ``step_s`` (a slow receiver); between deliveries another process
    (``rival``) gets a round. Keeps what it delivered."""

    name, label, kinds, max_age_s = "webhook", "webhook:slow", ("opened", "updated", "resolved"), 3600.0

    def __init__(self, clock: _Clock, step_s: float, worst_item_s: float) -> None:
        self.clock, self.step_s, self.worst_item_s = clock, step_s, worst_item_s
        self.sent: list[str] = []
        self.rival: OutboxDeliverer | None = None

    def send(self, items: Sequence[Item], control: RoundControl) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for _, doc in items:
            if not control.go_on(first=not outcomes):
                break
            self.clock.advance(self.step_s)
            self.sent.append(str(doc["event"]))
            outcomes.append(("delivered", None))
            if self.rival is not None:
                assert self.rival.deliver_once() is False  # the lease is still ours: the rival sends nothing
        return outcomes


def test_the_lease_is_renewed_before_each_delivery_so_no_rival_sends_meanwhile(sessions: sessionmaker[Session]
                                                                               ) -> None:
    clock = _Clock()
    ours = _SlowSink(clock, step_s=25, worst_item_s=27)  # each delivery near the longest one may take
    theirs = _SlowSink(clock, step_s=25, worst_item_s=27)
    a = OutboxDeliverer(ours, sessions, holder="a", clock=clock, start=False)
    b = OutboxDeliverer(theirs, sessions, holder="b", clock=clock, start=False)
    ours.rival = b
    _enqueue(sessions, [a], _lifecycle() + _lifecycle("pump-2"), clock.now)  # 8 events, 200 s of deliveries
    while a.deliver_once():
        pass
    assert ours.sent == ["opened", "updated", "updated", "resolved"] * 2 and theirs.sent == []
    assert b.stats.pending == 0  # only the process that delivers the sink counts its pending events
    with sessions() as session:
        assert repo.count_outbox(session=session) == {("webhook", "delivered"): 8}


def test_events_given_up_for_their_age_can_be_queued_again(server_factory: Any, sessions: sessionmaker[Session]
                                                           ) -> None:
    server = server_factory(lambda n: (200, 0))
    clock = _Clock()
    d = _deliverer(_webhook(server.url, max_age_h=1), sessions, clock)
    _enqueue(sessions, [d], _lifecycle()[:1], clock.now)
    clock.advance(2 * 3600)  # no pipeline ran for two hours
    d.deliver_once()
    assert _statuses(sessions) == [("failed", 0, "undelivered after 1 h")] and server.requests == []
    with sessions.begin() as session:
        assert repo.requeue_outbox(session=session, now=clock.now) == 1
    d.deliver_once()
    assert _statuses(sessions) == [("delivered", 1, None)] and len(server.delivered()) == 1


@pytest.mark.parametrize(("code", "retry"), [(408, True), (425, True), (429, True), (500, True), (503, True),
                                             (507, True), (520, True), (524, True), (501, False), (505, False),
                                             (400, False), (404, False), (410, False)])
def test_which_http_answers_are_retried(code: int, retry: bool) -> None:
    assert retryable_http(code) is retry


def test_a_failing_round_neither_kills_the_thread_nor_loses_events(server_factory: Any,
                                                                   sessions: sessionmaker[Session]) -> None:
    server = server_factory(lambda n: (200, 0))

    class Flaky(OutboxDeliverer):
        failures = 2

        def deliver_once(self) -> bool:
            if self.failures:
                self.failures -= 1
                raise TimeoutError()  # an error with no text (the database timing out)
            return super().deliver_once()

    d = Flaky(_webhook(server.url), sessions)
    _enqueue(sessions, [d], _lifecycle(), datetime.now(UTC))
    deadline = time.monotonic() + 15
    while len(server.delivered()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    d.close(5)
    assert [doc["event"] for doc in server.delivered()] == ["opened", "updated", "resolved"]


def test_close_keeps_one_deadline_for_all_sinks(server_factory: Any, sessions: sessionmaker[Session]) -> None:
    hung = server_factory(lambda n: (200, 30.0))  # both answer only when the test ends
    other = server_factory(lambda n: (200, 30.0))
    second = _webhook(other.url, timeout_s=1.5, retries=3)
    second.name = "kafka"  # stands for a second sink: its own lease and events
    sinks = AlertSinks([OutboxDeliverer(_webhook(hung.url, timeout_s=1.5, retries=3), sessions),
                        OutboxDeliverer(second, sessions)])
    _enqueue(sessions, sinks.deliverers, _lifecycle(), datetime.now(UTC))
    sinks.notify()
    deadline = time.monotonic() + 10
    while (len(hung.requests) < 1 or len(other.requests) < 1) and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    sinks.close(timeout_s=1.0)
    assert time.monotonic() - started < 1.0 + 1.0 + 0.5  # the deadline, then one shared second of grace
    with sessions() as session:
        assert repo.count_outbox(session=session) == {("webhook", "pending"): 3, ("kafka", "pending"): 3}


def _raw_receiver(answer: Callable[[Any], None], connections: int = 1) -> tuple[str, threading.Thread]:
    """A webhook URL served by a bare socket: for each of ``connections`` connections, the request is read, then
    ``answer(conn)`` writes whatever it likes. The thread ends after the last one."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def run() -> None:
        with listener:
            for _ in range(connections):
                conn, _ = listener.accept()
                with conn:
                    conn.recv(65536)
                    answer(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/x", thread


def _trickle(conn: Any, data: bytes) -> bool:
    """Send ``data`` a byte every 0.1 s; False when the client shut the connection first."""
    try:
        for byte in data:
            conn.sendall(bytes([byte]))
            time.sleep(0.1)
    except OSError:
        return False
    return True


def test_a_receiver_trickling_its_answer_is_cut_off_at_timeout_s(sessions: sessionmaker[Session]) -> None:
    """Every byte comes well within the per-read timeout, but the whole answer would take 30 s: the try ends after
    about ``timeout_s``, so it cannot outlive the lease."""
    cut_off = threading.Event()
    status_line = bytes(itertools.islice(itertools.cycle(b"HTTP/1.1 200 OK\r\nX-Slow: yes\r\n"), 300))
    url, _ = _raw_receiver(lambda conn: None if _trickle(conn, status_line) else cut_off.set())
    clock = _Clock()
    d = _deliverer(_webhook(url, timeout_s=0.5, retries=0), sessions, clock)
    _enqueue(sessions, [d], _lifecycle()[:1], clock.now)
    started = time.monotonic()
    assert d.deliver_once() is False
    assert time.monotonic() - started < 5.0  # the answer alone would take 30 s
    status, attempts, last_error = _statuses(sessions)[0]
    assert (status, attempts, last_error) == ("pending", 1, "no whole answer within 0.5s")
    assert cut_off.wait(5)


def test_a_2xx_answer_whose_body_trickles_counts_as_delivered(sessions: sessionmaker[Session]) -> None:
    """The status line says 200, then the body crawls past the deadline: the receiver has the event, so it is
    delivered once, not sent again."""
    answers: list[bool] = []

    def answer(conn: Any) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        answers.append(_trickle(conn, b"." * 100))

    url, thread = _raw_receiver(answer, connections=1)
    clock = _Clock()
    d = _deliverer(_webhook(url, timeout_s=0.5, retries=2), sessions, clock)
    _enqueue(sessions, [d], _lifecycle()[:1], clock.now)
    d.deliver_once()
    assert _statuses(sessions) == [("delivered", 1, None)]
    thread.join(15)
    assert answers == [False]  # one connection, shut by the client at its deadline: no second send


def test_a_broken_answer_is_a_failed_try_not_an_escape(sessions: sessionmaker[Session]) -> None:
    def serve(answer: bytes) -> tuple[str, threading.Thread]:
        return _raw_receiver(lambda conn: conn.sendall(answer), connections=2)

    clock = _Clock()
    cases = ((b"garbage\r\n\r\n", "BadStatusLine"),
             (b"HTTP/1.1 503 Busy\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n\r\n", "HTTP 503"))
    for event_id, (answer, error) in enumerate(cases, start=1):
        url, thread = serve(answer)
        d = _deliverer(_webhook(url, retries=1), sessions, clock)
        _enqueue(sessions, [d], _lifecycle(f"pump-{event_id}")[:1], clock.now)
        assert d.deliver_once() is False  # no exception: two tries failed, the event waits for the backoff
        thread.join(5)
        status, attempts, last_error = _statuses(sessions)[-1]
        assert (status, attempts) == ("pending", 1) and last_error is not None and error in last_error
        with sessions.begin() as session:  # out of the way of the next case
            repo.mark_outbox_failed(session=session, failures={event_id: "test done"}, now=clock.now)


def test_a_try_given_up_for_a_lost_lease_records_nothing(server_factory: Any, sessions: sessionmaker[Session]
                                                         ) -> None:
    clock = _Clock()

    def answer(n: int) -> tuple[int, float]:
        with sessions.begin() as session:  # meanwhile another process takes the lease over (after a long pause)
            session.execute(update(SinkLease).where(SinkLease.sink == "webhook").values(holder="b"))
        clock.advance(LEASE_S / 3 + 1)  # past this process's next lease check
        return 503, 0

    server = server_factory(answer)
    d = _deliverer(_webhook(server.url, retries=2), sessions, clock)
    _enqueue(sessions, [d], _lifecycle()[:1], clock.now)
    assert d.deliver_once() is False
    assert len(server.requests) == 1  # no second try once the lease is gone
    assert _statuses(sessions) == [("pending", 0, None)]  # the new holder finds the event as it was
    with sessions() as session:
        row = session.get(AlertOutbox, 1)
        assert row is not None and row.next_attempt_at <= clock.now


def test_a_database_error_while_renewing_the_lease_keeps_what_was_sent(sessions: sessionmaker[Session]) -> None:
    clock = _Clock()
    sink = _SlowSink(clock, step_s=1, worst_item_s=5)

    class Blip(OutboxDeliverer):
        checks = 0

        def _hold_lease(self, now: datetime) -> bool:
            self.checks += 1
            if self.checks == 3:  # the round's check, the first event's, then the database goes away
                raise OSError("database blip")
            return super()._hold_lease(now)

    d = Blip(sink, sessions, holder="a", clock=clock, start=False)
    _enqueue(sessions, [d], _lifecycle(), clock.now)
    d.deliver_once()  # no exception: the round stops, and records what it did
    assert sink.sent == ["opened"]
    assert _statuses(sessions) == [("delivered", 1, None)] + [("pending", 0, None)] * 3
