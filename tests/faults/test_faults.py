"""Fault tests on the real broker and real PostgreSQL: crashes, rebalances, a database outage, bad input.

Each prints its figures (run pytest with -s to see them) and checks the one invariant that matters: every window the
stream closes is in the database exactly once.
"""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from faultkit import START, Deployment, deploy
from kafka import KafkaConsumer

from pipeline.runner import RunStats, run_pipeline

pytestmark = pytest.mark.integration


def _check_exactly_once(dep: Deployment, timeout_s: float) -> tuple[int, int]:
    rows, distinct = dep.wait_complete(timeout_s)
    missing = sorted(dep.expected - dep.stored_keys())[:10]
    if missing:
        print(dep.debug_state())
    assert distinct == len(dep.expected), (
        f"{distinct} of {len(dep.expected)} windows stored; missing e.g. {missing}\n{dep.log_tail()}")
    assert rows == distinct, f"{rows - distinct} duplicate score rows"
    assert dep.stored_keys() == dep.expected
    return rows, distinct


# a low bar for what counts (incident windows above 1 / 0.9 of the threshold), so this normal stream raises some bars
AFTERMATH = {"relative": 0.9, "half_life_s": 300.0}
DRIFT = {"span_s": 7200.0}  # 120 windows: the offsets move, and the stream still raises some bars


def test_sigkill_at_random_points_loses_and_duplicates_nothing(
        kafka_bootstrap_servers: str, topic_name: str, pg_database_url: str, tmp_path: Path,
        webhook_receiver) -> None:  # type: ignore[no-untyped-def]
    receiver = webhook_receiver
    dep = deploy(tmp_path, bootstrap=kafka_bootstrap_servers, topic=topic_name, db_url=pg_database_url,
                 assets=10, rows_per_asset=5000, ewma_alpha=0.3, aftermath=AFTERMATH, drift=DRIFT,
                 webhook=receiver.url)
    rng = random.Random(20261126)
    started = time.monotonic()
    stream = dep.produce(rate_per_s=900)
    proc = dep.start_consumer()
    kills = []
    for _ in range(6):
        dep.wait_progress(timeout_s=60)  # the restarted consumer is processing again
        time.sleep(rng.uniform(0.2, 3.0))
        kills.append((round(time.monotonic() - started, 1), dep.stored()[0]))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = dep.start_consumer()
    stream.join()
    try:
        rows, _ = _check_exactly_once(dep, timeout_s=240)
        outbox_breaks, events, duplicates = dep.outbox_breaks(receiver.accepted, timeout_s=120)
    finally:
        dep.stop_all()
    assert not outbox_breaks, f"alert events: {outbox_breaks[:3]}"  # every event queued once, received, in order
    assert events >= 10, f"only {events} alert events: the outbox check would be vacuous"
    breaks = dep.smoothing_breaks(0.3)  # the EWMA score stream carried on across every kill
    assert not breaks, f"{len(breaks)} windows off the smoothed stream, e.g. {breaks[:3]}"
    judged_breaks, floors = dep.judged_breaks()  # floors, flags and alerts as if nothing had been killed
    assert not judged_breaks, f"{len(judged_breaks)} decisions differ from an unbroken run, e.g. {judged_breaks[:3]}"
    assert floors >= 10, f"only {floors} windows had a raised bar: the aftermath check would be vacuous"
    scoring_breaks, moved = dep.scoring_breaks()  # scores and drift offsets as one unbroken chain computes them
    assert not scoring_breaks, f"{len(scoring_breaks)} windows differ from an unbroken run, e.g. {scoring_breaks[:2]}"
    assert moved >= 1000, f"only {moved} windows have drift offsets off 0: the drift check would be vacuous"
    print(f"\nSIGKILL: {len(dep.messages)} readings, {len(kills)} kills at (s, rows stored) {kills}; "
          f"{rows} windows stored == {len(dep.expected)} expected, 0 duplicates, smoothed stream continuous, "
          f"alerts, flags, {floors} aftermath floors and {moved} drift offsets as an unbroken run's, "
          f"{events} webhook events delivered as queued ({duplicates} sent twice), "
          f"{time.monotonic() - started:.0f}s")
    assert sum(stored < len(dep.expected) for _, stored in kills) >= 5  # mid-stream, not after the end
    assert len(dep.messages) >= 50_000


