"""Decoding and validation: every kind of bad input becomes a Rejected with the right reason."""

from __future__ import annotations

import orjson
import pytest

from pipeline.config import parse_config
from pipeline.decode import Decoder, parse_timestamp

NOW = 1767225600000  # 2026-01-01


@pytest.fixture
def decoder() -> Decoder:
    cfg = parse_config({"groups": [{"name": "g", "assets": ["pump-1"], "sensors": [
        {"name": "temp", "valid_range": [-10, 150]}, {"name": "flow"}]}],
        "ingest": {"max_future_s": 60}}, env={})
    return Decoder(cfg.groups, max_message_bytes=512, ingest=cfg.ingest)


def test_valid_reading_with_iso_and_epoch_timestamps(decoder: Decoder) -> None:
    a = decoder.decode(b'{"asset": "pump-1", "ts": "2026-01-01T00:00:10Z", "values": {"temp": 70.5, "flow": 3}}')
    b = decoder.decode(b'{"asset": "pump-1", "ts": 1767225610000, "values": {"temp": 70.5}}')
    assert a.ts_ms == b.ts_ms == 1767225610000
    assert a.values == {"temp": 70.5, "flow": 3.0}


def test_naive_iso_is_utc() -> None:
    assert parse_timestamp("2026-01-01T00:00:00") == parse_timestamp("2026-01-01T01:00:00+01:00")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{nope", "malformed_json"),
        (b'{"asset": "pump-1", "ts": 1, "values": {"temp": NaN}}', "non_finite"),
        (b'{"asset": "pump-1", "ts": 1, "values": {"temp": -Infinity}}', "non_finite"),
        (None, "malformed_json"),
        (b"[1, 2]", "not_an_object"),
        (b'{"ts": 1, "values": {"temp": 1}}', "missing_field"),
        (b'{"asset": "pump-1", "values": {"temp": 1}}', "missing_field"),
        (b'{"asset": "pump-1", "ts": 1, "values": {}}', "missing_field"),
        (b'{"asset": 7, "ts": 1, "values": {"temp": 1}}', "wrong_type"),
        (b'{"asset": "pump-1", "ts": 1, "values": [1]}', "wrong_type"),
        (b'{"asset": "pump-1", "ts": 1, "values": {"temp": "hot"}}', "wrong_type"),
        (b'{"asset": "pump-1", "ts": 1, "values": {"temp": true}}', "wrong_type"),
        (b'{"asset": "pump-9", "ts": 1, "values": {"temp": 1}}', "unknown_asset"),
        (b'{"asset": "pump-1", "ts": 1, "values": {"rpm": 1}}', "unknown_sensor"),
        (b'{"asset": "pump-1", "ts": 1, "values": {"temp": 1e400}}', "non_finite"),
        (b'{"asset": "pump-1", "ts": 1, "values": {"temp": 999}}', "out_of_range"),
        (b'{"asset": "pump-1", "ts": "yesterday", "values": {"temp": 1}}', "bad_timestamp"),
        (b'{"asset": "pump-1", "ts": -5, "values": {"temp": 1}}', "bad_timestamp"),
        (b'{"asset": "pump-1", "ts": null, "values": {"temp": 1}}', "bad_timestamp"),
        (b'{"asset": "pump-1", "ts": "0001-01-01T00:00:00+01:00", "values": {"temp": 1}}', "bad_timestamp"),
        (b'{"asset": "pump-1", "ts": 1e300, "values": {"temp": 1}}', "bad_timestamp"),
        (b'{"asset": "pump-1", "ts": 1, "values": {"flow": 1e300}}', "out_of_range"),
        (b'{"asset": "pump-1", "ts": 1, "values": {"temp": 1}, "pad": "' + b"x" * 600 + b'"}', "oversized"),
        (b'{"asset": "pump-1", "sensor": "temp", "ts": 1}', "missing_field"),
        (b'{"asset": "pump-1", "sensor": 3, "ts": 1, "value": 1}', "wrong_type"),
        (b'{"asset": "pump-1", "sensor": "rpm", "ts": 1, "value": 1}', "unknown_sensor"),
        (b'{"asset": "pump-1", "ts": 99999999999999, "values": {"temp": 1}}', "ts_in_future"),
        (b"\xff\xfe garbage", "malformed_json"),
    ],
)
def test_bad_input_is_rejected_with_reason(decoder: Decoder, raw: bytes | None, reason: str) -> None:
    readings, rejected = decoder.decode_batch([("topic", 2, 41, b"pump-1", raw, -1)], now_ms=NOW)
    assert readings == []
    assert [r.reason for r in rejected] == [reason]
    assert (rejected[0].partition, rejected[0].offset, rejected[0].value) == (2, 41, raw)


