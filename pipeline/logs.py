"""Log output for every command: rich on a terminal, one line per record elsewhere (a container, systemd, a file).

``auto`` picks ``rich`` when stderr is a terminal and ``plain`` otherwise. ``plain`` writes
``2026-11-27T11:15:21.123Z WARNING pipeline.config: message``: UTC, never wrapped, a traceback (if any) on the lines
after it. ``json`` writes one object per line for a log shipper: ``ts``, ``level``, ``logger``, ``message`` and, for
an exception, ``exc`` (its traceback as one string).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable

import orjson
from rich.console import Console
from rich.logging import RichHandler

FORMATS: tuple[str, ...] = ("auto", "rich", "plain", "json")
_configured = {"format": "rich"}  # what the last ``configure`` chose


def _utc_stamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class PlainFormatter(logging.Formatter):
    """``<UTC ISO-8601 with ms> <LEVEL> <logger>: <message>``, the traceback (if any) on the following lines."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc_stamp(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``ts``, ``level``, ``logger``, ``message`` (and ``exc``)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": _utc_stamp(record.created), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class ConsoleLineHandler(logging.Handler):
    """Writes each formatted record through a terminal ``console`` as it is (no markup, wrapping or highlighting), so
    a progress bar on screen stays below the log lines instead of being torn by them."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self._console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._console.out(self.format(record), highlight=False)
        except Exception:
            self.handleError(record)


class OncePerInterval(logging.Filter):
    """Lets each message template of the loggers under ``prefix`` through once per ``interval_s``; other records
    pass (kafka-python logs a connection error per retry and per node, about two a second through an outage; the
    runner reports the outage itself)."""

    def __init__(self, prefix: str, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._prefix, self._interval_s, self._clock = prefix, interval_s, clock
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.name == self._prefix or record.name.startswith(self._prefix + ".")):
            return True
        key, now = (record.name, record.msg), self._clock()
        if now - self._last.get(key, -math.inf) < self._interval_s:
            return False
        self._last[key] = now
        return True


def resolve(fmt: str, *, is_terminal: bool) -> str:
    """The concrete format for ``fmt`` (``auto``: ``rich`` on a terminal, else ``plain``). ValueError if unknown."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "auto":
        return "rich" if is_terminal else "plain"
    return fmt


def configure(fmt: str, *, verbose: bool, console: Console) -> str:
    """Install the root handler for ``fmt`` (writing to ``console``'s stream, stderr) and quieten chatty libraries;
    returns the concrete format used."""
    chosen = resolve(fmt, is_terminal=console.is_terminal)
    handler: logging.Handler
    if chosen == "rich":
        handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # plain or JSON; on a terminal through the console, around progress bars rather than through them
        handler = ConsoleLineHandler(console) if console.is_terminal else logging.StreamHandler(
            console.file if console.file is not None else sys.stderr)
        handler.setFormatter(JsonFormatter() if chosen == "json" else PlainFormatter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    handler.addFilter(OncePerInterval("kafka"))  # the library's errors once a minute each
    logging.getLogger("kafka").setLevel(logging.ERROR)  # outages are reported by the runner
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # "Running job ..." and "... executed successfully" for every firing: the jobs log their own outcome
    logging.getLogger("apscheduler.executors").setLevel(logging.WARNING)
    _configured["format"] = chosen
    return chosen


def configured_format() -> str:
    """The format the last ``configure`` chose (``rich`` before any): fatal errors are written the same way."""
    return _configured["format"]
