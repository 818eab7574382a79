"""Bytes to readings. All input validation lives here; nothing in this module raises on bad input.

Accepted messages: ``{"asset": "pump-7", "ts": <ISO-8601 string or epoch ms>, "values": {"temp": 71.2}}`` (per asset)
or ``{"asset": "pump-7", "sensor": "temp", "ts": ..., "value": 71.2}`` (per sensor). Anything else becomes a
``Rejected`` with one of the reasons in ``REASONS`` (``duplicate``, ``late`` and ``ts_jump`` are decided by the
windower).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from pipeline.config import GroupConfig, IngestConfig
from pipeline.errors import InvalidReading
from pipeline.types import Reading, Rejected, ms_to_iso

log = logging.getLogger(__name__)

REASONS = (
    "oversized",
    "malformed_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "bad_timestamp",
    "unknown_asset",
    "unknown_sensor",
    "non_finite",
    "out_of_range",
    "key_mismatch",
    "ts_in_future",
    "ts_too_old",
    "duplicate",
    "late",
    "ts_jump",
    "undecodable",  # a defect met by this input (logged with its traceback): dead-lettered instead of crashing
)


SECONDS_LIKE_MS = 100_000_000_000  # epoch ms below this is before 1973-03-04: numbers this small are epoch seconds
MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: the last instant a datetime (and SQL) can hold
MAX_ABS_VALUE = 1e15  # beyond this a reading is a glitch whatever the sensor; squared errors would overflow float32


def parse_timestamp(raw: object) -> int:
    """ISO-8601 string (naive means UTC) or epoch milliseconds (int/float) to epoch ms within 1970..9999 (UTC);
    InvalidReading otherwise."""
    ts_ms = _parse_timestamp(raw)
    if not 0 <= ts_ms <= MAX_TS_MS:
        raise InvalidReading("bad_timestamp", f"outside 1970..9999: {str(raw)[:40]!r}")
    return ts_ms


def _parse_timestamp(raw: object) -> int:
    if isinstance(raw, bool):
        raise InvalidReading("bad_timestamp", "boolean is not a timestamp")
    if isinstance(raw, int | float):
        if (isinstance(raw, float) and not math.isfinite(raw)) or raw < 0:  # an int may be beyond any float
            raise InvalidReading("bad_timestamp", f"epoch ms must be a finite non-negative number, got {raw!r}")
        return int(raw)
    if isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00") if raw.endswith("Z") else raw)
        except ValueError:
            raise InvalidReading("bad_timestamp", f"not ISO-8601: {raw[:40]!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return round(parsed.timestamp() * 1000)
    raise InvalidReading("bad_timestamp", f"expected ISO-8601 string or epoch ms, got {type(raw).__name__}")


def _with_non_finite_literals(value: bytes) -> Any | None:
    """``value`` parsed as JSON with NaN/Infinity literals and overflowing numbers read as non-finite floats (Python's
    ``json.dumps`` writes NaN for a failed transmitter; each then costs its own sensor value only), or None when it is
    not JSON for another reason (or has none of them: orjson refused it for something else). What orjson refuses
    and the stdlib parser would read (not UTF-8, a BOM, UTF-16/32, a lone surrogate escape) is None too."""
    seen = False

    def constant(token: str) -> float:
        nonlocal seen
        seen = True
        return float(token)

    def number(token: str) -> float:
        nonlocal seen
        parsed = float(token)
        seen = seen or math.isinf(parsed)
        return parsed

    def integer(token: str) -> int:
        nonlocal seen
        parsed = int(token)
        if not seen:
            try:
                float(parsed)
            except OverflowError:  # orjson: "number is infinity"
                seen = True
        return parsed

    try:
        text = value.decode("utf-8")  # strict, and json.loads refuses a str that starts with a BOM
        doc = json.loads(text, parse_constant=constant, parse_float=number, parse_int=integer)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the interpreter's stack (orjson: 1024)
        return None
    return doc if seen and not _has_lone_surrogate(doc) else None


def _has_lone_surrogate(doc: Any) -> bool:
    """True when a string (key or value) of the parsed ``doc`` holds a lone surrogate (a ``\\ud800`` escape): not
    UTF-8, so orjson refuses it, and it could not be encoded into a dead-letter header either."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class Decoder:
    """Validates raw messages against the configured assets, sensors, valid ranges and ingest limits."""

    def __init__(self, groups: Iterable[GroupConfig], max_message_bytes: int, ingest: IngestConfig | None = None
                 ) -> None:
        self._max_bytes = max_message_bytes
        self._undecodable = 0  # records that met a defect (logged in full the first few times)
        self._ingest = ingest or IngestConfig()
        self._seconds_warned: set[str] = set()  # assets whose numeric timestamps look like epoch seconds (said once)
        self._asset_sensors: dict[str, Mapping[str, tuple[float, float] | None]] = {}
        for group in groups:
            ranges = {s.name: s.valid_range for s in group.sensors}
            for asset in group.assets:
                self._asset_sensors[asset] = ranges

    def decode(self, value: bytes | None, key: bytes | None = None, now_ms: int | None = None,
               published_ms: int | None = None) -> Reading:
        """Validate one message; raises InvalidReading with the reason. Values of a ``values`` message that cannot
        be used are left out (``decode_partial`` says which).

        Two shapes: ``{"asset", "ts", "values": {sensor: number}}`` and ``{"asset", "sensor", "ts", "value"}``.
        ``now_ms`` (the consumer's clock) enables the future/age checks; ``key`` the key check. The age is judged
        at ``published_ms`` (the Kafka record's timestamp) when given, so a backlog read after an outage of the
        pipeline is not too old for having waited on the broker.
        """
        return self.decode_partial(value, key, now_ms, published_ms)[0]

    def decode_partial(self, value: bytes | None, key: bytes | None = None, now_ms: int | None = None,
                       published_ms: int | None = None) -> tuple[Reading, list[InvalidReading]]:
        """``decode``, and the problems of the values it left out: in a ``values`` message, one sensor that is not
        configured, not a number, not finite or out of its ``valid_range`` costs that value only, not the other
        sensors of the record (an extra field from a gateway, one failed transmitter). InvalidReading when the
        record as a whole cannot be used, or none of its values can."""
        if value is None:
            raise InvalidReading("malformed_json", "empty message (tombstone)")
        if len(value) > self._max_bytes:
            raise InvalidReading("oversized", f"{len(value)} bytes > limit {self._max_bytes}")
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            doc = _with_non_finite_literals(value)  # NaN or Infinity in a value: that value only is left out
            if doc is None:
                raise InvalidReading("malformed_json", str(exc)[:120]) from None
        if not isinstance(doc, dict):
            raise InvalidReading("not_an_object", f"top level is {type(doc).__name__}")
        per_sensor = "values" not in doc and "sensor" in doc
        for name in ("asset", "ts", "sensor", "value") if per_sensor else ("asset", "ts", "values"):
            if name not in doc:
                raise InvalidReading("missing_field", name)
        asset = doc["asset"]
        if not isinstance(asset, str):
            raise InvalidReading("wrong_type", f"asset must be a string, got {type(asset).__name__}")
        ranges = self._asset_sensors.get(asset)
        if ranges is None:
            raise InvalidReading("unknown_asset", asset[:80])
        if key is not None and self._ingest.require_key_match and key != asset.encode():
            raise InvalidReading("key_mismatch", f"record key {key[:80]!r} is not the asset id {asset[:80]!r}")
        ts_ms = parse_timestamp(doc["ts"])
        if ts_ms < SECONDS_LIKE_MS and isinstance(doc["ts"], int | float) and asset not in self._seconds_warned:
            self._seconds_warned.add(asset)
            log.warning("%s sends numeric ts %s, read as epoch milliseconds: %s; if its gateway sends epoch seconds, "
                        "it must multiply them by 1000 (its readings otherwise crowd into a few grid steps and go to "
                        "the dead-letter topic as duplicate)", asset[:80], doc["ts"],
                        ms_to_iso(ts_ms))
        if now_ms is not None:
            if ts_ms > now_ms + self._ingest.max_future_s * 1000:
                raise InvalidReading("ts_in_future", f"{ts_ms - now_ms} ms ahead of the consumer clock")
            at_ms, when = now_ms, ""
            if published_ms is not None and published_ms >= 0:  # -1: the record has no timestamp
                at_ms, when = published_ms, " when published"
            if self._ingest.max_age_s is not None and ts_ms < at_ms - self._ingest.max_age_s * 1000:
                raise InvalidReading("ts_too_old", f"{(at_ms - ts_ms) // 1000} s old{when}")
        if per_sensor:
            if not isinstance(doc["sensor"], str):
                raise InvalidReading("wrong_type", f"sensor must be a string, got {type(doc['sensor']).__name__}")
            raw_values = {doc["sensor"]: doc["value"]}
        else:
            raw_values = doc["values"]
            if not isinstance(raw_values, dict):
                raise InvalidReading("wrong_type", f"values must be an object, got {type(raw_values).__name__}")
            if not raw_values:
                raise InvalidReading("missing_field", "values is empty")
        values: dict[str, float] = {}
        problems: list[InvalidReading] = []
        for sensor, raw in raw_values.items():
            try:
                values[sensor] = _value(asset, sensor, raw, ranges)
            except InvalidReading as exc:
                problems.append(exc)
        if not values:
            raise problems[0] if len(problems) == 1 else InvalidReading(
                problems[0].reason, "; ".join(p.detail for p in problems)[:400])
        return Reading(asset=asset, ts_ms=ts_ms, values=values), problems

    def decode_batch(
        self, records: Iterable[tuple[str, int, int, bytes | None, bytes | None, int]], now_ms: int | None = None
    ) -> tuple[list[Reading], list[Rejected]]:
        """Decode ``(topic, partition, offset, key, value, record timestamp ms or -1)`` tuples; never raises on bad
        input. A record of which some values were used and some left out gives both a reading and a ``partial``
        rejection (the dead-letter topic gets the record with what was left out and why)."""
        readings: list[Reading] = []
        rejected: list[Rejected] = []
        for topic, partition, offset, key, value, published_ms in records:
            try:
                r, problems = self.decode_partial(value, key, now_ms, published_ms)
            except InvalidReading as exc:
                rejected.append(Rejected(exc.reason, exc.detail, value, key, topic, partition, offset))
                continue
            except Exception as exc:  # a defect met by some input: that record is dead-lettered, never a crash loop
                self._undecodable += 1
                if self._undecodable <= 10:  # the first ones with their traceback, then a line now and then
                    log.exception("decoding %s/%d/%d failed; dead-lettered as undecodable", topic, partition, offset)
                elif self._undecodable % 1000 == 0:
                    log.warning("%d records dead-lettered as undecodable so far (latest %s/%d/%d: %s)",
                                self._undecodable, topic, partition, offset, type(exc).__name__)
                rejected.append(Rejected("undecodable", f"{type(exc).__name__}: {str(exc)[:200]}", value, key, topic,
                                         partition, offset))
                continue
            readings.append(Reading(r.asset, r.ts_ms, r.values, partition, offset))
            if problems:
                detail = "; ".join(p.detail for p in problems)[:400] + f" (used: {', '.join(r.values)[:80]})"
                rejected.append(Rejected(problems[0].reason, detail, value, key, topic, partition, offset,
                                         partial=True))
        return readings, rejected


def _value(asset: str, sensor: object, raw: object, ranges: Mapping[str, tuple[float, float] | None]) -> float:
    """One sensor value of ``asset``, checked; InvalidReading naming the sensor otherwise."""
    if sensor not in ranges:
        raise InvalidReading("unknown_sensor", f"{asset}/{str(sensor)[:60]}")
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise InvalidReading("wrong_type", f"{sensor} must be a number, got {type(raw).__name__}")
    try:
        number = float(raw)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if not math.isfinite(number):
        raise InvalidReading("non_finite", f"{sensor} is {number}")
    if abs(number) > MAX_ABS_VALUE:
        raise InvalidReading("out_of_range", f"{sensor}={number:g}: magnitude above {MAX_ABS_VALUE:g}")
    valid = ranges[str(sensor)]
    if valid is not None and not valid[0] <= number <= valid[1]:
        raise InvalidReading("out_of_range", f"{sensor}={number} outside [{valid[0]}, {valid[1]}]")
    return number