def test_partitions_moving_between_two_consumers(
        kafka_bootstrap_servers: str, topic_name: str, pg_database_url: str, tmp_path: Path) -> None:
    dep = deploy(tmp_path, bootstrap=kafka_bootstrap_servers, topic=topic_name, db_url=pg_database_url,
                 assets=8, rows_per_asset=3000)
    stream = dep.produce(rate_per_s=1500)
    first = dep.start_consumer()
    dep.wait_for_log(0, "partitions assigned", 90)  # each step waits for the last one's rebalance (not a guess of
    dep.wait_progress(30)  # how long it takes on a loaded machine), so partitions really move
    second = dep.start_consumer()  # the group rebalances: partitions move to the newcomer mid-stream
    dep.wait_for_log(1, "partitions assigned", 90)
    first.send_signal(signal.SIGTERM)  # a clean leave: its partitions move back to the second consumer
    assert first.wait(timeout=60) == 0, dep.log_tail()
    third = dep.start_consumer()  # and once more when another one joins
    dep.wait_for_log(2, "partitions assigned", 90)
    stream.join()
    try:
        rows, _ = _check_exactly_once(dep, timeout_s=180)
        assert second.poll() is None and third.poll() is None, dep.log_tail()
    finally:
        dep.stop_all()
    assert second.returncode == 0 and third.returncode == 0
    logs = "".join(log.read_text() for log in dep.logs.glob("consumer-*.log"))
    assignments, handovers = logs.count("partitions assigned"), len(re.findall(r"handed over: \[\d", logs))
    print(f"\nrebalance: {len(dep.messages)} readings, 3 consumers, {assignments} assignments, {handovers} "
          f"hand-overs; {rows} windows == {len(dep.expected)} expected, 0 duplicates; SIGTERM exit code 0")
    assert assignments >= 4 and handovers >= 1


def test_postgres_down_for_20s_mid_stream(kafka_bootstrap_servers: str, topic_name: str, local_postgres,
                                         tmp_path: Path) -> None:
    dep = deploy(tmp_path, bootstrap=kafka_bootstrap_servers, topic=topic_name, db_url=local_postgres.url,
                 assets=6, rows_per_asset=3000)
    stream = dep.produce(rate_per_s=600)
    proc = dep.start_consumer()
    time.sleep(8)
    before = dep.stored()[0]
    local_postgres.stop_server()
    down_at = time.monotonic()
    time.sleep(20)
    local_postgres.start_server()
    outage = time.monotonic() - down_at
    stream.join()
    try:
        rows, _ = _check_exactly_once(dep, timeout_s=180)
        assert proc.poll() is None, f"the consumer died during the outage\n{dep.log_tail()}"
    finally:
        dep.stop_all()
    retries = sum(log.read_text().count("dependency unavailable") for log in dep.logs.glob("consumer-*.log"))
    print(f"\nPostgreSQL outage: down {outage:.0f}s after {before} windows; {retries} retries logged; "
          f"{rows} windows == {len(dep.expected)} expected, 0 duplicates, consumer never restarted")
    assert before > 0 and retries >= 2


def _bad_inputs() -> list[tuple[str, object]]:
    """(expected reason, maker) for every kind of bad input; a maker gets the valid (asset, value) just sent."""
    ok = {"speed": 2900.0}

    def doc(**fields: object) -> object:
        return lambda asset, value: (asset.encode(), orjson.dumps({"asset": asset, **fields}))

    def raw(data: bytes | None) -> object:
        return lambda asset, value: (asset.encode(), data)

    def shifted(field: str, new: object) -> object:
        def make(asset: str, value: bytes) -> tuple[bytes, bytes]:
            original = orjson.loads(value)
            original[field] = new(original) if callable(new) else new
            return asset.encode(), orjson.dumps(original)
        return make

    return [
        ("malformed_json", raw(b"{not json")),
        ("malformed_json", raw(b"")),
        ("malformed_json", raw(None)),
        ("malformed_json", raw(b"\xff\xfe\x00garbage")),
        ("not_an_object", raw(b"[1, 2, 3]")),
        ("not_an_object", raw(b'"just a string"')),
        ("missing_field", lambda asset, value: (asset.encode(), orjson.dumps({"ts": 1, "values": ok}))),
        ("missing_field", doc(values=ok)),
        ("missing_field", doc(ts=1_777_000_000_000)),
        ("missing_field", doc(ts=1_777_000_000_000, values={})),
        ("wrong_type", lambda asset, value: (asset.encode(), orjson.dumps({"asset": 7, "ts": 1, "values": ok}))),
        ("wrong_type", doc(ts=1_777_000_000_000, values=[1, 2])),
        ("wrong_type", doc(ts=1_777_000_000_000, values={"speed": "fast"})),
        ("wrong_type", doc(ts=1_777_000_000_000, values={"speed": True})),
        ("wrong_type", doc(ts=1_777_000_000_000, values={"speed": None})),
        # a record whose only value is NaN or -Infinity (not JSON: Python's json.dumps writes them); a NaN among
        # good values costs that value only (tests/unit/test_decode.py)
        ("non_finite", lambda asset, value: (asset.encode(), b'{"asset": "' + asset.encode()
                                             + b'", "ts": 1777000000000, "values": {"speed": NaN}}')),
        ("non_finite", lambda asset, value: (asset.encode(), b'{"asset": "' + asset.encode()
                                             + b'", "ts": 1777000000000, "values": {"speed": -Infinity}}')),
        ("unknown_asset", lambda asset, value: (b"ghost-1", orjson.dumps({"asset": "ghost-1", "ts": 1,
                                                                          "values": ok}))),
        ("unknown_sensor", doc(ts=1_777_000_000_000, values={"humidity": 40.0})),
        ("unknown_sensor", doc(sensor="humidity", ts=1_777_000_000_000, value=40.0)),
        ("out_of_range", doc(ts=1_777_000_000_000, values={"speed": 99999.0})),
        ("bad_timestamp", doc(ts="next tuesday", values=ok)),
        ("bad_timestamp", doc(ts=-5, values=ok)),
        ("ts_in_future", doc(ts=4_000_000_000_000, values=ok)),
        ("ts_too_old", doc(ts="2001-01-01T00:00:00Z", values=ok)),
        ("oversized", doc(ts=1_777_000_000_000, values=ok, padding="x" * 70_000)),
        ("key_mismatch", lambda asset, value: (b"someone-else", value)),
        ("duplicate", lambda asset, value: (asset.encode(), value)),
        ("late", shifted("ts", int(START.timestamp() * 1000) + 10_000)),
        ("ts_jump", shifted("ts", lambda original: original["ts"] + 3_600_000)),  # a glitching clock, once
    ]


