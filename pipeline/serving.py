"""What the running pipeline processes serve, judged from their ``pipeline_instances`` rows (pure: the rows and the
clock are passed in). Read by ``sensorwatch models serving``, ``models list`` and ``check``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Protocol

STALE_GRACE_S = 60.0


class InstanceRow(Protocol):
    """A pipeline process's row (``store.tables.PipelineInstance``)."""

    instance: str
    seen_at: datetime
    serving: dict[str, str]
    unserved: dict[str, str]


def stale_after_s(reload_interval_s: float) -> float:
    """How long a process may go unseen before it counts as gone (stopped without a clean exit, killed, its host
    lost) or hung: it writes its row at every model reload, every ``reload_interval_s``."""
    return 2 * reload_interval_s + STALE_GRACE_S


def is_live(row: InstanceRow, now: datetime, stale_s: float) -> bool:
    """Whether ``row``'s process was seen within ``stale_s`` of ``now``."""
    return (now - row.seen_at).total_seconds() <= stale_s


def serving_counts(rows: Iterable[InstanceRow], now: datetime, stale_s: float) -> Counter[str]:
    """Model version -> how many live processes serve it."""
    return Counter(v for r in rows if is_live(r, now, stale_s) for v in r.serving.values())


def behind(rows: Iterable[InstanceRow], active: Mapping[str, tuple[str, datetime | None]], now: datetime,
           stale_s: float) -> list[str]:
    """One line per live process and group whose active version (``active``: group -> (version, activated at)) it
    does not serve although that activation is more than ``stale_s`` old (processes switch within one reload
    interval), or which it reported, after the activation, not to serve (its bundle refused: waiting would not
    help), with its reason where it gave one. Groups a process does not monitor (not in its configuration) are not
    judged."""
    lines = []
    for r in rows:
        if not is_live(r, now, stale_s):
            continue
        for group, (version, activated_at) in sorted(active.items()):
            refused = group in r.unserved and (activated_at is None or r.seen_at > activated_at)
            if not refused and activated_at is not None and (now - activated_at).total_seconds() <= stale_s:
                continue  # just activated: the processes pick it up at their next reload
            if group in r.unserved:
                lines.append(f"{r.instance} does not serve the active model {version} of group {group}: "
                             f"{r.unserved[group]}")
            elif group in r.serving and r.serving[group] != version:
                lines.append(f"{r.instance} still serves {r.serving[group]} for group {group}, not the active "
                             f"{version}")
    return lines