@pytest.mark.parametrize("raw", [b"[" * 5000, b'{"a":' * 10000, b"[" * 30000 + b"]" * 30000])
def test_deeply_nested_json_is_malformed_not_a_crash(raw: bytes) -> None:
    """Nested past orjson's limit (1024), the NaN/Infinity probe's stdlib parser ran out of stack: RecursionError
    crashed the consumer on that record at every restart."""
    cfg = parse_config({"groups": [{"name": "g", "assets": ["pump-1"], "sensors": [{"name": "temp"}]}]}, env={})
    readings, rejected = Decoder(cfg.groups, max_message_bytes=1 << 20).decode_batch([("t", 0, 7, None, raw, -1)])
    assert readings == [] and [(r.reason, r.offset) for r in rejected] == [("malformed_json", 7)]


def test_a_defect_met_by_one_record_dead_letters_it_and_goes_on(decoder: Decoder, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    good = orjson.dumps({"asset": "pump-1", "ts": 1000, "values": {"temp": 1.0}})
    decode = Decoder.decode_partial

    def fragile(self: Decoder, value: bytes | None, key: bytes | None = None, *args: int | None):  # type: ignore[no-untyped-def]
        if value == b"poison":
            raise KeyError("a defect")
        return decode(self, value, key, *args)

    monkeypatch.setattr(Decoder, "decode_partial", fragile)
    readings, rejected = decoder.decode_batch([("t", 0, i, None, v, -1) for i, v in enumerate([good, b"poison", good])])
    assert [r.offset for r in readings] == [0, 2]
    assert [(r.reason, r.offset, r.value) for r in rejected] == [("undecodable", 1, b"poison")]
    assert rejected[0].detail == "KeyError: 'a defect'"
    with caplog.at_level("WARNING", logger="pipeline.decode"):  # a flood of it: the first ten tracebacks only
        _, flood = decoder.decode_batch([("t", 0, i, None, b"poison", -1) for i in range(30)])
    assert len(flood) == 30 and len([r for r in caplog.records if r.exc_info]) == 10  # of 31 in this test


def test_batch_keeps_good_readings_around_bad_ones(decoder: Decoder) -> None:
    good = orjson.dumps({"asset": "pump-1", "ts": 1000, "values": {"temp": 1.0}})
    readings, rejected = decoder.decode_batch([("t", 0, i, None, v, -1) for i, v in enumerate([good, b"x", good])])
    assert [r.offset for r in readings] == [0, 2]
    assert [r.offset for r in rejected] == [1]


def test_per_sensor_shape_and_key_check(decoder: Decoder) -> None:
    r = decoder.decode(b'{"asset": "pump-1", "sensor": "flow", "ts": 5000, "value": 2.5}', key=b"pump-1")
    assert (r.asset, r.ts_ms, r.values) == ("pump-1", 5000, {"flow": 2.5})
    _, rejected = decoder.decode_batch([("t", 0, 0, b"pump-2", orjson.dumps(
        {"asset": "pump-1", "ts": 1000, "values": {"temp": 1.0}}), -1)])
    assert [r.reason for r in rejected] == ["key_mismatch"]


def test_too_old_readings_are_rejected_when_max_age_is_set() -> None:
    cfg = parse_config({"groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}],
                        "ingest": {"max_age_s": 86400}}, env={})
    decoder = Decoder(cfg.groups, 1024, cfg.ingest)
    old = orjson.dumps({"asset": "a", "ts": NOW - 2 * 86400 * 1000, "values": {"x": 1}})
    fresh = orjson.dumps({"asset": "a", "ts": NOW - 3600 * 1000, "values": {"x": 1}})
    readings, rejected = decoder.decode_batch([("t", 0, 0, None, old, -1), ("t", 0, 1, None, fresh, -1)], now_ms=NOW)
    assert [r.reason for r in rejected] == ["ts_too_old"] and len(readings) == 1


def test_age_is_judged_when_the_record_was_published_so_a_backlog_is_not_too_old() -> None:
    """A pipeline stopped longer than max_age_s reads its backlog: readings that were fresh when they reached the
    broker are used; one that was already too old then is refused, and says so."""
    cfg = parse_config({"groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}],
                        "ingest": {"max_age_s": 120}}, env={})
    decoder = Decoder(cfg.groups, 1024, cfg.ingest)
    published = NOW - 3 * 3600 * 1000  # three hours on the broker
    fresh = orjson.dumps({"asset": "a", "ts": published - 60_000, "values": {"x": 1}})
    stale = orjson.dumps({"asset": "a", "ts": published - 600_000, "values": {"x": 1}})
    records = [("t", 0, 0, None, fresh, published), ("t", 0, 1, None, stale, published)]
    readings, rejected = decoder.decode_batch(records, now_ms=NOW)
    assert [r.offset for r in readings] == [0]
    assert [(r.reason, r.offset, r.detail) for r in rejected] == [("ts_too_old", 1, "600 s old when published")]
    readings, rejected = decoder.decode_batch([("t", 0, 0, None, fresh, -1)], now_ms=NOW)  # no record timestamp
    assert readings == [] and [r.detail for r in rejected] == [f"{3 * 3600 + 60} s old"]


def test_one_bad_value_costs_that_value_only(decoder: Decoder) -> None:
    """An extra field, a value out of its range, a string or NaN-free garbage in one sensor: the record's other
    sensors are used, and the record also goes to the dead-letter topic as a partial rejection naming what was
    left out. A record with nothing usable is rejected whole, as before."""
    records = [
        b'{"asset": "pump-1", "ts": 1767225610000, "values": {"temp": 70.5, "flow": 3, "ambient": 21.5}}',
        b'{"asset": "pump-1", "ts": 1767225620000, "values": {"temp": 205.0, "flow": 4}}',
        b'{"asset": "pump-1", "ts": 1767225630000, "values": {"temp": "hot", "flow": 5, "x": 1}}',
        b'{"asset": "pump-1", "ts": 1767225640000, "values": {"temp": 999, "ambient": 1}}',
    ]
    readings, rejected = decoder.decode_batch([("t", 0, i, None, r, -1) for i, r in enumerate(records)], now_ms=NOW)
    assert [(r.offset, r.values) for r in readings] == [(0, {"temp": 70.5, "flow": 3.0}), (1, {"flow": 4.0}),
                                                       (2, {"flow": 5.0})]
    assert [(r.offset, r.reason, r.partial) for r in rejected] == [
        (0, "unknown_sensor", True), (1, "out_of_range", True), (2, "wrong_type", True), (3, "out_of_range", False)]
    assert rejected[0].detail == "pump-1/ambient (used: temp, flow)"
    assert rejected[2].detail == "temp must be a number, got str; pump-1/x (used: flow)"
    assert rejected[3].detail == "temp=999.0 outside [-10.0, 150.0]; pump-1/ambient"
    assert all(r.value == records[r.offset] for r in rejected)  # the original bytes: nothing is lost


def test_a_nan_literal_costs_that_value_only(decoder: Decoder) -> None:
    """Python's json.dumps writes NaN (or Infinity) for a failed transmitter. That is not JSON, but the record's other
    values are kept, as with null; the dead-letter record says which value was left out and what to send instead."""
    nan = b'{"asset": "pump-1", "ts": 1767225610000, "values": {"temp": 70.5, "flow": NaN}}'
    null = b'{"asset": "pump-1", "ts": 1767225610000, "values": {"temp": 70.5, "flow": null}}'
    big = b'{"asset": "pump-1", "ts": 1767225610000, "values": {"temp": 70.5, "flow": 1e400}}'
    readings, rejected = decoder.decode_batch([("t", 0, i, None, raw, -1) for i, raw in enumerate((nan, null, big))],
                                              now_ms=NOW)
    assert [(r.offset, r.values) for r in readings] == [(0, {"temp": 70.5}), (1, {"temp": 70.5}), (2, {"temp": 70.5})]
    assert [(r.offset, r.reason, r.partial) for r in rejected] == [
        (0, "non_finite", True), (1, "wrong_type", True), (2, "non_finite", True)]
    assert rejected[0].detail == "flow is nan (used: temp)"
    assert rejected[0].value == nan  # the original bytes
    only = b'{"asset": "pump-1", "ts": NaN, "values": {"temp": 70.5}}'  # a NaN time is no time
    assert [r.reason for r in decoder.decode_batch([("t", 0, 3, None, only, -1)], now_ms=NOW)[1]] == ["bad_timestamp"]


@pytest.mark.parametrize("raw", [
    rb'{"asset": "pump-\ud800", "ts": 1767225610000, "values": {"temp": NaN}}',  # a lone surrogate escape
    rb'{"asset": "pump-1", "ts": 1767225610000, "values": {"temp": NaN, "flow": 1, "x\udc00": 2}}',
    b'\xef\xbb\xbf{"asset": "pump-1", "ts": 1767225610000, "values": {"temp": NaN, "flow": 1}}',  # a UTF-8 BOM
    '{"asset": "pump-1", "ts": 1767225610000, "values": {"temp": NaN, "flow": 1}}'.encode("utf-16"),
    '{"asset": "pump-1", "ts": 1767225610000, "values": {"temp": NaN, "flow": 1}}'.encode("utf-32-le"),
])
def test_a_nan_literal_does_not_let_in_what_orjson_refused_for_another_reason(decoder: Decoder, raw: bytes) -> None:
    """The NaN fallback (the stdlib parser) reads lone surrogate escapes, a BOM and UTF-16/32, which orjson refuses:
    such a record is malformed_json as without the NaN. A lone surrogate in a dead-letter detail could not be encoded
    for its header, and that UnicodeEncodeError stopped the pipeline at this record at every restart."""
    readings, rejected = decoder.decode_batch([("t", 0, 5, None, raw, -1)], now_ms=NOW)
    assert readings == [] and [r.reason for r in rejected] == ["malformed_json"]
    assert all(r.detail.encode() for r in rejected)


def test_an_integer_beyond_any_float_costs_that_value_only(decoder: Decoder) -> None:
    """orjson refuses an integer beyond any float ("number is infinity"): like 1e400 it costs that value only, with
    or without a NaN in the record; as the time it is a bad timestamp, not an undecodable record."""
    huge = b"1" + b"0" * 400
    records = [b'{"asset": "pump-1", "ts": 1767225610000, "values": {"temp": 70.5, "flow": ' + huge + b"}}",
               b'{"asset": "pump-1", "ts": 1767225610000, "values": {"temp": 70.5, "flow": NaN, "x": ' + huge + b"}}",
               b'{"asset": "pump-1", "ts": ' + huge + b', "values": {"temp": 70.5, "flow": NaN}}']
    readings, rejected = decoder.decode_batch([("t", 0, i, None, raw, -1) for i, raw in enumerate(records)],
                                              now_ms=NOW)
    assert [(r.offset, r.values) for r in readings] == [(0, {"temp": 70.5}), (1, {"temp": 70.5})]
    assert [(r.offset, r.reason, r.partial) for r in rejected] == [
        (0, "non_finite", True), (1, "non_finite", True), (2, "bad_timestamp", False)]