def test_bad_input_goes_to_the_dead_letter_topic_and_never_stops_the_pipeline(
        kafka_bootstrap_servers: str, topic_name: str, pg_database_url: str, tmp_path: Path) -> None:
    dep = deploy(tmp_path, bootstrap=kafka_bootstrap_servers, topic=topic_name, db_url=pg_database_url,
                 assets=4, rows_per_asset=1500, ingest={"max_age_s": 365 * 86400 * 3})
    cases = _bad_inputs()
    reasons: list[str] = []
    sent: list[tuple[bytes, str]] = []

    def recording(reason: str, make):
        def wrapped(asset: str, value: bytes):
            key, raw = make(asset, value)
            sent.append((raw or b"", reason))
            return key, raw
        return wrapped

    extra = [recording(reason, make) for reason, make in cases]
    reasons = [reason for reason, _ in cases]
    dep.produce(rate_per_s=20_000, extra=extra).join()
    stop = threading.Event()

    def on_batch(stats: RunStats) -> None:
        if stats.readings >= len(dep.messages) and sum(stats.rejected.values()) >= len(cases):
            stop.set()

    timer = threading.Timer(120, stop.set)
    timer.start()
    try:
        stats = run_pipeline(dep.config, stop=stop, idle_stop_s=15, on_batch=on_batch)
    finally:
        timer.cancel()
    assert stats.readings == len(dep.messages)
    assert stats.rejected == Counter(reasons)
    _check_exactly_once(dep, timeout_s=10)
    dlq = KafkaConsumer(dep.config.kafka.dead_letter_topic, bootstrap_servers=kafka_bootstrap_servers,
                        auto_offset_reset="earliest", consumer_timeout_ms=10_000)
    dead = Counter((m.value, dict(m.headers)["reason"].decode()) for m in dlq)
    dlq.close()
    assert dead == Counter(sent)
    print(f"\nbad input: {len(cases)} bad records of {len(set(reasons))} reasons in {len(dep.messages)} valid "
          f"readings: 0 crashes, all in the dead-letter topic with the right reason; {len(dep.expected)} "
          f"valid windows scored; per reason {dict(stats.rejected)}")
    assert len(cases) >= 20


def _health(port: int) -> int:
    """The status /healthz answers (0 when it does not answer at all)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_broker_restart_mid_stream(local_kafka, topic_name: str, pg_database_url: str, tmp_path: Path) -> None:
    # idle_close_s (5 s) is shorter than the outage (25 s): windows must not be closed on partial data meanwhile
    dep = deploy(tmp_path, bootstrap=local_kafka.bootstrap_servers, topic=topic_name, db_url=pg_database_url,
                 assets=4, rows_per_asset=2000, idle_close_s=5)
    half = len(dep.messages) // 2
    rest, dep.messages = dep.messages[half:], dep.messages[:half]
    dep.produce(rate_per_s=20_000).join()
    proc = dep.start_consumer()
    dep.wait_progress(timeout_s=60)
    dep.wait_for_log(0, "health on /healthz", timeout_s=30)
    port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", (dep.logs / "consumer-0.log").read_text())[1])
    local_kafka.stop_broker()
    down_at, health = time.monotonic(), []
    while time.monotonic() - down_at < 25:  # polls only come back empty: a probe must tell /healthz
        health.append(_health(port))
        time.sleep(1)
    local_kafka.start_broker()
    dep.messages = rest
    dep.produce(rate_per_s=20_000).join()
    try:
        rows, _ = _check_exactly_once(dep, timeout_s=120)
        assert proc.poll() is None, f"the consumer died while the broker was down\n{dep.log_tail()}"
        healthy_again = _health(port)
    finally:
        dep.stop_all()
    assert health[-3:] == [503] * 3, health  # the outage shows until it ends, though polls only come back empty
    assert healthy_again == 200
    skipped = dep.debug_state().split("\n")[0]
    print(f"\nbroker restart: broker down 25s mid-stream (idle close after 5s), /healthz 503 after "
          f"{health.index(503)}s ({health.count(503)} of {len(health)} probes); consumer reconnected; {rows} windows "
          f"== {len(dep.expected)} expected, 0 duplicates; {skipped[:60]}")
