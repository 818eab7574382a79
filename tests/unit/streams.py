"""Readings of two assets as polled Kafka records, for runner tests without a broker."""

from __future__ import annotations

from collections.abc import Callable

import orjson

from pipeline.kafka_io import RawRecord


def records(t0_ms: int, start_s: int, stop_s: int, values: Callable[[str, int], dict[str, float]]
            ) -> list[RawRecord]:
    """One reading a second of assets ``a`` (partition 0) and ``b`` (partition 1) for seconds ``[start_s, stop_s)``
    after ``t0_ms``, with ``values(asset, second)``; a record's offset is its second."""
    out = []
    for i in range(start_s, stop_s):
        for partition, asset in enumerate(("a", "b")):
            payload = {"asset": asset, "ts": t0_ms + i * 1000, "values": values(asset, i)}
            out.append(RawRecord("readings", partition, i, asset.encode(), orjson.dumps(payload), t0_ms + i * 1000))
    return out
